"""`python -m cbir.report`: see cbir/report/from_runs.py."""

from cbir.report.from_runs import main

main()
