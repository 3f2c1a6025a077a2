"""The manifest: every dataset becomes one table with a fixed schema.

`label` is the retrieval class, "<MODALITY>/<anatomy>/<finding>" (e.g. "XR/chest/Pneumonia");
classes from different datasets merge by exact name. `path` is relative to `Manifest.root`
(or absolute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    generator: dict | None = None  # a generated dataset's parameters (they decide the pixels)

    def __post_init__(self) -> None:
        validate_table(self.table, self.source)

    def __len__(self) -> int:
        return len(self.table)

    def with_table(self, table: pd.DataFrame) -> Manifest:
        """The same dataset with other rows (e.g. a subset), keeping root, source and generator."""
        return dataclasses.replace(self, table=table)

    def paths(self) -> list[Path]:
        return [self.root / p for p in self.table["path"]]

    def digest(self) -> str:
        """Key of which images the rows are: root, paths in order (rows are written by
        position) and the generator parameters of a generated dataset. What each file holds
        is checked row by row with `file_stats()`."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for p in self.table["path"]:
            h.update(b"\0" + str(p).encode())
        if self.generator is not None:
            h.update(b"\0generator:" + json.dumps(self.generator, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def file_stats(self) -> np.ndarray:
        """(n, 2) int64: size and modification time (ns) of every row's file, (-1, -1) when it
        cannot be read. One stat per file, in threads: network file systems answer in parallel."""
        root = str(self.root)
        paths = [os.path.join(root, p) for p in self.table["path"]]
        chunks = [paths[i : i + 4096] for i in range(0, len(paths), 4096)]
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(chunks)))) as pool:
            parts = list(pool.map(_stat_chunk, chunks))
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)

    def no_file_stats(self) -> np.ndarray:
        """The file records of rows whose content does not come from their file."""
        return np.full((len(self.table), 2), -1, dtype=np.int64)

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]


def _stat_chunk(paths: list[str]) -> np.ndarray:
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out


def validate_table(table: pd.DataFrame, source: str) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {missing}; a manifest needs {list(MANIFEST_COLUMNS)}")
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


def path_inside(root: str | os.PathLike, path: str) -> str | None:
    """`path` (relative to `root`, or absolute) as a POSIX path relative to `root`, or None when it
    leaves `root` (`../..`, an absolute path elsewhere): manifests may only name files under their root."""
    root = os.path.abspath(root)
    full = os.path.normpath(os.path.join(root, str(path).replace("\\", "/")))
    if os.path.commonpath([root, full]) != root:
        return None
    return Path(os.path.relpath(full, root)).as_posix()


def class_name(modality: str, anatomy: str, finding: str) -> str:
    return f"{modality}/{anatomy}/{finding}"
