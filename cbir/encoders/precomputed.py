"""Embeddings read from HDF5 files (the study's published format) instead of running a model.

Rows are matched by key: the manifest `path` (or, with `key_root`, the image path relative to
that folder) is the HDF5 dataset key. The result goes into the embedding cache like any
extraction (cbir.extract.single.extract_embeddings calls `fill` instead of the predict loop), keyed by
the files' identity (resolved path, size, modification time), so sweeps, saturation, reports
and every other task reuse it unchanged. No image is ever opened.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cbir.common.errors import DataError
from cbir.common.pages import release_pages
from cbir.encoders.base import Encoder, EncoderError
from cbir.study.format import (
    StudyFormatError,
    dataset_keys,
    image_keys,
    model_folders,
    open_h5,
    read_vectors,
    vector_dim,
)

log = logging.getLogger(__name__)


class PrecomputedEncoder(Encoder):
    precomputed = True

    def __init__(
        self,
        name: str,
        files=None,
        dir=None,
        folder: str | None = None,
        key_root=None,
        reads_images: bool = False,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        self.name = str(name)
        self.key_root = Path(key_root) if key_root else None
        self.files = self._resolve_files(files, dir, folder)
        dims = {}
        for file in self.files:
            try:
                with open_h5(file) as h5:
                    dims[file] = vector_dim(h5, file)
            except StudyFormatError as e:
                raise EncoderError(f"encoder.files: {e}") from None
        found = {d for d in dims.values() if d is not None}
        if not found:
            raise EncoderError(f"encoder.files: no embedding in {[str(f) for f in self.files]}")
        if len(found) > 1:
            raise EncoderError(
                "encoder.files: embeddings of different lengths ("
                + ", ".join(f"{f.name}: {d}" for f, d in dims.items())
                + "); "
                "give the files of one model only"
            )
        self.dim = found.pop()
        if dim is not None and int(dim) != self.dim:
            raise EncoderError(f"encoder.dim={dim}, but the files hold {self.dim}-d embeddings")

    def _resolve_files(self, files, folder, model_folder) -> list[Path]:
        if files:
            listed = [files] if isinstance(files, (str, os.PathLike)) else list(files)
            paths = [Path(p) for pattern in listed for p in (sorted(glob.glob(str(pattern))) or [pattern])]
            absent = [str(p) for p in paths if not p.is_file()]
            if absent:
                raise EncoderError(f"encoder.files: {absent} not found")
            return paths
        if folder is None:
            raise EncoderError(
                "encoder.files is not set; give the HDF5 files (encoder.files=[a.h5,b.h5]) "
                "or encoder.dir=<folder with one sub-folder per model>"
            )
        candidates = [model_folder] if model_folder else model_folders(self.name)
        for sub in candidates:
            paths = sorted((Path(folder) / sub).glob("*.h5"))
            if paths:
                return paths
        raise EncoderError(
            f"encoder.dir={folder}: no *.h5 in any of {candidates}; unpack the model's embeddings "
            "there, set encoder.folder=<its folder>, or list encoder.files=[...]"
        )

    # -------------------------------------------------------------------- identity
    def identity(self) -> dict[str, Any]:
        stats = []
        for f in self.files:
            st = f.stat()
            stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
        return {
            "class": "PrecomputedEncoder",
            "files": sorted(stats),
            "key_root": str(self.key_root.resolve()) if self.key_root else None,
        }

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "parameters": 0,
            "source": "precomputed: " + ", ".join(str(f) for f in self.files),
        }

    def transform(self):
        raise EncoderError(
            f"encoder {self.name} only reads precomputed embeddings and cannot embed new images; "
            f"use the encoder that made them (e.g. encoder={self.name})"
        )

    def forward(self, images):
        self.transform()

    # ------------------------------------------------------------------ filling
    def fill(self, manifest, partial, rows: np.ndarray, on_error: str = "skip") -> None:
        """Write the embeddings of manifest `rows` into the partial cache entry. Every key is
        located first (one walk per file, no values read), so a duplicate or missing key stops
        the run before the long read."""
        keys = image_keys(manifest, self.key_root)
        row_of = {k.encode(): i for i, k in enumerate(keys)}
        source = np.full(len(keys), -1, dtype=np.int32)  # which file holds each row's embedding
        plan: list[tuple[Path, list[bytes], np.ndarray]] = []
        outside = 0
        for f_index, file in enumerate(self.files):
            with _opened(file) as h5:
                names = dataset_keys(h5)
            found = np.array([row_of.get(n, -1) for n in names], dtype=np.int64)
            outside += int((found < 0).sum())
            names = [n for n, r in zip(names, found) if r >= 0]
            found = found[found >= 0]
            twice = found[source[found] >= 0]
            if len(twice):
                first = int(twice[0])
                raise DataError(
                    f"{len(twice)} embedding key(s) appear in more than one file, e.g. {keys[first]!r} in "
                    f"{self.files[source[first]]} and {file}; give each dataset's file once"
                )
            source[found] = f_index
            plan.append((file, names, found))
        if outside:
            log.info(
                "%d embeddings in %s have no manifest row (other splits or datasets); not used",
                outside,
                ", ".join(f.name for f in self.files),
            )
        wanted = np.zeros(len(keys), dtype=bool)
        wanted[rows] = True
        absent = np.flatnonzero(wanted & (source < 0))
        if len(absent):
            example = [keys[i] for i in absent[:3]]
            message = f"{len(absent)} of {len(keys)} manifest rows have no embedding in encoder.files, e.g. {example}"
            if on_error == "raise":
                raise DataError(
                    f"{message}; give the HDF5 file of every dataset in the manifest "
                    "(or data.on_error=skip to count and skip those rows)"
                )
            log.warning("%s; skipped (data.on_error=skip)", message)
            partial.write(absent, np.zeros((len(absent), self.dim), np.float32), np.zeros(len(absent), bool))
            where = ", ".join(str(f) for f in self.files)
            partial.record_skips([(int(i), keys[i], f"no embedding under this key in {where}") for i in absent])
        _read_into(partial, plan, wanted, self.dim, on_error)


def _opened(file: Path):
    try:
        return open_h5(file)
    except StudyFormatError as e:
        raise DataError(str(e)) from None


def _read_into(partial, plan, wanted: np.ndarray, dim: int, on_error: str = "skip") -> None:
    from rich.progress import Progress

    total = int(sum(wanted[found].sum() for _, _, found in plan))
    with Progress(transient=True) as progress:
        task = progress.add_task("reading embeddings", total=total)
        for file, names, found in plan:
            keep = wanted[found]
            names = [n for n, k in zip(names, keep) if k]
            found = found[keep]
            with _opened(file) as h5:
                try:
                    for start, block in read_vectors(h5, file, names, dim):
                        rows = found[start : start + len(block)]
                        finite = np.isfinite(block).all(axis=1)
                        partial.write(rows[finite], block[finite], np.ones(int(finite.sum()), dtype=bool))
                        if not finite.all():
                            _not_finite(partial, file, names[start : start + len(block)], rows, finite, dim, on_error)
                        release_pages(partial.embeddings)  # written pages: in the page cache, not resident here
                        progress.advance(task, len(rows))
                except StudyFormatError as e:
                    raise DataError(str(e)) from None


def _not_finite(
    partial, file: Path, names: list[bytes], rows: np.ndarray, finite: np.ndarray, dim: int, on_error: str
) -> None:
    """Embeddings holding NaN or inf: a NaN index row is never retrieved and a NaN query never
    hits, so such rows are failed rows (counted, listed, left out), or stop the run."""
    bad = np.flatnonzero(~finite)
    keys = [names[i].decode() for i in bad]
    if on_error == "raise":
        raise DataError(
            f"{file}: the embedding under key {keys[0]!r} holds NaN or inf values "
            f"({len(bad)} such in this block; data.on_error=raise); export it again from the model, "
            "or use data.on_error=skip to count and skip such rows"
        )
    log.warning(
        "%d embeddings in %s hold NaN or inf values, e.g. %s; skipped (data.on_error=skip)", len(bad), file, keys[:3]
    )
    partial.write(rows[bad], np.zeros((len(bad), dim), np.float32), np.zeros(len(bad), bool))
    partial.record_skips(
        [(int(rows[i]), key, f"the embedding in {file} holds NaN or inf values") for i, key in zip(bad, keys)]
    )
