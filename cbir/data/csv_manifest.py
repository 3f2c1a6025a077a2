"""A manifest written by the user: a CSV (or Parquet) file with the columns
path, split, modality, anatomy, label (and optionally dataset; missing -> `name`).

`path` is relative to `root` (default: the manifest file's folder) or absolute inside it;
a path that leaves `root` is an error. `label` is the retrieval class, best written as
`<MODALITY>/<anatomy>/<finding>` so that it merges with the study's classes.
With `labels=multi` a `findings` column is required: the image's finding names joined by `|`
(e.g. `Edema|Pleural Effusion`; empty = the finding of `label`); `label` then becomes
`<MODALITY>/<anatomy>/<sorted findings>`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cbir.data.base import MISSING_POLICIES, DatasetReader, Scan, apply_missing_policy, check_policy
from cbir.data.findings import fill_findings
from cbir.data.manifest import MANIFEST_COLUMNS, ManifestError, class_name

REQUIRED = tuple(c for c in MANIFEST_COLUMNS if c != "dataset")


class CSVManifestDataset(DatasetReader):
    def __init__(self, file, root=None, name: str = "csv", cache_dir=None, rebuild: bool = False,
                 missing: str = "error", labels: str = "single") -> None:
        if not file:
            raise ManifestError("dataset.file is not set; give the manifest file: dataset.file=<path/to/manifest.csv>")
        self.file = Path(file)
        super().__init__(root if root else self.file.parent, name, cache_dir, rebuild, labels)
        self.missing = check_policy(missing, "dataset.missing", MISSING_POLICIES)

    def options(self) -> dict:
        return {"file": str(self.file.resolve()), "missing": self.missing}

    def inputs(self) -> list[Path]:
        return [self.file]

    def scan(self) -> Scan:
        if not self.file.is_file():
            raise ManifestError(f"dataset.file={self.file}: file not found")
        if self.file.suffix.lower() == ".parquet":
            table = pd.read_parquet(self.file)
        else:
            table = pd.read_csv(self.file, dtype=str, keep_default_na=False)
        missing = [c for c in REQUIRED if c not in table.columns]
        if missing:
            raise ManifestError(
                f"{self.file}: missing column(s) {missing}; a manifest needs columns {list(REQUIRED)} "
                f"(plus optional 'dataset'); add them to the header line")
        if "dataset" not in table.columns:
            table["dataset"] = self.name
        table = table.astype({c: str for c in MANIFEST_COLUMNS})
        empty = [c for c in MANIFEST_COLUMNS if (table[c].str.strip() == "").any()]
        if empty:
            raise ManifestError(f"{self.file}: empty values in column(s) {empty}; every row needs all of them")
        table["path"] = [self._inside_root(p, i) for i, p in enumerate(table["path"])]
        if self.labels == "multi":
            if "findings" not in table.columns:
                raise ManifestError(f"{self.file}: dataset.labels=multi needs a 'findings' column (finding names "
                                    "joined by |, e.g. Edema|Pleural Effusion); add it or use dataset.labels=single")
            table = fill_findings(table.astype({"findings": str}))
            table["label"] = [class_name(m, a, f) for m, a, f in
                              zip(table["modality"], table["anatomy"], table["findings"])]
        scan = Scan(table.reset_index(drop=True))
        apply_missing_policy(scan, self.root, self.missing, self.name)
        return scan

    def _inside_root(self, path: str, row: int) -> str:
        root = os.path.abspath(self.root)
        full = os.path.normpath(os.path.join(root, path.replace("\\", "/")))
        if os.path.commonpath([root, full]) != root:
            raise ManifestError(
                f"{self.file}, row {row + 2}: path {path!r} is outside the manifest root {root}; "
                "make paths relative to dataset.root (default: the manifest's folder) or set dataset.root")
        return Path(os.path.relpath(full, root)).as_posix()
