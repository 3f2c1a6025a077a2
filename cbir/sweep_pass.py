"""`python -m cbir.sweep_pass`: the command's documented spelling; the code is cbir/job/sweep_pass.py."""

from cbir.job.sweep_pass import main

if __name__ == "__main__":
    raise SystemExit(main())
