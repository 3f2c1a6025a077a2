"""The study's published split CSVs (Zenodo `datasets.zip`) as a manifest.

One-hot class columns -> `label` (the column holding the row's 1, the study's arg-max);
`anatomic_region` -> `anatomy`; `filepath` -> `path` (relative to `root`, the study's common
data folder, and also the image's HDF5 key); `split` and `dataset` kept. Rows whose filepath is
the study's literal `File Missing` (NIH images it could not find) are dropped and counted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cbir.data.base import MISSING_POLICIES, DatasetReader, Scan, apply_missing_policy, check_policy
from cbir.data.manifest import ManifestError
from cbir.study.format import FILE_MISSING, STUDY_CSV_NAMES, StudyFormatError, read_split_csv


class StudySplitsDataset(DatasetReader):
    def __init__(
        self,
        root,
        files=None,
        dir=None,
        name: str = "study_splits",
        missing: str = "auto",
        images_needed: bool = True,
        cache_dir=None,
        rebuild: bool = False,
    ) -> None:
        super().__init__(root, name, cache_dir, rebuild)
        self.files = self._find_files(files, dir)
        self.missing = check_policy(missing, "dataset.missing", ("auto", *MISSING_POLICIES))
        if self.missing == "auto":  # precomputed embeddings need no image on disk
            self.missing = "error" if images_needed else "keep"
        if self.missing != "keep":
            # the image check lists every image folder anyway, and those folders would all have
            # to key a cached manifest: read the CSVs each time instead
            self.cache_dir = None

    @staticmethod
    def _find_files(files, folder) -> list[Path]:
        if files:
            return [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
        if folder is None:
            raise ManifestError(
                "dataset.files is not set; give the study's split CSVs: "
                "dataset.files=[/data/datasets/nih14.csv,...] or dataset.dir=<folder holding them>"
            )
        found = [Path(folder) / n for n in STUDY_CSV_NAMES.values() if (Path(folder) / n).is_file()]
        if not found:
            raise ManifestError(
                f"dataset.dir={folder}: none of the study's split CSVs {list(STUDY_CSV_NAMES.values())} "
                "is there; unpack datasets.zip into it or list the files with dataset.files=[...]"
            )
        return found

    def options(self) -> dict:
        return {"files": [str(f.resolve()) for f in self.files], "missing": self.missing}

    def inputs(self) -> list[Path]:
        return list(self.files)

    def check_root(self) -> None:
        if self.missing != "keep":  # with precomputed embeddings the images (and root) may be absent
            super().check_root()

    def describe(self) -> str:
        return f"dataset {self.name} ({', '.join(f.name for f in self.files)})"

    def scan(self) -> Scan:
        tables = []
        for file in self.files:
            if not file.is_file():
                raise ManifestError(f"dataset.files: {file} not found")
            try:
                tables.append(read_split_csv(file))
            except StudyFormatError as e:
                raise ManifestError(str(e)) from None
        table = pd.concat(tables, ignore_index=True)
        table = table.rename(columns={"filepath": "path", "anatomic_region": "anatomy"})
        scan = Scan(table)
        missing = (table["path"].str.strip() == FILE_MISSING).to_numpy()
        if missing.any():
            scan.drop(f"rows with filepath '{FILE_MISSING}' (images the study did not find)", int(missing.sum()))
            scan.table = table.loc[~missing].reset_index(drop=True)
        apply_missing_policy(scan, self.root, self.missing, self.name)
        return scan
