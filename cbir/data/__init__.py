"""Datasets as manifests: one table of (path, dataset, split, modality, anatomy, label) rows."""

from cbir.data.manifest import MANIFEST_COLUMNS, Manifest

__all__ = ["MANIFEST_COLUMNS", "Manifest"]
