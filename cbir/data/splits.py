"""Seeded splits: the study's patient split (scikit-learn's train_test_split, as the study ran it)
and a per-class split for user collections."""

from __future__ import annotations

import zlib
from math import floor

import numpy as np
import pandas as pd

from cbir.data.manifest import ManifestError


def split_patients(patient_ids, train_size: float = 0.9, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids) from `sklearn.model_selection.train_test_split(ids,
    train_size=train_size, random_state=seed)`, which is what the study ran."""
    from sklearn.model_selection import train_test_split

    ids = np.asarray(patient_ids)
    n = len(ids)
    n_train = floor(train_size * n)  # sklearn's rounding: the val part takes the remainder
    if n_train == 0 or n_train == n:
        raise ManifestError(
            f"cannot split {n} patient(s) {train_size:g}/{1 - train_size:g} into train and val: "
            "both parts would need at least one patient; add data or change dataset.train_fraction"
        )
    train_ids, val_ids = train_test_split(ids, train_size=train_size, random_state=seed)
    return train_ids, val_ids


def stratified_split(labels: pd.Series, fractions: dict[str, float], seed: int) -> pd.Series:
    """Split value per row, drawn per class with a seed derived from (seed, class name), so a
    class's split does not change when other classes are added. Each class with >= 2 rows
    gets at least one train and one test row (when those fractions are > 0)."""
    unknown = set(fractions) - {"train", "val", "test"}
    if unknown or not fractions or any(v < 0 for v in fractions.values()):
        raise ManifestError(f"dataset.split_fractions={fractions}: use non-negative train/val/test fractions")
    total = sum(fractions.values())
    fr = {k: fractions.get(k, 0.0) / total for k in ("train", "val", "test")}
    out = pd.Series("train", index=labels.index, dtype=object)
    for label, index in labels.groupby(labels, sort=True).groups.items():
        size = len(index)
        n_test = int(round(size * fr["test"]))
        n_val = int(round(size * fr["val"]))
        if size >= 2 and fr["test"] > 0:
            n_test = max(1, n_test)
        if fr["train"] > 0 and size >= 1:
            n_test = min(n_test, size - 1)
            n_val = min(n_val, size - 1 - n_test)
        else:
            n_val = size - n_test
        values = ["test"] * n_test + ["val"] * n_val + ["train"] * (size - n_test - n_val)
        rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
        out.loc[index] = np.array(values, dtype=object)[rng.permutation(size)]
    return out.astype(str)
