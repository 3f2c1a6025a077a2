"""Content-keyed embedding cache on disk.

One folder per key: `embeddings.npy` (float32, rows in manifest order), `valid.npy` (rows
whose image loaded), `skipped.csv` (the others, with reasons) and `meta.json`. A folder is
built under `<key>.partial/` and renamed into place only when complete, so a reader never sees
half an array; a per-key file lock makes concurrent jobs wait for one extraction instead of
repeating it. Arrays load with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

META_VERSION = 1


class CacheError(RuntimeError):
    pass


@dataclass
class CachedEmbeddings:
    key: str
    path: Path
    embeddings: np.ndarray  # (n, dim) float32, memory-mapped read-only
    valid: np.ndarray  # (n,) bool
    meta: dict


class EmbeddingStore:
    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.root = Path(cache_dir) / "embeddings"

    def folder(self, key: str) -> Path:
        return self.root / key

    def lock(self, key: str) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{key}.lock"))

    def load(self, key: str) -> CachedEmbeddings | None:
        """The cached entry, or None when absent or invalid (an invalid entry is removed so
        it is recomputed, never used)."""
        folder = self.folder(key)
        if not folder.exists():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            emb = np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False)
            valid = np.load(folder / "valid.npy", allow_pickle=False)
            expected = (meta["n"], meta["dim"])
            if meta.get("version") != META_VERSION or not meta.get("complete"):
                raise CacheError("incomplete or old entry")
            if emb.shape != expected or emb.dtype != np.float32 or valid.shape != (meta["n"],):
                raise CacheError(f"shape {emb.shape} != {expected}")
            if (folder / "embeddings.npy").stat().st_size != meta["bytes"]:
                raise CacheError("file size differs from the recorded size")
            if sample_digest(emb, valid) != meta.get("digest"):
                raise CacheError("content digest differs from the recorded one")
        except Exception as e:  # any damage means: recompute
            print(f"[cbir] embedding cache {folder} is damaged ({e}); recomputing it")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return CachedEmbeddings(key=key, path=folder, embeddings=emb, valid=valid, meta=meta)

    def open_partial(self, key: str, n: int, dim: int) -> "PartialEntry":
        return PartialEntry(self.root / f"{key}.partial", n, dim)

    def commit(self, key: str, partial: "PartialEntry", meta: dict) -> CachedEmbeddings:
        partial.flush()
        size = (partial.path / "embeddings.npy").stat().st_size
        meta = {**meta, "version": META_VERSION, "complete": True, "n": partial.n, "dim": partial.dim,
                "bytes": size, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        valid = partial.valid_mask()
        np.save(partial.path / "valid.npy", valid)
        meta["digest"] = sample_digest(partial.embeddings, valid)
        (partial.path / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        partial.close()
        os.replace(partial.path, self.folder(key))
        loaded = self.load(key)
        if loaded is None:
            raise CacheError(f"embedding cache {self.folder(key)} failed validation right after writing")
        return loaded


def sample_digest(embeddings: np.ndarray, valid: np.ndarray, rows: int = 4096) -> str:
    """Digest of up to `rows` evenly spaced rows plus the validity mask: catches damaged or
    swapped files in milliseconds, where hashing a multi-GB array would take a minute."""
    picked = np.unique(np.linspace(0, len(embeddings) - 1, num=min(rows, len(embeddings))).astype(np.int64))
    h = hashlib.sha256(np.ascontiguousarray(embeddings[picked]).tobytes())
    h.update(np.packbits(np.asarray(valid, dtype=bool)).tobytes())
    return h.hexdigest()[:32]


class PartialEntry:
    """An entry being written: preallocated on-disk arrays filled by row index.

    `done` marks rows already written, so an interrupted extraction resumes where it stopped.
    """

    def __init__(self, path: Path, n: int, dim: int) -> None:
        self.path, self.n, self.dim = path, int(n), int(dim)
        path.mkdir(parents=True, exist_ok=True)
        emb_file, done_file = path / "embeddings.npy", path / "done.npy"
        reuse = emb_file.exists() and done_file.exists()
        if reuse:
            try:
                self.embeddings = np.load(emb_file, mmap_mode="r+", allow_pickle=False)
                self.done = np.load(done_file, mmap_mode="r+", allow_pickle=False)
                reuse = self.embeddings.shape == (self.n, self.dim) and self.done.shape == (self.n,)
            except Exception:
                reuse = False
        if not reuse:
            self.embeddings = np.lib.format.open_memmap(emb_file, mode="w+", dtype=np.float32, shape=(self.n, self.dim))
            self.done = np.lib.format.open_memmap(done_file, mode="w+", dtype=np.uint8, shape=(self.n,))
            (path / "skipped.csv").write_text("row,path,reason\n")
        self.skipped_file = path / "skipped.csv"

    def remaining(self) -> np.ndarray:
        return np.flatnonzero(self.done == 0)

    def write(self, rows: np.ndarray, values: np.ndarray, ok: np.ndarray) -> None:
        self.embeddings[rows] = values
        self.done[rows] = np.where(ok, 1, 2)  # 1 = embedded, 2 = skipped (image failed)

    def record_skips(self, entries: list[tuple[int, str, str]]) -> None:
        if entries:
            with self.skipped_file.open("a") as f:
                for row, path, reason in entries:
                    reason = reason.replace('"', "'")
                    f.write(f'{row},"{path}","{reason}"\n')

    def valid_mask(self) -> np.ndarray:
        return np.asarray(self.done) == 1

    def flush(self) -> None:
        self.embeddings.flush()
        self.done.flush()

    def close(self) -> None:
        self.flush()
        del self.embeddings, self.done
        (self.path / "done.npy").unlink(missing_ok=True)
