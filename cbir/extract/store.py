"""Content-keyed embedding cache on disk. (One module past 300 lines on purpose: the entry's on-disk
format is written, checked and read back only here, so a change to it stays in one place.)

One folder per key (encoder identity x which images, see `cbir.extract.single.cache_key`):
`embeddings.npy` (float32, rows in manifest order), `valid.npy` (rows whose image loaded),
`files.npy` (size and modification time in ns of each row's file when it was read),
`skipped.csv` (the rows that failed, with reasons) and `meta.json` (shape and checksum).

- Every row is tied to its file: a row whose file now has another size or modification time
  is out of date and extracted again, the other rows are reused (`stale_rows`). A changed or a
  fixed image therefore never serves old numbers, and fixing 10 files re-extracts 10 rows.
  `EmbeddingStore.load_fresh` is the one place that decides whether an entry is a cache hit.
- A CRC-32 of every byte of the three arrays is written at commit and verified when an entry is
  first loaded in a process: any damage since commit (bit flips, a truncated or altered file)
  makes the entry count as absent, so it is recomputed. It guards against accidents, not against
  someone who rewrites meta.json too.
- An entry is built under `<key>.partial/` and renamed into place only when complete, so a reader
  never sees half an array; a per-key file lock makes concurrent jobs wait for one extraction
  instead of repeating it. Refreshing stale rows builds a new partial entry from a copy of the old
  one and swaps it in; processes still reading the old arrays keep their (unlinked) files.
- Disk space for a new entry (arrays, and room for what the commit writes) is checked and
  reserved before writing: writing into a sparse memory-mapped file on a full disk would kill
  the process with SIGBUS. A disk that fills up anyway during the commit is a one-line error
  that keeps the partial entry, so the next run finishes it without recomputing.
Arrays load with `allow_pickle=False`.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from filelock import FileLock

log = logging.getLogger(__name__)

META_VERSION = 2
CHUNK_BYTES = 64 << 20  # checksum in 64 MB pieces: memory stays flat for any entry size
NO_FILE = -1  # files.npy value of a row whose file could not be stat'ed


class CacheError(RuntimeError):
    pass


class CacheSpaceError(CacheError):
    """Not enough free disk space under the cache folder for a new entry."""


@dataclass
class CachedEmbeddings:
    key: str
    path: Path
    embeddings: np.ndarray  # (n, dim) float32, memory-mapped read-only
    valid: np.ndarray  # (n,) bool
    files: np.ndarray  # (n, 2) int64: size, mtime_ns of each row's file when it was read
    meta: dict

    def stale_rows(self, files: np.ndarray, retry_failed: bool = False) -> np.ndarray:
        """Rows to extract again: their file changed (size or mtime), or (retry_failed) they failed."""
        stale = (self.files != files).any(axis=1)
        if retry_failed:
            stale |= ~self.valid
        return np.flatnonzero(stale)

    def skipped(self) -> list[tuple[int, str, str]]:
        """(row, path, reason) of the rows that failed, in row order."""
        return sorted(read_skipped(self.path / "skipped.csv"))


@dataclass
class CacheLookup:
    """What `EmbeddingStore.load_fresh` found for a key: the complete, undamaged entry (None when
    absent or damaged) and its rows to extract again."""

    key: str
    entry: CachedEmbeddings | None
    stale: np.ndarray  # rows whose file changed since, or (retry_failed) that failed; empty without an entry
    state: tuple | None  # the entry's files when it was read (None: no entry folder), see `load_fresh`

    @property
    def fresh(self) -> bool:
        """A cache hit: an entry with no row to extract again."""
        return self.entry is not None and not len(self.stale)


class EmbeddingStore:
    _verified: dict[tuple, str] = {}  # entries already checksummed in this process (by file identity)
    _reported_damage: ClassVar[dict[str, str]] = {}  # damaged entry folder -> the reason already logged in this process

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "embeddings"

    def folder(self, key: str) -> Path:
        return self.root / key

    def lock(self, key: str) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{key}.lock"))

    def load(self, key: str) -> CachedEmbeddings | None:
        """The complete, undamaged entry, or None (absent or damaged: the caller recomputes it,
        under the lock, and the new entry replaces the damaged one)."""
        folder = self.folder(key)
        if not folder.exists():
            return None
        try:
            return self._read(key, folder, verify=True)
        except Exception as e:  # any damage means: recompute
            if self._reported_damage.get(str(folder)) != str(e):  # callers look again under the lock: say it once
                self._reported_damage[str(folder)] = str(e)
                log.warning("embedding cache %s is damaged (%s); recomputing it", folder, e)
            return None

    def load_fresh(
        self, key: str, files: np.ndarray, retry_failed: bool = False, known: CacheLookup | None = None
    ) -> CacheLookup:
        """The entry of `key` and which of its rows are out of date for `files` (each row's file
        size and mtime now): the one test of whether a cached entry can be used as it is. `known`,
        an earlier lookup of the same key (e.g. before waiting for its lock), is reused when the
        entry's files are still the ones it read, so a caller reads an entry once; a changed
        folder (another job committed meanwhile) is read again."""
        state = _entry_state(self.folder(key))  # taken first: a commit racing the read counts as a change
        if known is not None and known.key == key and known.state == state:
            entry = known.entry
        else:
            entry = self.load(key)
        stale = entry.stale_rows(files, retry_failed) if entry is not None else np.zeros(0, dtype=np.int64)
        return CacheLookup(key, entry, stale, state)

    def _read(self, key: str, folder: Path, verify: bool) -> CachedEmbeddings:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != META_VERSION or not meta.get("complete"):
            raise CacheError("incomplete entry or one written by an older cbir")
        emb = np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        valid = np.load(folder / "valid.npy", allow_pickle=False)
        files = np.load(folder / "files.npy", allow_pickle=False)
        n, dim = meta["n"], meta["dim"]
        if emb.shape != (n, dim) or emb.dtype != np.float32:
            raise CacheError(f"embeddings shape {emb.shape} != {(n, dim)}")
        if valid.shape != (n,) or valid.dtype != bool or files.shape != (n, 2) or files.dtype != np.int64:
            raise CacheError("valid.npy or files.npy do not match the embeddings")
        if (folder / "embeddings.npy").stat().st_size != meta["bytes"]:
            raise CacheError("file size differs from the recorded size")
        identity = _file_identity(folder)
        if verify and self._verified.get(identity) != meta["checksum"]:
            if checksum(emb, valid, files) != meta["checksum"]:
                raise CacheError("checksum differs from the one written at commit")
        self._verified[identity] = meta["checksum"]
        return CachedEmbeddings(key=key, path=folder, embeddings=emb, valid=valid, files=files, meta=meta)

    def open_partial(
        self,
        key: str,
        n: int,
        dim: int,
        files: np.ndarray | None = None,
        base: CachedEmbeddings | None = None,
        retry_failed: bool = False,
    ) -> PartialEntry:
        """The entry being written for `key`: an interrupted one is resumed, else a new one starts,
        from a copy of `base` (an older complete entry whose fresh rows are kept) or empty. Rows
        whose file changed since they were written, and failed rows under `retry_failed`, are
        marked to do again."""
        files = np.full((n, 2), NO_FILE, dtype=np.int64) if files is None else np.asarray(files, dtype=np.int64)
        path = self.root / f"{key}.partial"
        partial = PartialEntry.reopen(path, n, dim)
        if partial is None:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            check_space(path, entry_bytes(path, n, dim), self.cache_dir)
            try:
                if base is not None:
                    partial = PartialEntry.copy_of(base, path, self.cache_dir)
                else:
                    partial = PartialEntry.create(path, n, dim, self.cache_dir)
            except OSError as e:  # the disk filled up since the check: nothing computed yet, start again later
                if e.errno != errno.ENOSPC:
                    raise
                shutil.rmtree(path, ignore_errors=True)
                raise _space_error(
                    self.cache_dir, entry_bytes(self.root, n, dim), shutil.disk_usage(self.root).free
                ) from None
            written = files if base is None else base.files
        else:
            written = partial.written_files()
        redo = (written != files).any(axis=1) & (partial.done != 0)
        if retry_failed:
            redo |= np.asarray(partial.done) == 2
        partial.done[redo] = 0
        partial.set_files(files)
        return partial

    def commit(self, key: str, partial: PartialEntry, meta: dict) -> CachedEmbeddings:
        partial.flush()
        size = (partial.path / "embeddings.npy").stat().st_size
        meta = {
            **meta,
            "version": META_VERSION,
            "complete": True,
            "n": partial.n,
            "dim": partial.dim,
            "bytes": size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        valid = partial.valid_mask()
        try:
            np.save(partial.path / "valid.npy", valid)
            partial.tidy_skipped(valid)
            meta["checksum"] = checksum(partial.embeddings, valid, partial.files)
            (partial.path / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        except OSError as e:  # done.npy is still there: the partial entry resumes, nothing is recomputed
            if e.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(partial.path).free
            raise CacheSpaceError(
                f"disk full in {self.cache_dir} while finishing embedding cache entry {partial.path.name} "
                f"(have {_size(free)}, need about {_size(COMMIT_BYTES + partial.n)} more); its "
                f"{int((np.asarray(partial.done) != 0).sum())} rows are kept: free some space there and run again "
                "to finish it without recomputing"
            ) from None
        partial.close()
        target, old = self.folder(key), None
        if target.exists():  # a damaged or out-of-date entry: swap, readers keep their open files
            old = self.root / f"{key}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(partial.path, target)
        self._reported_damage.pop(str(target), None)  # a new entry: damage to it is news again
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        try:
            return self._read(key, target, verify=False)
        except Exception as e:
            raise CacheError(f"embedding cache {target} failed validation right after writing ({e})") from e


def checksum(*arrays: np.ndarray) -> str:
    """CRC-32 of every byte of the arrays (about 1.8 GB/s on one core)."""
    crc = 0
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, flat.itemsize))
        for i in range(0, len(flat), step):
            crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[i : i + step])).cast("B"), crc)
    return f"crc32:{crc:08x}"


ENTRY_FILES = ("embeddings.npy", "valid.npy", "files.npy", "meta.json")  # what `EmbeddingStore.load` reads


def _file_identity(folder: Path) -> tuple:
    stats = [(folder / name).stat() for name in ENTRY_FILES]
    return (str(folder),) + tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _entry_state(folder: Path) -> tuple | None:
    """Inode, size and mtime of each file an entry load reads (None for a missing one); None
    without the folder. A commit swaps in new files, so any change to the entry changes this."""
    if not folder.is_dir():
        return None
    state = []
    for name in ENTRY_FILES:
        try:
            s = (folder / name).stat()
            state.append((s.st_ino, s.st_size, s.st_mtime_ns))
        except FileNotFoundError:
            state.append(None)
    return tuple(state)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _space_error(cache_dir: Path, need: int, free: int) -> CacheSpaceError:
    return CacheSpaceError(
        f"not enough space in {cache_dir}: need {_size(need)}, have {_size(free)}; free some space there "
        "or set paths.cache_dir=<folder on a larger disk>"
    )


COMMIT_BYTES = 64 << 10  # room kept for meta.json and skipped.csv, written when an entry is committed


def entry_bytes(folder: Path, n: int, dim: int) -> int:
    """Disk space a new entry takes until its commit, counted in the file system's blocks (a
    small file still takes a whole block): the arrays, valid.npy and room for meta.json and the
    skipped list, so a disk that passes the check does not run out while committing."""
    block = max(512, os.statvfs(folder).f_frsize) if hasattr(os, "statvfs") else 4096
    header = 128  # an .npy header
    files = (n * dim * 4 + header, n + header, n * 16 + header, n + header)  # embeddings, done, files, valid
    return sum(-(-size // block) * block for size in files) + COMMIT_BYTES


def check_space(folder: Path, need: int, cache_dir: Path) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        shutil.rmtree(folder, ignore_errors=True)
        raise _space_error(cache_dir, need, free)


def reserve(file: Path, cache_dir: Path) -> None:
    """Allocate the file's blocks now, so a disk filling up later fails here with a message
    instead of SIGBUS while writing rows."""
    if not hasattr(os, "posix_fallocate"):  # macOS: the free-space check is all there is
        return
    size = file.stat().st_size
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _space_error(cache_dir, size, shutil.disk_usage(file.parent).free) from None
        log.debug("cannot reserve %s (%s); relying on the free-space check", file, e)  # e.g. no support
    finally:
        os.close(fd)


def read_skipped(path: Path) -> list[tuple[int, str, str]]:
    """(row, path, reason) lines of a skipped.csv, in file order."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [(int(r["row"]), r["path"], r["reason"]) for r in csv.DictReader(f)]


class PartialEntry:
    """An entry being written: on-disk arrays filled by row index.

    `done` marks rows already written (1 embedded, 2 failed), so an interrupted extraction
    resumes where it stopped. `files.npy` records the file state each row is for.
    """

    def __init__(self, path: Path, n: int, dim: int) -> None:
        """Open an existing partial entry (also how DDP ranks reach the caller's arrays)."""
        self.path, self.n, self.dim = path, int(n), int(dim)
        self.embeddings = np.load(path / "embeddings.npy", mmap_mode="r+", allow_pickle=False)
        self.done = np.load(path / "done.npy", mmap_mode="r+", allow_pickle=False)
        if self.embeddings.shape != (self.n, self.dim) or self.done.shape != (self.n,):
            raise CacheError(f"{path}: arrays of another shape")
        self.skipped_file = path / "skipped.csv"
        self.files: np.ndarray | None = None

    @classmethod
    def reopen(cls, path: Path, n: int, dim: int) -> PartialEntry | None:
        if not (path / "embeddings.npy").exists() or not (path / "done.npy").exists():
            return None
        try:
            partial = cls(path, n, dim)
            if partial.written_files().shape != (n, 2):
                return None
            return partial
        except Exception:
            return None

    @classmethod
    def create(cls, path: Path, n: int, dim: int, cache_dir: Path) -> PartialEntry:
        np.lib.format.open_memmap(path / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim)).flush()
        reserve(path / "embeddings.npy", cache_dir)
        np.save(path / "done.npy", np.zeros(n, dtype=np.uint8))
        (path / "skipped.csv").write_text("row,path,reason\n")
        np.save(path / "files.npy", np.full((n, 2), NO_FILE, dtype=np.int64))
        return cls(path, n, dim)

    @classmethod
    def copy_of(cls, base: CachedEmbeddings, path: Path, cache_dir: Path) -> PartialEntry:
        try:
            shutil.copyfile(base.path / "embeddings.npy", path / "embeddings.npy")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                shutil.rmtree(path, ignore_errors=True)
                raise _space_error(cache_dir, base.embeddings.nbytes, shutil.disk_usage(cache_dir).free) from None
            raise
        shutil.copyfile(base.path / "skipped.csv", path / "skipped.csv")
        np.save(path / "done.npy", np.where(base.valid, 1, 2).astype(np.uint8))
        np.save(path / "files.npy", base.files)
        n, dim = base.embeddings.shape
        return cls(path, n, dim)

    def written_files(self) -> np.ndarray:
        return np.load(self.path / "files.npy", allow_pickle=False)

    def set_files(self, files: np.ndarray) -> None:
        self.files = files
        np.save(self.path / "files.npy", files)

    def remaining(self) -> np.ndarray:
        return np.flatnonzero(self.done == 0)

    def write(self, rows: np.ndarray, values: np.ndarray, ok: np.ndarray) -> None:
        self.embeddings[rows] = values
        self.done[rows] = np.where(ok, 1, 2)  # 1 = embedded, 2 = skipped (image failed)

    def record_skips(self, entries: list[tuple[int, str, str]]) -> None:
        if entries:
            with self.skipped_file.open("a", newline="") as f:
                csv.writer(f).writerows(entries)

    def tidy_skipped(self, valid: np.ndarray) -> None:
        """Keep one line (the latest) per row that is still failed."""
        latest = {}
        for row, path, reason in read_skipped(self.skipped_file):
            latest[row] = (row, path, reason)
        rows = [latest[r] for r in sorted(latest) if r < len(valid) and not valid[r]]
        tmp = self.skipped_file.with_name("skipped.csv.tmp")  # a full disk leaves the list as it was
        try:
            with tmp.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["row", "path", "reason"])
                writer.writerows(rows)
            os.replace(tmp, self.skipped_file)
        finally:
            tmp.unlink(missing_ok=True)

    def valid_mask(self) -> np.ndarray:
        return np.asarray(self.done) == 1

    def flush(self) -> None:
        self.embeddings.flush()
        self.done.flush()

    def close(self) -> None:
        self.flush()
        del self.embeddings, self.done
        (self.path / "done.npy").unlink(missing_ok=True)
