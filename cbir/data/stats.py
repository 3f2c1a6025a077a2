"""Dataset statistics for reports and tracking: counts per split, modality and class, and a
content digest of the manifest (same rows in the same order -> same digest, wherever the
images are stored)."""

from __future__ import annotations

import hashlib

import pandas as pd

from cbir.data.manifest import MANIFEST_COLUMNS, SPLITS, Manifest


def manifest_digest(manifest: Manifest) -> str:
    """sha256 (16 hex) of the manifest columns row by row; independent of `Manifest.root`."""
    h = hashlib.sha256()
    for row in manifest.table[list(MANIFEST_COLUMNS)].itertuples(index=False, name=None):
        h.update("\x1f".join(map(str, row)).encode() + b"\x1e")
    return h.hexdigest()[:16]


def counts_by(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows per `keys` x split, with a total column; splits in train/val/test order."""
    counts = table.groupby(keys + ["split"], sort=True).size().unstack("split", fill_value=0)
    counts = counts.reindex(columns=[s for s in SPLITS], fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts.reset_index().rename_axis(columns=None)


def dataset_summary(manifest: Manifest) -> dict:
    """Everything worth logging about a manifest:
    rows, classes, digest, split_counts {split: n}, and DataFrames class_counts
    (label, modality, anatomy, train, val, test, total), modality_counts, dataset_counts."""
    table = manifest.table
    return {
        "rows": len(table),
        "classes": int(table["label"].nunique()),
        "digest": manifest_digest(manifest),
        "split_counts": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "class_counts": counts_by(table, ["label", "modality", "anatomy"]),
        "modality_counts": counts_by(table, ["modality"]),
        "dataset_counts": counts_by(table, ["dataset"]),
    }


def mlflow_dataset(manifest: Manifest, name: str):
    """The manifest as an `mlflow.data` dataset (for `mlflow.log_input`), with the content digest."""
    import mlflow.data

    return mlflow.data.from_pandas(
        manifest.table[list(MANIFEST_COLUMNS)], source=str(manifest.root), name=name, digest=manifest_digest(manifest)
    )
