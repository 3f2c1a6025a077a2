"""One retrieval evaluation: index subset -> FAISS index -> k-NN search -> metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cbir import index as cbir_index
from cbir.metrics import RetrievalResult, evaluate

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
                  return_search: bool = False):
    """Metrics of one index/query setup; with return_search=True, (metrics, SearchOutput)."""
    vectors = cbir_index.l2_normalise(embeddings[setup.index_rows])
    queries = cbir_index.l2_normalise(embeddings[setup.query_rows])
    index = cbir_index.build_index(vectors, index_cfg.type, index_cfg.get("use_gpu", "auto"),
                                   dict(index_cfg.get("params") or {}))
    own = own_positions(setup.index_rows, setup.query_rows)
    k = max(max(ns), curve_k)
    scores, neighbours = cbir_index.search(index, queries, k, batch_size, exclude=own)
    columns = ["label", "modality", "anatomy"]
    result = evaluate(table.iloc[setup.query_rows][columns], table.iloc[setup.index_rows][columns],
                      neighbours, own, ns=ns, levels=levels, curve_k=curve_k)
    return (result, SearchOutput(setup, index, scores, neighbours)) if return_search else result
