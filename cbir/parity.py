"""`python -m cbir.parity`: the command's documented spelling; the code is cbir/study/parity.py."""

from cbir.study.parity import main

if __name__ == "__main__":
    main()
