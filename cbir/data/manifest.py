"""The manifest: every dataset becomes one table with a fixed schema.

`label` is the retrieval class, "<MODALITY>/<anatomy>/<finding>" (e.g. "XR/chest/Pneumonia");
classes from different datasets merge by exact name. `path` is relative to `Manifest.root`
(or absolute).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

MANIFEST_COLUMNS = ("path", "dataset", "split", "modality", "anatomy", "label")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the source and the fix."""


@dataclass(frozen=True)
class Manifest:
    table: pd.DataFrame
    root: Path
    source: str = "manifest"  # where it came from, for error messages

    def __post_init__(self) -> None:
        validate_table(self.table, self.source)

    def __len__(self) -> int:
        return len(self.table)

    def paths(self) -> list[Path]:
        return [self.root / p for p in self.table["path"]]

    def digest(self) -> str:
        """Content key of the rows that determine embeddings (path order matters: rows are
        written by position)."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for p in self.table["path"]:
            h.update(b"\0" + str(p).encode())
        return h.hexdigest()[:16]

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]


def validate_table(table: pd.DataFrame, source: str) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{source}: missing column(s) {missing}; a manifest needs {list(MANIFEST_COLUMNS)}"
        )
    if len(table) == 0:
        raise ManifestError(f"{source}: the manifest has no rows")
    bad_splits = sorted(set(table["split"]) - set(SPLITS))
    if bad_splits:
        raise ManifestError(f"{source}: unknown split value(s) {bad_splits}; use {list(SPLITS)}")
    if table[list(MANIFEST_COLUMNS)].isna().any().any():
        cols = [c for c in MANIFEST_COLUMNS if table[c].isna().any()]
        raise ManifestError(f"{source}: empty values in column(s) {cols}")
    if not table.index.equals(pd.RangeIndex(len(table))):
        raise ManifestError(f"{source}: internal error, manifest index must be 0..n-1")


def class_name(modality: str, anatomy: str, finding: str) -> str:
    return f"{modality}/{anatomy}/{finding}"
