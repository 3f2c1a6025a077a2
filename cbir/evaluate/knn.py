"""k-NN classification on the retrieval neighbours (SPEC section 9, the study's
`evaluate_knn_classification.py`).

A query's class-probability vector is the mean one-hot label of its first n neighbours:
  - mode `study`: n = min(k, n_c), n_c = index rows of the query's TRUE class (as modified P@N;
    the number of votes depends on the true class, which a deployed classifier could not know);
  - mode `plain`: n = k for every query.
k is chosen on the val split by micro-F1 over k = 1..k_max; the smallest best k wins a tie. (The
study's code keeps the 0-based row of the best k, i.e. one less than the k that scored best; cbir
uses the k that scored best.)
Tied votes go to the first class in class order: sorted names, or with `dataset=study_splits`
the order of the split CSV's class columns (the study's arg-max over its columns, e.g. `No
Finding` first), so cbir reproduces the study's k-NN numbers from its published files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MODES = ("study", "plain")


def in_column_order(classes: np.ndarray, order) -> tuple[np.ndarray, np.ndarray]:
    """The sorted `classes` rearranged into `order` (e.g. the study's CSV columns; classes not in
    it last, by name), and rank: new code of each sorted code. The arg-max then breaks a tie
    towards the class that comes first in `order`, as numpy's arg-max over the study's columns."""
    position = {str(c): i for i, c in enumerate(order)}
    new_order = np.argsort([position.get(str(c), len(position)) for c in classes], kind="stable")
    rank = np.empty(len(classes), dtype=np.int64)
    rank[new_order] = np.arange(len(classes))
    return np.asarray(classes)[new_order], rank


def neighbour_codes(index_codes: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Class code of each neighbour, -1 where the search returned none."""
    return np.where(neighbours >= 0, index_codes[np.clip(neighbours, 0, None)], -1)


def votes(n_relevant: np.ndarray, k: int, mode: str) -> np.ndarray:
    """Number of neighbours that vote for each query."""
    if mode not in MODES:
        raise ValueError(f"task.knn.mode={mode}: use one of {MODES}")
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    return np.minimum(k, n_relevant) if mode == "study" else np.full(len(n_relevant), int(k))


def probabilities(codes: np.ndarray, n_relevant: np.ndarray, k: int, n_classes: int, mode: str = "study") -> np.ndarray:
    """(Q, n_classes) mean one-hot label of each query's first n neighbours (see module doc).
    A row with n = 0 (class absent from the index, study mode) is all zeros."""
    codes = np.asarray(codes)
    n = votes(n_relevant, k, mode)
    if np.any(n > codes.shape[1]):
        raise ValueError(f"k={k} needs {int(n.max())} neighbours, the search returned {codes.shape[1]}")
    counts = np.zeros((len(codes), n_classes))
    voting = (np.arange(codes.shape[1])[None, :] < n[:, None]) & (codes >= 0)
    rows, columns = np.nonzero(voting)
    np.add.at(counts, (rows, codes[rows, columns]), 1.0)
    return counts / np.maximum(n, 1)[:, None]


def predictions_by_k(
    codes: np.ndarray, n_relevant: np.ndarray, k_max: int, n_classes: int, mode: str = "study", chunk: int = 4096
) -> np.ndarray:
    """(k_max, Q) arg-max class for every k = 1..k_max, adding one neighbour's vote per step
    (the arg-max of the counts is that of the probabilities: they differ by a positive factor)."""
    codes = np.asarray(codes)
    out = np.empty((k_max, len(codes)), dtype=np.int64)
    for start in range(0, len(codes), chunk):
        block, relevant = codes[start : start + chunk], np.asarray(n_relevant)[start : start + chunk]
        counts = np.zeros((len(block), n_classes))
        rows = np.arange(len(block))
        for k in range(1, k_max + 1):
            adds = (votes(relevant, k, mode) >= k) & (block[:, k - 1] >= 0)  # queries whose n grew to k
            counts[rows[adds], block[adds, k - 1]] += 1.0
            out[k - 1, start : start + chunk] = counts.argmax(axis=1)
    return out


def choose_k(truth: np.ndarray, predictions: np.ndarray) -> tuple[int, pd.DataFrame]:
    """Best k by micro-F1 (smallest k on ties) and the table k, micro_f1, macro_f1."""
    from sklearn.metrics import (
        f1_score,  # scikit-learn takes seconds to import: not before the checks
    )

    table = pd.DataFrame(
        {
            "k": np.arange(1, len(predictions) + 1),
            "micro_f1": [f1_score(truth, p, average="micro") for p in predictions],
            "macro_f1": [f1_score(truth, p, average="macro", zero_division=0) for p in predictions],
        }
    )
    return int(table["k"].iloc[int(table["micro_f1"].to_numpy().argmax())]), table
