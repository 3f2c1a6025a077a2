"""`python -m cbir.export`: the command's documented spelling; the code is cbir/study/export.py."""

from cbir.study.export import main

if __name__ == "__main__":
    main()
