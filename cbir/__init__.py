"""cbir: benchmark image encoders as off-the-shelf feature extractors for medical image retrieval."""

__version__ = "0.1.0"
