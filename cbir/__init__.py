"""cbir: benchmark image encoders as off-the-shelf feature extractors for medical image retrieval."""

__version__ = "0.1.0"

from pathlib import Path

# Hydra's config folder, as an absolute path: a path relative to the module only resolves when the
# module runs as __main__ (`python -m cbir.run`), not when the `cbir` console script imports it.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
