"""Run the performance benchmark, e.g. `python experiments/benchmark.py bench.quick=true`.

Same as `python -m cbir.bench`; every Hydra override of conf/bench.yaml works here too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbir.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
