"""Any image collection laid out as `root/<modality>/<anatomy>/<pathology>/.../<image>`.

The class is `<modality>/<anatomy>/<pathology>` from the first three folder levels, spelled
as the folders are (images may sit in deeper sub-folders, e.g. one per patient). Splits:
- `split_file` (a CSV with columns `path,split`, paths relative to root): used as given;
  images not listed are counted and dropped;
- otherwise a seeded split per class with `split_fractions` (each class with >= 2 images
  gets at least one train and one test image). It does not know patients: if a patient has
  several images, give a split_file to keep patients on one side.
With `labels=multi`, an image's findings are its pathology folder, or the `findings` cell
(names joined by `|`) of `findings_file` (a CSV with columns path,findings) when it lists it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pandas as pd

from cbir.data.base import DatasetReader, Scan
from cbir.data.findings import join_findings, multi_label
from cbir.data.manifest import SPLITS, ManifestError, class_name
from cbir.data.splits import stratified_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


class FolderDataset(DatasetReader):
    def __init__(
        self,
        root,
        name: str = "folder",
        cache_dir=None,
        rebuild: bool = False,
        extensions=IMAGE_SUFFIXES,
        split_fractions: dict | None = None,
        seed: int = 0,
        split_file: str | None = None,
        labels: str = "single",
        findings_file: str | None = None,
    ) -> None:
        super().__init__(root, name, cache_dir, rebuild, labels)
        self.findings_file = Path(findings_file) if findings_file else None
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.split_fractions = dict(split_fractions or {"train": 0.7, "val": 0.1, "test": 0.2})
        self.seed = int(seed)
        self.split_file = Path(split_file) if split_file else None

    def options(self) -> dict:
        return {
            "extensions": self.extensions,
            "split_fractions": self.split_fractions,
            "seed": self.seed,
            "split_file": str(self.split_file),
            **({"findings_file": str(self.findings_file)} if self.labels == "multi" else {}),
        }

    def inputs(self) -> list[Path]:
        dirs = sorted(Path(d) for d, _, _ in os.walk(self.root))
        return (
            dirs
            + ([self.split_file] if self.split_file else [])
            + ([self.findings_file] if self.findings_file and self.labels == "multi" else [])
        )

    def scan(self) -> Scan:
        scan = Scan(pd.DataFrame())
        paths, shallow = [], []
        for folder, subdirs, files in os.walk(self.root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            rel = Path(folder).relative_to(self.root).as_posix()
            for f in sorted(files):
                if f.startswith(".") or not f.lower().endswith(self.extensions):
                    continue
                path = f if rel == "." else f"{rel}/{f}"
                (paths if path.count("/") >= 3 else shallow).append(path)
        scan.drop("image not inside <modality>/<anatomy>/<pathology>/", len(shallow), shallow)
        if not paths:
            raise ManifestError(
                f"dataset {self.name}: no images ({', '.join(self.extensions)}) found in "
                f"{self.root}/<modality>/<anatomy>/<pathology>/; check dataset.root"
            )
        parts = [p.split("/") for p in paths]
        table = pd.DataFrame(
            {
                "path": paths,
                "dataset": self.name,
                "modality": [p[0] for p in parts],
                "anatomy": [p[1] for p in parts],
                "label": [class_name(*p[:3]) for p in parts],
            }
        )
        if self.split_file is None:  # stratified by folder class, so both label modes split alike
            table["split"] = stratified_split(table["label"], self.split_fractions, self.seed)
        if self.labels == "multi":
            given = self._read_findings_file()
            table["findings"] = [join_findings(given.get(path, p[2]).split("|")) for path, p in zip(paths, parts)]
            table["label"] = [
                multi_label(m, a, f.split("|"))
                for m, a, f in zip(table["modality"], table["anatomy"], table["findings"])
            ]
        if self.split_file is not None:
            table["split"] = table["path"].map(self._read_split_file())
            unlisted = table["split"].isna()
            scan.drop(f"not listed in {self.split_file.name}", unlisted.sum(), table["path"][unlisted])
            table = table[~unlisted]
        scan.table = table.reset_index(drop=True)
        return scan

    def _read_findings_file(self) -> dict[str, str]:
        if self.findings_file is None:
            return {}
        table = _read_path_table(
            self.findings_file, "dataset.findings_file", "findings", "path,findings (findings joined by |)"
        )
        paths = [PurePosixPath(p.replace("\\", "/")).as_posix() for p in table["path"]]
        return {p: f for p, f in zip(paths, table["findings"]) if f.strip()}

    def _read_split_file(self) -> dict[str, str]:
        table = _read_path_table(
            self.split_file, "dataset.split_file", "split", "path,split (paths relative to dataset.root)"
        )
        bad = sorted(set(table["split"]) - set(SPLITS))
        if bad:
            raise ManifestError(f"{self.split_file}: unknown split value(s) {bad}; use {list(SPLITS)}")
        paths = [PurePosixPath(p.replace("\\", "/")).as_posix() for p in table["path"]]  # "./a/b" -> "a/b"
        return dict(zip(paths, table["split"]))


def _read_path_table(path: Path, key: str, column: str, columns_help: str) -> pd.DataFrame:
    """A side CSV of the folder dataset (columns path and `column`), read as text."""
    if not path.is_file():
        raise ManifestError(f"{key}={path}: file not found; give a CSV with columns {columns_help}, or null")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", column) if c not in table.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; the file {key} names needs columns path,{column}")
    return table
