"""Scale of the published-artifact path, measured on fabricated study files.

    python -m cbir.bench_published --rows 100000 --dim 512 --out /tmp/published_bench

Writes split CSVs and HDF5 embeddings in the study's exact shape (`fabricate`), then measures:
manifest read, HDF5 load into the embedding cache (time, peak memory of that step), and the
Table-1 evaluation (exact flat index over the whole train split, then a per_class subset, then
IVF against exact: neighbour recall and P@N difference). Each step runs in its own process so its
peak memory is its own. Results go to <out>/published_scale.json and are extrapolated to the
study's 1.6M rows: reading and memory grow linearly with rows; exact search with
queries x index rows (both grow with the data: quadratic); a per_class index stops growing once
each class has per_class rows, so its search grows linearly with the queries.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np

from cbir.study_format import model_folder, write_split_csv

STUDY_ROWS = 1_600_000
# (dataset column, CSV stem, modality, anatomy, findings) of the fabricated classes
FABRICATED = [
    ("nih14", "XR", "chest", ["No Finding", "Atelectasis", "Cardiomegaly", "Pleural Effusion", "Nodule"]),
    ("radiology_ai", "CT", "abd", ["normal", "liver_lesion", "renal_lesion"]),
    ("radiology_ai", "MR", "knee", ["normal", "meniscal_abnormality"]),
    ("radiology_ai", "US", "thyroid", ["normal", "nodule"]),
]


def fabricate(out: Path, rows: int, dim: int, encoder: str = "biomedclip", seed: int = 0, spread: float = 1.5,
              file_missing: int = 0) -> dict:
    """Study-shaped artifacts under `out`: datasets/<dataset>.csv and embeddings/<Model>/<dataset>.h5.
    Embeddings are class centroids plus noise (`spread`), L2-normalised, so retrieval is neither
    trivial nor chance. `file_missing` NIH rows get the study's `File Missing` path (no embedding)."""
    import pandas as pd

    from cbir.study_format import FILE_MISSING, STUDY_CSV_NAMES, write_h5

    rng = np.random.default_rng(seed)
    classes = [(ds, m, a, f"{m}/{a}/{f}") for ds, m, a, fs in FABRICATED for f in fs]
    weights = rng.uniform(0.3, 3.0, len(classes))
    picked = rng.choice(len(classes), size=rows, p=weights / weights.sum())
    centroids = rng.standard_normal((len(classes), dim)).astype(np.float32)
    table = pd.DataFrame({
        "dataset": [classes[c][0] for c in picked], "modality": [classes[c][1] for c in picked],
        "anatomy": [classes[c][2] for c in picked], "label": [classes[c][3] for c in picked],
        "split": rng.choice(["train", "val", "test"], size=rows, p=[0.8, 0.1, 0.1]),
    })
    table["path"] = [f"{ds}/images_{i // 10000:03d}/{i:08d}.png" for i, ds in enumerate(table["dataset"])]
    files: dict = {"csv": [], "h5": []}
    model = model_folder(encoder)
    for dataset, part in table.groupby("dataset", sort=False):
        vectors = np.empty((len(part), dim), dtype=np.float32)
        codes = part["label"].map({c[3]: i for i, c in enumerate(classes)}).to_numpy()
        for start in range(0, len(part), 65536):  # bounded memory at any size
            block = centroids[codes[start:start + 65536]]
            block = block + spread * rng.standard_normal(block.shape).astype(np.float32)
            vectors[start:start + 65536] = block / np.linalg.norm(block, axis=1, keepdims=True)
        files["h5"].append(write_h5(out / "embeddings" / model / f"{dataset}.h5", part["path"], vectors))
        csv_rows = part
        if dataset == "nih14" and file_missing:
            extra = part.iloc[:file_missing].copy()
            extra["path"] = FILE_MISSING
            csv_rows = pd.concat([part, extra], ignore_index=True)
        files["csv"].append(write_split_csv(csv_rows.reset_index(drop=True), out / "datasets" / STUDY_CSV_NAMES[dataset]))
    return {"rows": rows, "dim": dim, "files": {k: [str(p) for p in v] for k, v in files.items()}}
