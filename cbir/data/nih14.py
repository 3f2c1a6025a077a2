"""NIH ChestX-ray14 as distributed: `Data_Entry_2017.csv` (or the `_v2020` file),
`train_val_list.txt`, `test_list.txt` and the PNGs anywhere below the root
(`images/` when the 12 archives are unpacked together, `images_00N/images/` as on Kaggle).

The study's rules: the official test list is the test split; the images of
`train_val_list.txt` are split 90/10 into train/val by patient (unique `Patient ID`s in CSV
order, sklearn's `train_test_split(train_size=0.9, random_state=42)`), before the
single-label filter; 15 classes (`No Finding` + 14 findings, `Effusion` -> `Pleural
Effusion`, `Pleural_Thickening` -> `Pleural Thickening`); images with more than one finding
are dropped. Images missing on disk are counted and dropped (the study kept them with the
path "File Missing").
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cbir.data.base import (
    MISSING_POLICIES,
    DatasetReader,
    Scan,
    apply_missing_policy,
    check_policy,
    first_existing,
    folders,
)
from cbir.data.findings import label_columns
from cbir.data.manifest import ManifestError
from cbir.data.splits import split_patients

# `Finding Labels` names in the study's column order, and the names the classes get
FINDINGS = {
    "No Finding": "No Finding",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Infiltration": "Infiltration",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Emphysema": "Emphysema",
    "Fibrosis": "Fibrosis",
    "Pleural_Thickening": "Pleural Thickening",
    "Hernia": "Hernia",
}
DATA_ENTRY_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
NEEDED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


class NIH14Dataset(DatasetReader):
    def __init__(
        self,
        root,
        name: str = "nih14",
        cache_dir=None,
        rebuild: bool = False,
        data_entry: str | None = None,
        train_fraction: float = 0.9,
        seed: int = 42,
        missing: str = "drop",
        labels: str = "single",
    ) -> None:
        super().__init__(root, name, cache_dir, rebuild, labels)
        self.data_entry = data_entry
        self.train_fraction = float(train_fraction)
        self.seed = int(seed)
        self.missing = check_policy(missing, "dataset.missing", MISSING_POLICIES)

    def options(self) -> dict:
        return {
            "data_entry": self.data_entry,
            "train_fraction": self.train_fraction,
            "seed": self.seed,
            "missing": self.missing,
        }

    def inputs(self) -> list[Path]:
        files = [self.root / n for n in (*DATA_ENTRY_NAMES, "train_val_list.txt", "test_list.txt")]
        return files + folders(self.root, 2)  # images/ or images_00N/images/

    def scan(self) -> Scan:
        entries = self._read_entries()
        train_val_names = self._read_list("train_val_list.txt")
        test_names = self._read_list("test_list.txt")

        train_val = entries[entries["Image Index"].isin(train_val_names)]
        train_ids, val_ids = split_patients(train_val["Patient ID"].unique(), self.train_fraction, self.seed)
        parts = [
            train_val[train_val["Patient ID"].isin(train_ids)].assign(split="train"),
            train_val[train_val["Patient ID"].isin(val_ids)].assign(split="val"),
            entries[entries["Image Index"].isin(test_names)].assign(split="test"),
        ]
        table = pd.concat(parts, ignore_index=True)
        scan = Scan(pd.DataFrame())
        unlisted = ~entries["Image Index"].isin(train_val_names | test_names)
        scan.drop("in neither train_val_list.txt nor test_list.txt", unlisted.sum(), entries["Image Index"][unlisted])

        # The study matched each class name as a substring of `Finding Labels`; for the 15
        # official names (none is a substring of another) that equals matching whole tokens.
        tokens = table["Finding Labels"].str.split("|")
        known = tokens.map(lambda ts: [FINDINGS[t] for t in ts if t in FINDINGS])
        if self.labels == "multi":  # every image with its findings
            keep = known.map(len) >= 1
            scan.drop("none of the 15 names", (~keep).sum(), table["Image Index"][~keep])
        else:
            keep = known.map(len) == 1
            scan.drop("more than one finding (or none of the 15 names)", (~keep).sum(), table["Image Index"][~keep])
        table, findings = table[keep], known[keep]

        paths = self._find_images()
        scan.table = pd.DataFrame(
            {
                "path": table["Image Index"].map(lambda n: paths.get(n, "images/" + n)),
                "dataset": self.name,
                "split": table["split"],
                "modality": "XR",
                "anatomy": "chest",
                **label_columns("XR", "chest", findings, self.labels),
                "patient": table["Patient ID"].astype(str),  # for the leakage audit
            }
        ).reset_index(drop=True)
        apply_missing_policy(scan, self.root, self.missing, self.name)
        return scan

    def _read_entries(self) -> pd.DataFrame:
        names = (self.data_entry,) if self.data_entry else DATA_ENTRY_NAMES
        csv = first_existing(self.root, names, f"dataset {self.name}", "dataset.data_entry")
        # index_col=False: data rows end with a comma; never let pandas take column 1 as index
        table = pd.read_csv(csv, index_col=False, dtype={"Image Index": str, "Finding Labels": str})
        missing = [c for c in NEEDED_COLUMNS if c not in table.columns]
        if missing:
            raise ManifestError(
                f"{csv}: missing column(s) {missing}; expected the official NIH header "
                "starting 'Image Index,Finding Labels,Follow-up #,Patient ID,...'"
            )
        return table.loc[:, list(NEEDED_COLUMNS)]

    def _read_list(self, fname: str) -> set[str]:
        path = self.root / fname
        if not path.is_file():
            raise ManifestError(
                f"dataset {self.name}: {path} not found; put the official {fname} in dataset.root ({self.root})"
            )
        with open(path, encoding="utf-8") as f:
            return {line.strip() for line in f if line.strip()}

    def _find_images(self) -> dict[str, str]:
        """Image file name -> path relative to root, found anywhere below root (as the study
        did with a recursive search; the archives unpack into different folder shapes)."""
        found = {}
        for folder, subdirs, files in os.walk(self.root):
            subdirs.sort()
            rel = os.path.relpath(folder, self.root)
            for f in files:
                if f.endswith(".png"):
                    found[f] = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
        return found
