"""`python -m cbir.bench`: see cbir/bench/__init__.py."""

from cbir.bench import main

if __name__ == "__main__":
    main()
