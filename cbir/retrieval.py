"""One retrieval evaluation: index subset -> FAISS index -> k-NN search -> metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cbir import index as cbir_index
from cbir.metrics import evaluate

log = logging.getLogger(__name__)


@dataclass
class RetrievalSetup:
    index_rows: np.ndarray  # manifest positions in the index
    query_rows: np.ndarray  # manifest positions of the queries


def per_class_value(value):
    """index.per_class: null or "all" mean the whole split."""
    if value is None or (isinstance(value, str) and value.lower() in ("all", "none", "null")):
        return None
    return int(value)


def choose_rows(table: pd.DataFrame, valid: np.ndarray, index_split: str, query_split: str,
                per_class, seed: int) -> RetrievalSetup:
    usable = np.asarray(valid, dtype=bool)
    split = table["split"].to_numpy()
    candidates = np.flatnonzero((split == index_split) & usable)
    chosen = candidates[cbir_index.sample_per_class(table["label"].to_numpy()[candidates], per_class, seed)]
    queries = np.flatnonzero((split == query_split) & usable)
    if len(chosen) == 0:
        raise ValueError(f"index.split={index_split}: no usable rows in that split")
    if len(queries) == 0:
        raise ValueError(f"eval.query_split={query_split}: no usable rows in that split")
    return RetrievalSetup(index_rows=chosen, query_rows=queries)


@dataclass
class SearchOutput:
    """What the search found, for whoever needs more than the metrics (gallery, saved index)."""
    setup: RetrievalSetup
    index: object             # the FAISS index over setup.index_rows (in that order)
    scores: np.ndarray        # (Q, k) similarities, best first
    neighbours: np.ndarray    # (Q, k) positions into setup.index_rows, -1 for none


def own_positions(index_rows: np.ndarray, query_rows: np.ndarray) -> np.ndarray:
    """Index position of each query that is also an index row (overlapping splits), else -1:
    such a query must not retrieve itself."""
    position = pd.Series(np.arange(len(index_rows)), index=index_rows)
    return position.reindex(query_rows).fillna(-1).astype(np.int64).to_numpy()


def run_retrieval(table: pd.DataFrame, embeddings: np.ndarray, setup: RetrievalSetup, index_cfg,
                  ns, curve_k: int = 0, levels=("modality", "anatomy"), batch_size: int = 4096,
                  return_search: bool = False, patients: np.ndarray | None = None):
    """Metrics of one index/query setup; with return_search=True, (metrics, SearchOutput).
    patients (manifest patient ids, eval.exclude_same_patient): a query's patient's index rows
    leave its neighbours and its n_c."""
    vectors = cbir_index.l2_normalise(embeddings[setup.index_rows])
    queries = cbir_index.l2_normalise(embeddings[setup.query_rows])
    index = cbir_index.build_index(vectors, index_cfg.type, index_cfg.get("use_gpu", "auto"),
                                   dict(index_cfg.get("params") or {}))
    own = own_positions(setup.index_rows, setup.query_rows)
    k = max(max(ns), curve_k)
    removed = None
    if patients is None:
        scores, neighbours = cbir_index.search(index, queries, k, batch_size, exclude=own)
    else:
        from cbir.audit import patient_pairs

        removed = patient_pairs(patients, setup.query_rows, setup.index_rows)
        extra = int(np.bincount(removed[0]).max()) if len(removed[0]) else 0  # the most rows one query loses
        scores, neighbours = drop_pairs(*cbir_index.search(index, queries, min(k + extra, len(setup.index_rows)),
                                                           batch_size, exclude=own), removed, len(setup.index_rows), k)
    columns = ["label", "modality", "anatomy"]
    result = evaluate(table.iloc[setup.query_rows][columns], table.iloc[setup.index_rows][columns],
                      neighbours, own, ns=ns, levels=levels, curve_k=curve_k, removed_pairs=removed)
    return (result, SearchOutput(setup, index, scores, neighbours)) if return_search else result


def drop_pairs(scores: np.ndarray, neighbours: np.ndarray, pairs, n_index: int, k: int):
    """The first k neighbours of each query that are not among its removed (query, index
    position) pairs, order kept; -1 / -inf where fewer remain."""
    q_pos, i_pos = pairs
    keys = np.unique(q_pos.astype(np.int64) * n_index + i_pos)
    found = np.arange(len(neighbours), dtype=np.int64)[:, None] * n_index + neighbours
    drop = (neighbours < 0) | np.isin(found, keys)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept ones first, in their order
    keep = ~np.take_along_axis(drop, order, axis=1)
    return (np.where(keep, np.take_along_axis(scores, order, axis=1), -np.inf),
            np.where(keep, np.take_along_axis(neighbours, order, axis=1), -1))
