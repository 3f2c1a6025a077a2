"""CheXpert v1.0 (and the downsampled CheXpert-v1.0-small) as distributed:
`<root>/CheXpert-v1.0[-small]/{train.csv,valid.csv,train/,valid/}`, whose `Path` column
already starts with the release folder (`CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg`).

The study's rules: `valid.csv` is the test split; `train.csv` is split 90/10 into train/val
by patient (sklearn's `train_test_split(train_size=0.9, random_state=42)` on the unique
patients, in CSV order, of the rows that pass the first filter); `Support Devices` is not a
class; 13 classes; all views kept. Uncertain (-1) labels, `dataset.uncertain`:
- `drop` (the study): a train row is kept only if it has exactly one 1.0 and no -1.0. The
  study got this as a side effect of summing the labels (-1 included) before the split, and
  the patients it splits are those of the rows with (#positive - #uncertain) == 1; this is
  reproduced so that the split matches.
- `zero`: -1 counts as negative (as MIMIC-CXR is treated).
`dataset.labels=multi` keeps every row with at least one 1.0 (with `drop`: and no -1.0). The
patients the study splits keep their split; patients only multi mode keeps are split apart
(same fraction and seed), so an image kept in both modes is in the same split in both.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pandas as pd

from cbir.data.base import MISSING_POLICIES, DatasetReader, Scan, apply_missing_policy, check_policy
from cbir.data.findings import label_columns, positive_lists
from cbir.data.manifest import ManifestError
from cbir.data.splits import split_patients

RELEASES = ("CheXpert-v1.0", "CheXpert-v1.0-small")
METADATA_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")  # then the 14 labels
NOT_A_CLASS = ("Support Devices",)
UNCERTAIN_POLICIES = ("drop", "zero")


class CheXpertDataset(DatasetReader):
    def __init__(
        self,
        root,
        name: str = "chexpert",
        cache_dir=None,
        rebuild: bool = False,
        release: str | None = None,
        uncertain: str = "drop",
        train_fraction: float = 0.9,
        seed: int = 42,
        missing: str = "error",
        labels: str = "single",
    ) -> None:
        super().__init__(root, name, cache_dir, rebuild, labels)
        self.release = release
        self.uncertain = check_policy(uncertain, "dataset.uncertain", UNCERTAIN_POLICIES)
        self.train_fraction = float(train_fraction)
        self.seed = int(seed)
        self.missing = check_policy(missing, "dataset.missing", MISSING_POLICIES)

    @property
    def csv_dir(self) -> Path:
        """The release folder holding train.csv/valid.csv (`root` itself is accepted too)."""
        candidates = (self.release,) if self.release else RELEASES
        for release in candidates:
            if (self.root / release / "train.csv").is_file():
                return self.root / release
        if not self.release and (self.root / "train.csv").is_file() and self.root.name in RELEASES:
            return self.root
        raise ManifestError(
            f"dataset {self.name}: no train.csv in {[str(self.root / r) for r in candidates]}; set dataset.root "
            "to the folder that contains CheXpert-v1.0/ (or CheXpert-v1.0-small/), or dataset.release=<folder>"
        )

    @property
    def manifest_root(self) -> Path:
        return self.csv_dir.parent  # `Path` values start with the release folder

    def options(self) -> dict:
        return {
            "release": self.release,
            "uncertain": self.uncertain,
            "train_fraction": self.train_fraction,
            "seed": self.seed,
            "missing": self.missing,
        }

    def inputs(self) -> list[Path]:
        d = self.csv_dir
        return [d / "train.csv", d / "valid.csv", d, d / "train", d / "valid"]

    def scan(self) -> Scan:
        scan = Scan(pd.DataFrame())
        train = self._read(self.csv_dir / "train.csv")
        test = self._read(self.csv_dir / "valid.csv")
        classes = [c for c in train.columns[len(METADATA_COLUMNS) :] if c not in NOT_A_CLASS]

        values = train[classes].fillna(0.0)
        if self.uncertain == "zero":
            values = values.where(values != -1, 0.0)
        # The study's first filter (sum == 1, -1 included) decides which patients are split.
        first_pass = values.sum(axis=1) == 1
        patients = train["Path"].map(lambda p: PurePosixPath(p).parts[2])
        train_ids, val_ids = split_patients(patients[first_pass].unique(), self.train_fraction, self.seed)
        split = pd.Series(pd.NA, index=train.index, dtype=object)
        split[first_pass & patients.isin(train_ids)] = "train"
        split[first_pass & patients.isin(val_ids)] = "val"

        n_positive = (values == 1).sum(axis=1)
        if self.labels == "multi":
            keep = n_positive.ge(1) & (values != -1).all(axis=1)
            rest = patients[keep & split.isna()].unique()  # patients the study never split
            if len(rest):
                rest_train, rest_val = _split_rest(rest, self.train_fraction, self.seed)
                split[keep & split.isna() & patients.isin(rest_train)] = "train"
                split[keep & split.isna() & patients.isin(rest_val)] = "val"
            wording = "no positive finding"
        else:
            keep = n_positive.eq(1) & (values != -1).all(axis=1) & first_pass
            wording = "not exactly one positive finding"
        uncertain = (values == -1).any(axis=1) & n_positive.ge(1)
        scan.drop("uncertain (-1) label", (~keep & uncertain).sum(), train["Path"][~keep & uncertain])
        scan.drop(f"{wording} (train.csv)", (~keep & ~uncertain).sum(), train["Path"][~keep & ~uncertain])
        train = train[keep].assign(split=split[keep], finding=positive_lists(values[keep] == 1))

        test_values = test[classes].fillna(0.0)
        n_test_positive = (test_values == 1).sum(axis=1)
        test_keep = n_test_positive >= 1 if self.labels == "multi" else n_test_positive == 1
        scan.drop(f"{wording} (valid.csv)", (~test_keep).sum(), test["Path"][~test_keep])
        test = test[test_keep].assign(split="test", finding=positive_lists(test_values[test_keep] == 1))

        table = pd.concat([train[train["split"] == "train"], train[train["split"] == "val"], test], ignore_index=True)
        scan.table = pd.DataFrame(
            {
                "path": table["Path"],
                "dataset": self.name,
                "split": table["split"],
                "modality": "XR",
                "anatomy": "chest",
                **label_columns("XR", "chest", table["finding"], self.labels),
                "patient": table["Path"].map(_patient_of),  # for the leakage audit
            }
        )
        apply_missing_policy(scan, self.manifest_root, self.missing, self.name)
        return scan

    def _read(self, csv: Path) -> pd.DataFrame:
        if not csv.is_file():
            raise ManifestError(
                f"dataset {self.name}: {csv} not found; the release folder needs train.csv and valid.csv"
            )
        table = pd.read_csv(csv, dtype={"Path": str})
        if tuple(table.columns[: len(METADATA_COLUMNS)]) != METADATA_COLUMNS:
            raise ManifestError(
                f"{csv}: header starts {list(table.columns[:5])}; expected the official CheXpert "
                f"header {list(METADATA_COLUMNS)} followed by the 14 label columns"
            )
        return table


def _patient_of(path: str) -> str:
    """`CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg` -> patient00001 ('' if none)."""
    return next((part for part in PurePosixPath(path).parts if part.startswith("patient")), "")


def _split_rest(patients, train_fraction: float, seed: int):
    """Split of the patients only multi mode keeps; too few to split: all train."""
    n_train = int(train_fraction * len(patients))
    if n_train == 0 or n_train == len(patients):
        return patients, patients[:0]
    return split_patients(patients, train_fraction, seed)
