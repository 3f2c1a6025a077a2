"""A manifest written by the user: a CSV (or Parquet) file with the columns
path, split, modality, anatomy, label (and optionally dataset; missing -> `name`).

`path` is relative to `root` (default: the manifest file's folder) or absolute inside it;
a path that leaves `root` is an error. `label` is the retrieval class, best written as
`<MODALITY>/<anatomy>/<finding>` so that it merges with the study's classes.
With `labels=multi` a `findings` column is required: the image's finding names joined by `|`
(e.g. `Edema|Pleural Effusion`; empty = the finding of `label`); `label` then becomes
`<MODALITY>/<anatomy>/<sorted findings>`.
An optional `patient` column (patient id, blank = unknown) lets the leakage audit report queries
whose patient also has index rows, and `eval.exclude_same_patient=true` leave those rows out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cbir.data.base import MISSING_POLICIES, DatasetReader, Scan, apply_missing_policy, check_policy
from cbir.data.findings import fill_findings
from cbir.data.manifest import MANIFEST_COLUMNS, ManifestError, class_name, path_inside

REQUIRED = tuple(c for c in MANIFEST_COLUMNS if c != "dataset")
# the texts pandas.read_csv reads as missing by default (its documented na_values), plus "none"
MISSING_MARKERS = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
        "none",
    }
)


class CSVManifestDataset(DatasetReader):
    def __init__(
        self,
        file,
        root=None,
        name: str = "csv",
        cache_dir=None,
        rebuild: bool = False,
        missing: str = "error",
        labels: str = "single",
    ) -> None:
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
        table = self._read()
        missing = [c for c in REQUIRED if c not in table.columns]
        if missing:
            raise ManifestError(
                f"{self.file}: missing column(s) {missing}; a manifest needs columns {list(REQUIRED)} "
                f"(plus optional 'dataset'); add them to the header line"
            )
        if "dataset" not in table.columns:
            table["dataset"] = self.name
        for column in MANIFEST_COLUMNS:
            self._check_filled(table[column], column)
        table = table.astype({c: str for c in MANIFEST_COLUMNS})
        table["path"] = [self._inside_root(p, i) for i, p in enumerate(table["path"])]
        if self.labels == "multi":
            if "findings" not in table.columns:
                raise ManifestError(
                    f"{self.file}: dataset.labels=multi needs a 'findings' column (finding names "
                    "joined by |, e.g. Edema|Pleural Effusion); add it or use dataset.labels=single"
                )
            table = fill_findings(table.astype({"findings": str}))
            table["label"] = [
                class_name(m, a, f) for m, a, f in zip(table["modality"], table["anatomy"], table["findings"])
            ]
        scan = Scan(table.reset_index(drop=True))
        apply_missing_policy(scan, self.root, self.missing, self.name)
        return scan

    def _read(self) -> pd.DataFrame:
        """Every value as the text written (a label "NaN" or "NA" stays text here and is then
        refused by _check_filled, rather than becoming a float NaN or a class named "nan")."""
        try:
            if self.file.suffix.lower() == ".parquet":
                return pd.read_parquet(self.file)
            return pd.read_csv(self.file, dtype=str, keep_default_na=False)
        except Exception as e:  # pandas/pyarrow raise many types for a file that is not a table
            kind = "Parquet" if self.file.suffix.lower() == ".parquet" else "UTF-8 CSV"
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise ManifestError(
                f"dataset.file={self.file}: not a readable {kind} file ({reason}); give a "
                f"{kind} table with the columns {list(REQUIRED)}"
            ) from None

    def _check_filled(self, values: pd.Series, column: str) -> None:
        """Every row needs a value: empty cells, nulls and the texts pandas reads as missing
        ("NaN", "NA", "null", ...) are refused with the first row that has one, never made a class."""
        text = values.astype(str).str.strip()
        bad = values.isna().to_numpy() | (text == "").to_numpy() | text.isin(MISSING_MARKERS).to_numpy()
        if bad.any():
            row = int(bad.argmax())
            raise ManifestError(
                f"{self.file}, row {self._row_number(row)}: {column} is {values.iloc[row]!r}, an empty or missing value; "
                f"give every row a {column} (a class literally named like a missing value needs another name)"
            )

    def _row_number(self, position: int) -> int:
        """What a person sees: the line in the CSV file (the header is line 1), the 1-based Parquet row."""
        return position + (1 if self.file.suffix.lower() == ".parquet" else 2)

    def _inside_root(self, path: str, row: int) -> str:
        inside = path_inside(self.root, path)
        if inside is None:
            raise ManifestError(
                f"{self.file}, row {self._row_number(row)}: path {path!r} is outside the manifest root "
                f"{os.path.abspath(self.root)}; make paths relative to dataset.root (default: the manifest's "
                "folder) or set dataset.root"
            )
        return inside
