"""MIMIC-CXR-JPG 2.0.0 as distributed: the release folder (`.../mimic-cxr-jpg/2.0.0/`) with
`files/p1X/p<subject>/s<study>/<dicom_id>.jpg` and the metadata files
`mimic-cxr-2.0.0-split.csv[.gz]` (one row per image) and `mimic-cxr-2.0.0-chexpert.csv[.gz]`
(one row per study).

The study's rules: the official split (`validate` -> `val`); each image takes the labels of
its study (first label row with the same subject_id and study_id; images whose study has no
label row are skipped); uncertain (-1) and blank count as negative; `Support Devices` is not
a class; only images with exactly one positive of the 13 remaining classes are kept. All
views (frontal and lateral) are kept.
"""

from __future__ import annotations

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
from cbir.data.findings import label_columns, positive_lists
from cbir.data.manifest import ManifestError

SPLIT_VALUES = {"train": "train", "validate": "val", "test": "test"}
NOT_A_CLASS = ("Support Devices",)
UNCERTAIN_POLICIES = ("zero", "drop")


class MimicCXRDataset(DatasetReader):
    def __init__(
        self,
        root,
        name: str = "mimic_cxr",
        cache_dir=None,
        rebuild: bool = False,
        split_csv: str = "mimic-cxr-2.0.0-split.csv",
        labels_csv: str = "mimic-cxr-2.0.0-chexpert.csv",
        uncertain: str = "zero",
        missing: str = "error",
        labels: str = "single",
    ) -> None:
        super().__init__(root, name, cache_dir, rebuild, labels)
        self.split_csv, self.labels_csv = split_csv, labels_csv
        self.uncertain = check_policy(uncertain, "dataset.uncertain", UNCERTAIN_POLICIES)
        self.missing = check_policy(missing, "dataset.missing", MISSING_POLICIES)

    def options(self) -> dict:
        return {
            "split_csv": self.split_csv,
            "labels_csv": self.labels_csv,
            "uncertain": self.uncertain,
            "missing": self.missing,
        }

    def inputs(self) -> list[Path]:
        files = [self.root / (n + gz) for n in (self.split_csv, self.labels_csv) for gz in ("", ".gz")]
        return files + folders(self.root / "files", 1)  # files/ and files/p1X/

    def scan(self) -> Scan:
        split_file = first_existing(
            self.root, (self.split_csv, self.split_csv + ".gz"), f"dataset {self.name}", "dataset.split_csv"
        )
        labels_file = first_existing(
            self.root, (self.labels_csv, self.labels_csv + ".gz"), f"dataset {self.name}", "dataset.labels_csv"
        )
        splits = _read(split_file, ("dicom_id", "study_id", "subject_id", "split"))
        labels = _read(labels_file, ("subject_id", "study_id"))
        # label columns by position, after subject_id and study_id, as the study read them
        classes = [c for c in labels.columns[2:] if c not in NOT_A_CLASS]
        labels = labels.drop_duplicates(["subject_id", "study_id"], keep="first")
        table = splits.merge(labels, on=["subject_id", "study_id"], how="left", validate="many_to_one", indicator=True)
        scan = Scan(pd.DataFrame())
        unlabelled = table["_merge"] == "left_only"
        scan.drop("study has no row in the label file", unlabelled.sum(), table["dicom_id"][unlabelled])
        table = table[~unlabelled]

        unknown = ~table["split"].isin(list(SPLIT_VALUES))
        if unknown.any():
            raise ManifestError(
                f"{split_file}: unknown split value(s) {sorted(set(table['split'][unknown]))}; "
                f"expected {list(SPLIT_VALUES)}"
            )
        values = table[classes].apply(pd.to_numeric, errors="coerce")
        if self.uncertain == "drop":
            uncertain = (values == -1).any(axis=1)
            scan.drop("uncertain (-1) label", uncertain.sum(), table["dicom_id"][uncertain])
            table, values = table[~uncertain], values[~uncertain]
        positive = values == 1  # -1 and blank count as negative
        if self.labels == "multi":  # every image with its findings
            keep = positive.sum(axis=1) >= 1
            scan.drop("no positive finding", (~keep).sum(), table["dicom_id"][~keep])
        else:
            keep = positive.sum(axis=1) == 1
            scan.drop("not exactly one positive finding", (~keep).sum(), table["dicom_id"][~keep])
        table, positive = table[keep], positive[keep]

        subject, study = table["subject_id"].astype(str), table["study_id"].astype(str)
        scan.table = pd.DataFrame(
            {
                "path": "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + table["dicom_id"] + ".jpg",
                "dataset": self.name,
                "split": table["split"].map(SPLIT_VALUES),
                "modality": "XR",
                "anatomy": "chest",
                **label_columns("XR", "chest", positive_lists(positive), self.labels),
                "patient": subject,  # for the leakage audit
            }
        ).reset_index(drop=True)
        apply_missing_policy(scan, self.root, self.missing, self.name)
        return scan


def _read(csv: Path, needed) -> pd.DataFrame:
    table = pd.read_csv(csv, dtype={"dicom_id": str, "split": str})  # .gz is read transparently
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ManifestError(f"{csv}: missing column(s) {missing}; expected the official MIMIC-CXR-JPG 2.0.0 header")
    return table
