"""RadImageNet (CT, MR, US) as distributed: `radiology_ai/{CT,MR,US}/...` plus the official
split files `RadiologyAI_{train,val,test}.csv` (header `filename,label`).

The study's rules: the official split as given; the class comes from the image path, not
from the CSV `label` column: `<MOD>/<anatomy>/<pathology>` for CT/MR; every ultrasound organ
folder `US/<organ>` holds pathology `normal`, except `US/thyroid_nodule` -> `US/thyroid/nodule`.
A file listed twice in one split file counts once; files named in the optional ignore list
are skipped.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pandas as pd

from cbir.data.base import MISSING_POLICIES, DatasetReader, Scan, apply_missing_policy, check_policy, folders
from cbir.data.manifest import ManifestError, class_name

SPLITS = ("train", "val", "test")
US_RENAMED = {"thyroid_nodule": ("thyroid", "nodule")}  # every other US organ: (organ, "normal")


def radimagenet_class(filename: str) -> tuple[str, str, str] | None:
    """(modality, anatomy, finding) from `radiology_ai/<MOD>/...`; None if the path is too short.
    Exactly one leading folder precedes the modality, as in the official `filename` values."""
    parts = PurePosixPath(filename).parts
    if len(parts) < 4:
        return None
    modality, anatomy = parts[1], parts[2]
    if modality == "US" and len(parts) == 4:  # radiology_ai/US/<organ>/<file>
        anatomy, finding = US_RENAMED.get(anatomy, (anatomy, "normal"))
        return modality, anatomy, finding
    if len(parts) < 5:
        return None
    return modality, anatomy, "/".join(parts[3:-1])


class RadImageNetDataset(DatasetReader):
    def __init__(
        self,
        root,
        name: str = "radimagenet",
        cache_dir=None,
        rebuild: bool = False,
        split_files: dict | None = None,
        ignore_list: str | None = None,
        missing: str = "error",
    ) -> None:
        super().__init__(root, name, cache_dir, rebuild)
        self.split_files = dict(split_files or {s: f"RadiologyAI_{s}.csv" for s in SPLITS})
        bad = set(self.split_files) - set(SPLITS)
        if bad:
            raise ManifestError(f"dataset.split_files: unknown split(s) {sorted(bad)}; use {list(SPLITS)}")
        self.ignore_list = Path(ignore_list) if ignore_list else None
        self.missing = check_policy(missing, "dataset.missing", MISSING_POLICIES)

    def options(self) -> dict:
        return {"split_files": self.split_files, "ignore_list": str(self.ignore_list), "missing": self.missing}

    def inputs(self) -> list[Path]:
        files = [self.root / f for f in self.split_files.values()]
        if self.ignore_list:
            files.append(self.ignore_list)
        return files + folders(self.root, 3)  # CT/MR: MOD/anatomy/pathology; US: MOD/organ

    def scan(self) -> Scan:
        ignored = self._ignored()
        frames, scan = [], Scan(pd.DataFrame())
        for split, fname in self.split_files.items():
            csv = self.root / fname
            if not csv.is_file():
                raise ManifestError(
                    f"dataset {self.name}: split file {csv} not found; put the official "
                    f"RadiologyAI_{split}.csv in dataset.root ({self.root})"
                )
            table = pd.read_csv(csv, dtype=str, keep_default_na=False)
            if "filename" not in table.columns:
                raise ManifestError(
                    f"{csv}: no 'filename' column (found {list(table.columns)}); "
                    "expected the official header filename,label"
                )
            names = table["filename"].str.strip()
            is_ignored = names.isin(ignored)
            scan.drop("in the ignore list", is_ignored.sum(), names[is_ignored])
            names = names[~is_ignored]
            repeated = names.duplicated()
            scan.drop("listed twice in one split file", repeated.sum(), names[repeated])
            names = names[~repeated]
            frames.append(pd.DataFrame({"filename": names.to_numpy(), "split": split}))
        table = pd.concat(frames, ignore_index=True)
        classes = [radimagenet_class(f) for f in table["filename"]]
        bad = pd.Series([c is None for c in classes], dtype=bool)
        scan.drop("path not radiology_ai/<MOD>/<anatomy>/[<pathology>/]<file>", bad.sum(), table["filename"][bad])
        table = table[~bad.to_numpy()].reset_index(drop=True)
        classes = [c for c in classes if c is not None]
        modality, anatomy, finding = (list(x) for x in zip(*classes)) if classes else ([], [], [])
        scan.table = pd.DataFrame(
            {
                # `filename` starts with the distribution's top folder; paths are relative to it
                "path": [f.split("/", 1)[1] for f in table["filename"]],
                "dataset": self.name,
                "split": table["split"],
                "modality": modality,
                "anatomy": anatomy,
                "label": [class_name(m, a, f) for m, a, f in zip(modality, anatomy, finding)],
            }
        )
        apply_missing_policy(scan, self.root, self.missing, self.name)
        return scan

    def _ignored(self) -> set[str]:
        if self.ignore_list is None:
            return set()
        if not self.ignore_list.is_file():
            raise ManifestError(
                f"dataset.ignore_list={self.ignore_list}: file not found; "
                "give a text file with one radiology_ai/... path per line, or null"
            )
        with open(self.ignore_list, encoding="utf-8") as f:
            return {line.strip() for line in f if line.strip()}
