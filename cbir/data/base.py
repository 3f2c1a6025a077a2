"""What every dataset reader shares: caching the manifest, counting dropped rows, file checks.

A reader implements `scan()` (read the source as distributed -> manifest table plus the
number of rows dropped per reason) and `inputs()` (the files and folders that decide the
manifest). `load_manifest()` then builds the manifest once, writes it to
`<cache_dir>/<name>-<key>.parquet` (atomically, under a lock) and reuses it until the inputs or
the reader's options change. The key holds a hash of every input file's bytes (metadata CSVs,
split and findings files: an edit that keeps the size and modification time is still a new
manifest; about 0.2 s per 150 MB) and the size and modification time of every input folder
(an image added or removed changes its folder's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock

from cbir.data.findings import check_labels_mode
from cbir.data.manifest import MANIFEST_COLUMNS, Manifest, ManifestError, validate_table

log = logging.getLogger(__name__)

# Bump when a reader's rules change, so manifests cached by an older version are rebuilt.
RULES_VERSION = 2  # 2: manifests keep a patient column
MISSING_POLICIES = ("drop", "error", "keep")


@dataclass
class Scan:
    """A reader's result: the manifest table, rows dropped per reason, and a few examples."""

    table: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, count: int, examples=()) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)
            self.examples.setdefault(reason, []).extend(list(examples)[:3])


class DatasetReader:
    """Base class of the readers; subclasses set `manifest_root` and implement scan/inputs."""

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        cache_dir: str | os.PathLike | None = None,
        rebuild: bool = False,
        labels: str = "single",
    ) -> None:
        self.root = Path(root)
        self.name = str(name)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.rebuild = bool(rebuild)
        # single: the study's single-finding images; multi: every image with its `findings`
        self.labels = check_labels_mode(labels)
        self.last_scan: Scan | None = None  # what the last load_manifest() built or reused

    # ----------------------------------------------------------- to implement
    @property
    def manifest_root(self) -> Path:
        """The folder the manifest's `path` column is relative to."""
        return self.root

    def scan(self) -> Scan:
        raise NotImplementedError

    def inputs(self) -> list[Path]:
        """Files (by content) and folders (by size and mtime) that key the cache. Folders change
        mtime when an entry is added or removed, so listing the image folders catches new/removed images."""
        raise NotImplementedError

    def options(self) -> dict:
        """Reader options that change the manifest (besides root and name)."""
        return {}

    # ----------------------------------------------------------------- public
    def load_manifest(self) -> Manifest:
        self.check_root()
        if self.cache_dir is None:
            scan = self._checked_scan()
        else:
            scan = self._cached_scan()
        self.last_scan = scan
        if scan.dropped:
            log.info(
                "%s: %d rows, dropped %s",
                self.name,
                len(scan.table),
                ", ".join(f"{n} {reason}" for reason, n in scan.dropped.items()),
            )
        return Manifest(table=scan.table, root=self.manifest_root, source=self.describe())

    def describe(self) -> str:
        return f"dataset {self.name} ({self.root})"

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise ManifestError(
                f"dataset {self.name}: root folder {self.root} does not exist; "
                f"set dataset.root=<folder> (see conf/dataset/*.yaml for the expected layout)"
            )

    def cache_key(self) -> str:
        stats = []
        for p in self.inputs():
            try:
                if p.is_file():  # what the manifest is read from: its bytes, not its size and mtime
                    stats.append((str(p), "sha256", _content_hash(p)))
                else:
                    st = p.stat()
                    stats.append((str(p), st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stats.append((str(p), None, None))
        payload = {
            "reader": f"{type(self).__module__}.{type(self).__qualname__}",
            "rules": RULES_VERSION,
            "name": self.name,
            "root": str(self.root.resolve()),
            "options": {**self.options(), **({"labels": self.labels} if self.labels != "single" else {})},
            "inputs": stats,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- private
    def _checked_scan(self) -> Scan:
        scan = self.scan()
        columns = list(MANIFEST_COLUMNS) + (["findings"] if self.labels == "multi" else [])
        columns += ["patient"] if "patient" in scan.table else []  # optional: the leakage audit reads it
        table = scan.table.loc[:, columns].reset_index(drop=True)
        validate_table(table, self.describe())
        scan.table = table.astype(str)
        return scan

    def _cached_scan(self) -> Scan:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        stem = self.cache_dir / f"{self.name}-{self.cache_key()}"
        table_file, info_file = stem.with_suffix(".parquet"), stem.with_suffix(".json")
        with FileLock(str(stem) + ".lock"):
            if not self.rebuild:
                cached = _read_cached(table_file, info_file, self.describe())
                if cached is not None:
                    log.info("%s: manifest reused from %s", self.name, table_file)
                    return cached
            scan = self._checked_scan()
            _write_atomically(table_file, lambda tmp: scan.table.to_parquet(tmp, index=False))
            info = {"dropped": scan.dropped, "examples": scan.examples, "root": str(self.root)}
            _write_atomically(info_file, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
            log.info("%s: manifest built (%d rows) and cached at %s", self.name, len(scan.table), table_file)
            return scan


def _content_hash(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomically(target: Path, write) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cached(table_file: Path, info_file: Path, source: str) -> Scan | None:
    """The cached scan, or None when absent or unreadable (then it is rebuilt)."""
    if not (table_file.exists() and info_file.exists()):
        return None
    try:
        table = pd.read_parquet(table_file).astype(str)
        info = json.loads(info_file.read_text())
        validate_table(table, source)
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("cached manifest %s is unreadable (%s); rebuilding it", table_file, e)
        return None
    return Scan(table=table, dropped=info.get("dropped", {}), examples=info.get("examples", {}))


# ------------------------------------------------------------------ helpers for readers
def check_policy(value: str, key: str, allowed) -> str:
    if value not in allowed:
        raise ManifestError(f"{key}={value!r}: choose one of {list(allowed)}")
    return value


def existing(base: Path, rel_paths: pd.Series) -> pd.Series:
    """Boolean mask: which `base/rel_path` files exist. Lists each parent folder once
    (much cheaper than one stat per file on network file systems)."""
    listing: dict[str, set[str]] = {}
    found = []
    for rel in rel_paths:
        parent, _, fname = str(rel).rpartition("/")
        if parent not in listing:
            try:
                listing[parent] = set(os.listdir(base / parent))
            except (FileNotFoundError, NotADirectoryError):
                listing[parent] = set()
        found.append(fname in listing[parent])
    return pd.Series(found, index=rel_paths.index, dtype=bool)


def apply_missing_policy(scan: Scan, base: Path, policy: str, dataset: str) -> None:
    """Check that every manifest image exists under `base` and act on `policy`:
    drop (count and skip), error (stop, naming examples), keep (do not check)."""
    if policy == "keep" or scan.table.empty:
        return
    mask = existing(base, scan.table["path"])
    missing = scan.table.loc[~mask, "path"]
    if missing.empty:
        return
    if policy == "error":
        raise ManifestError(
            f"dataset {dataset}: {len(missing)} image(s) listed in the metadata are missing under {base}, "
            f"e.g. {list(missing[:3])}; check dataset.root, or set dataset.missing=drop to count and skip them"
        )
    scan.drop("image file missing", len(missing), missing[:3])
    scan.table = scan.table.loc[mask].reset_index(drop=True)


def folders(root: Path, depth: int) -> list[Path]:
    """`root` and its sub-folders down to `depth` levels, sorted (for cache keys)."""
    out, level = [root], [root]
    for _ in range(depth):
        level = sorted(p for d in level if d.is_dir() for p in d.iterdir() if p.is_dir())
        out.extend(level)
    return out


def first_existing(folder: Path, names, what: str, key: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ManifestError(f"{what}: none of {list(names)} found in {folder}; check dataset.root or set {key}=<file name>")
