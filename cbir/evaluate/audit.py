"""Leakage audit of a job (SPEC section 11): query images that are not independent of the index.

- patient: the query's patient id (manifest column `patient`, when the dataset has one) is also
  the patient of an index row; one case per (query, index row) pair.
- content: the query's file bytes equal an index row's file bytes. Only files whose size equals
  a file's on the other side are read and hashed (sha256), so the audit reads a few files, not
  the dataset; a query that is itself an index row (overlapping splits) is not a case.
- near_duplicate: the cosine between the query and its nearest index row is at least
  `eval.audit.near_duplicate` (0.999 by default).
Metrics are not changed by the audit (see `eval.exclude_same_patient` for that).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
KINDS = ("patient", "content", "near_duplicate")
CASE_COLUMNS = ["query_row", "query_path", "index_row", "index_path", "kind"]


def patient_ids(table: pd.DataFrame) -> np.ndarray | None:
    """The manifest's patient column as text ('' where unknown), None when there is none."""
    if "patient" not in table:
        return None
    ids = table["patient"].astype("string").fillna("").str.strip().to_numpy(dtype=object)
    return ids if (ids != "").any() else None


def patient_pairs(
    patients: np.ndarray, query_rows: np.ndarray, index_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, index positions) of every query/index pair sharing a known patient id
    (a query's own row, in overlapping splits, left out)."""
    queries = pd.DataFrame(
        {
            "q": np.arange(len(query_rows)),
            "patient": patients[query_rows],
            "row": query_rows,
        }
    )
    index = pd.DataFrame(
        {
            "i": np.arange(len(index_rows)),
            "patient": patients[index_rows],
            "irow": index_rows,
        }
    )
    queries, index = queries[queries["patient"] != ""], index[index["patient"] != ""]
    pairs = queries.merge(index, on="patient")
    pairs = pairs[pairs["row"] != pairs["irow"]]
    return pairs["q"].to_numpy(np.int64), pairs["i"].to_numpy(np.int64)


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def content_pairs(
    paths: np.ndarray, sizes: np.ndarray, query_rows: np.ndarray, index_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, index positions) of byte-identical files: equal size (`sizes`, -1 for
    an unreadable file), then equal sha256."""
    q_size, i_size = sizes[query_rows], sizes[index_rows]
    shared = np.intersect1d(q_size[q_size >= 0], i_size[i_size >= 0])
    q_pick, i_pick = (
        np.flatnonzero(np.isin(q_size, shared)),
        np.flatnonzero(np.isin(i_size, shared)),
    )
    if not len(q_pick) or not len(i_pick):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    hashes = {row: file_hash(str(paths[row])) for row in np.unique(np.r_[query_rows[q_pick], index_rows[i_pick]])}
    queries = pd.DataFrame(
        {
            "q": q_pick,
            "row": query_rows[q_pick],
            "hash": [hashes[r] for r in query_rows[q_pick]],
        }
    )
    index = pd.DataFrame(
        {
            "i": i_pick,
            "irow": index_rows[i_pick],
            "hash": [hashes[r] for r in index_rows[i_pick]],
        }
    )
    pairs = queries[queries["hash"] != ""].merge(index[index["hash"] != ""], on="hash")
    pairs = pairs[pairs["row"] != pairs["irow"]]
    return pairs["q"].to_numpy(np.int64), pairs["i"].to_numpy(np.int64)


def near_duplicate_pairs(first_neighbour: np.ndarray, first_cosine: np.ndarray, threshold: float):
    hit = (np.asarray(first_neighbour) >= 0) & (np.asarray(first_cosine) >= threshold)
    return np.flatnonzero(hit), np.asarray(first_neighbour)[hit]


def audit(
    table: pd.DataFrame,
    root: Path,
    query_rows: np.ndarray,
    index_rows: np.ndarray,
    first_neighbour: np.ndarray | None,
    first_cosine: np.ndarray | None,
    near_duplicate: float = 0.999,
    sizes: np.ndarray | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The cases (CASE_COLUMNS, manifest rows and paths) and `audit/...` metrics: per kind the
    number of cases, of queries affected and their fraction, and whether the kind was checked."""
    paths = table["path"].astype(str).to_numpy()
    patients = patient_ids(table)
    full_paths = np.array([os.path.join(str(root), p) for p in paths])
    if sizes is None:
        sizes = np.array(
            [os.stat(p).st_size if os.path.exists(p) else -1 for p in full_paths],
            dtype=np.int64,
        )
    found: dict[str, tuple[np.ndarray, np.ndarray] | None] = {
        "patient": patient_pairs(patients, query_rows, index_rows) if patients is not None else None,
        "content": content_pairs(full_paths, sizes, query_rows, index_rows) if (sizes >= 0).any() else None,
        "near_duplicate": (
            near_duplicate_pairs(first_neighbour, first_cosine, near_duplicate)
            if first_neighbour is not None and first_cosine is not None
            else None
        ),
    }
    metrics: dict[str, float] = {}
    cases = []
    for kind, pairs in found.items():
        metrics[f"audit/{kind}/checked"] = float(pairs is not None)
        if pairs is None:
            continue
        q, i = pairs
        affected = len(np.unique(q))
        metrics[f"audit/{kind}/cases"] = float(len(q))
        metrics[f"audit/{kind}/queries"] = float(affected)
        metrics[f"audit/{kind}/fraction"] = affected / max(len(query_rows), 1)
        cases.append(
            pd.DataFrame(
                {
                    "query_row": query_rows[q],
                    "query_path": paths[query_rows[q]],
                    "index_row": index_rows[i],
                    "index_path": paths[index_rows[i]],
                    "kind": kind,
                }
            )
        )
    frame = pd.concat(cases, ignore_index=True) if cases else pd.DataFrame(columns=CASE_COLUMNS)
    return frame.sort_values(["kind", "query_row", "index_row"]).reset_index(drop=True), metrics


def warning_line(metrics: dict[str, float], n_queries: int, csv: Path) -> str | None:
    """One line naming what was found, None when nothing was."""
    parts = [
        f"{int(metrics[f'audit/{k}/queries'])} queries by {k.replace('_', '-')}"
        for k in KINDS
        if metrics.get(f"audit/{k}/queries", 0) > 0
    ]
    if not parts:
        return None
    return (
        f"leakage audit: of {n_queries} queries, {', '.join(parts)} (shared patient, identical file, or cosine "
        f">= eval.audit.near_duplicate with the nearest index row); cases: {csv}"
    )
