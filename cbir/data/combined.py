"""The study's benchmark: the four datasets concatenated (NIH14, MIMIC-CXR, RadImageNet,
CheXpert, in the study's order). Classes merge by exact name, so the 20 chest classes are
shared across the three chest sets (e.g. NIH `Effusion`, renamed `Pleural Effusion`, is the
same class as CheXpert's and MIMIC's `Pleural Effusion`).

`labels=multi` passes the mode to the chest parts (RadImageNet is single-finding by
construction: its rows get their class's finding). Each part keeps its own cached manifest; the combined manifest's paths are relative to
`root` (the study's `$DATA` folder holding radiology_ai/, nih14/, mimic/ and CheXpert/).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cbir.data.base import DatasetReader
from cbir.data.findings import check_labels_mode, fill_findings
from cbir.data.manifest import Manifest, ManifestError


class CombinedDataset:
    def __init__(self, root, name: str = "combined", parts: dict | None = None, labels: str = "single") -> None:
        self.root = Path(root)
        self.name = name
        self.labels = check_labels_mode(labels)
        self.parts: dict[str, DatasetReader] = {k: v for k, v in (parts or {}).items() if v is not None}
        if not self.parts:
            raise ManifestError("dataset.parts: no dataset to combine; keep at least one part")
        self.last_scans: dict = {}

    def load_manifest(self) -> Manifest:
        manifests = {key: part.load_manifest() for key, part in self.parts.items()}
        self.last_scans = {key: getattr(part, "last_scan", None) for key, part in self.parts.items()}
        base = self.manifest_root(m.root for m in manifests.values())
        tables = []
        for m in manifests.values():
            prefix = os.path.relpath(m.root.resolve(), base).replace(os.sep, "/")
            table = m.table.copy()
            if prefix != ".":
                table["path"] = prefix + "/" + table["path"]
            tables.append(table)
        table = pd.concat(tables, ignore_index=True)
        if self.labels == "multi":
            table = fill_findings(table)
        return Manifest(table=table, root=base, source=f"dataset {self.name} ({', '.join(self.parts)})")

    def manifest_root(self, roots) -> Path:
        """`root` when every part lies inside it, else the parts' common folder."""
        roots = [Path(r).resolve() for r in roots]
        own = self.root.resolve()
        if all(r == own or own in r.parents for r in roots):
            return own
        return Path(os.path.commonpath([str(r) for r in roots]))
