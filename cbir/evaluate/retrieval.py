"""One retrieval evaluation: index subset -> FAISS index -> k-NN search -> metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cbir.common.pages import release_pages
from cbir.evaluate import index as cbir_index
from cbir.evaluate.metrics import evaluate

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


def choose_rows(
    table: pd.DataFrame, valid: np.ndarray, index_split: str, query_split: str, per_class, seed: int
) -> RetrievalSetup:
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


def rows_of_job(cfg, table: pd.DataFrame, valid: np.ndarray, per_class) -> RetrievalSetup:
    """The index and query rows of a job's config (index.split, eval.query_split, index.seed) at
    `per_class` rows per class (a number, or None for all)."""
    return choose_rows(table, valid, cfg.index.split, cfg.eval.query_split, per_class, cfg.index.seed)


@dataclass
class SearchOutput:
    """What the search found, for whoever needs more than the metrics (gallery, saved index)."""

    setup: RetrievalSetup
    index: object  # the FAISS index over setup.index_rows (in that order)
    scores: np.ndarray  # (Q, k) similarities, best first
    neighbours: np.ndarray  # (Q, k) positions into setup.index_rows, -1 for none


def own_positions(index_rows: np.ndarray, query_rows: np.ndarray) -> np.ndarray:
    """Index position of each query that is also an index row (overlapping splits), else -1:
    such a query must not retrieve itself."""
    position = pd.Series(np.arange(len(index_rows)), index=index_rows)
    return position.reindex(query_rows).fillna(-1).astype(np.int64).to_numpy()


class NormalisedRows:
    """Rows `rows` of `embeddings` (an array or the cache's memory map), L2-normalised block by
    block as they are read: the index is built and searched without a full normalised copy."""

    def __init__(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        self.embeddings, self.rows = embeddings, np.asarray(rows)
        self.shape = (len(self.rows), embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, at) -> np.ndarray:
        block = cbir_index.l2_normalise(self.embeddings[self.rows[at]])
        release_pages(self.embeddings)
        return block


RECALL_QUERIES = 1000  # queries whose approximate neighbours are checked against exact search
RECALL_WARNING = 0.99


def exact_neighbours(
    index_rows: NormalisedRows, queries: np.ndarray, own: np.ndarray, k: int, block: int = cbir_index.ADD_BLOCK
) -> np.ndarray:
    """(len(queries), k) exact nearest index positions by inner product, the index rows scanned
    block by block (no copy of them all); `own` excluded; ties by position, as in search."""
    import faiss

    best_s, best_i = [], []
    for start in range(0, len(index_rows), block):
        part = faiss.IndexFlatIP(queries.shape[1])
        part.add(index_rows[start : start + block])
        local = np.where((own >= start) & (own < start + part.ntotal), own - start, -1)
        s, i = cbir_index.search(part, queries, min(k, part.ntotal), exclude=local)
        best_s.append(s)
        best_i.append(np.where(i >= 0, i + start, -1))
    scores, ids = np.concatenate(best_s, axis=1), np.concatenate(best_i, axis=1)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1)


def recall_at(exact: np.ndarray, found: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact first k neighbours that were found in its first k."""
    exact, found = exact[:, :k], found[:, :k]
    return float(
        np.mean([len(set(e[e >= 0]) & set(f[f >= 0])) / max(1, int((e >= 0).sum())) for e, f in zip(exact, found)])
    )


def recall_sample(n_queries: int, sample: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n_queries)[:sample])


def neighbour_recall(
    index_rows: NormalisedRows,
    queries: NormalisedRows,
    own: np.ndarray,
    neighbours: np.ndarray,
    k: int = 10,
    sample: int = RECALL_QUERIES,
    seed: int = 0,
    block: int = cbir_index.ADD_BLOCK,
) -> float:
    """recall@k of an approximate search on sampled queries: the share of each one's exact k
    nearest index rows that the search returned in its first k."""
    picked = recall_sample(len(queries), sample, seed)
    k = min(k, len(index_rows), neighbours.shape[1])
    return recall_at(exact_neighbours(index_rows, queries[picked], own[picked], k, block), neighbours[picked], k)


TUNE_RECALL = 0.995  # what the tuning asks of the sample: a margin over RECALL_WARNING for the sample's own noise
MIN_TUNED_NPROBE = 4


def tuned_nprobe(index, q: np.ndarray, own_q: np.ndarray, exact: np.ndarray, nprobe: int, nlist: int) -> int:
    """The smallest nprobe, among the size-based default halved or doubled, whose recall@10 on the
    sampled queries `q` (exact neighbours `exact`) reaches TUNE_RECALL (or every list is scanned).
    Search time grows with nprobe, so a default that is more than enough is lowered (each trial
    searches only the sample); one that is not enough is raised. Trustworthy on any data, not only
    on data like the one the default was chosen on."""
    k = exact.shape[1]

    def recall(probes: int) -> float:
        cbir_index.apply_params(index, {"nprobe": probes})
        _, found = cbir_index.search(index, q, k, exclude=own_q)
        return recall_at(exact, found, k)

    reached = recall(nprobe)
    while reached >= TUNE_RECALL and nprobe > MIN_TUNED_NPROBE:  # more than enough: try half
        lower = max(MIN_TUNED_NPROBE, nprobe // 2)
        if recall(lower) < TUNE_RECALL:
            break
        nprobe = lower
    while reached < TUNE_RECALL and nprobe < nlist:
        log.info(
            "index=ivf: nprobe=%d gives recall@10 %.4f on %d sampled queries; trying %d",
            nprobe,
            reached,
            len(q),
            min(nlist, 2 * nprobe),
        )
        nprobe = min(nlist, 2 * nprobe)
        reached = recall(nprobe)
    cbir_index.apply_params(index, {"nprobe": nprobe})
    return nprobe


def run_retrieval(
    table: pd.DataFrame,
    embeddings: np.ndarray,
    setup: RetrievalSetup,
    index_cfg,
    ns,
    curve_k: int = 0,
    levels=("modality", "anatomy"),
    batch_size: int = 4096,
    return_search: bool = False,
    patients: np.ndarray | None = None,
    timings: dict | None = None,
):
    """Metrics of one index/query setup; with return_search=True, (metrics, SearchOutput).
    patients (manifest patient ids, eval.exclude_same_patient): a query's patient's index rows
    leave its neighbours and its n_c.
    `timings`, when given, receives the seconds of each stage (index, exact sample, tuning, search, metrics).
    The embeddings (a memory map of the cache) are read block by block: the index holds the only
    full copy of the index rows, queries are normalised and searched `batch_size` at a time.
    An approximate index also gets `index/recall_at_10` against exact search on a query sample
    (a warning below 0.99); an IVF whose nprobe is unset gets the smallest nprobe, from the size
    halved or doubled, that reaches 0.995 on that sample (tuned_nprobe)."""
    import time

    timings = {} if timings is None else timings
    started = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal started
        timings[name] = time.perf_counter() - started
        started = time.perf_counter()

    release_pages(embeddings)  # e.g. read through by the cache's checksum
    vectors = NormalisedRows(embeddings, setup.index_rows)
    queries = NormalisedRows(embeddings, setup.query_rows)
    given = dict(index_cfg.get("params") or {})
    params = cbir_index.sized_params(index_cfg.type, given, len(vectors))
    index = cbir_index.build_index(vectors, index_cfg.type, index_cfg.get("use_gpu", "auto"), params)
    stage("index_s")
    own = own_positions(setup.index_rows, setup.query_rows)
    if index_cfg.type != "flat":  # exact neighbours of sampled queries, to measure (and tune) recall
        picked = recall_sample(len(queries))
        exact = exact_neighbours(vectors, queries[picked], own[picked], min(10, len(vectors)))
        stage("exact_sample_s")
        if index_cfg.type == "ivf" and given.get("nprobe") is None and not cbir_index.gpu_available():
            params["nprobe"] = tuned_nprobe(
                index, queries[picked], own[picked], exact, int(params["nprobe"]), int(params["nlist"])
            )
            stage("tune_s")
    k = max(max(ns), curve_k)
    removed, depth = None, k
    if patients is not None:
        from cbir.evaluate.audit import patient_pairs

        removed = patient_pairs(patients, setup.query_rows, setup.index_rows)
        extra = int(np.bincount(removed[0]).max()) if len(removed[0]) else 0  # the most rows one query loses
        depth = min(k + extra, len(setup.index_rows))
    scores = np.empty((len(queries), depth), dtype=np.float32)
    neighbours = np.empty((len(queries), depth), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        block = slice(start, start + batch_size)
        scores[block], neighbours[block] = cbir_index.search(
            index, queries[block], depth, batch_size, exclude=own[block]
        )
    if removed is not None:
        scores, neighbours = drop_pairs(scores, neighbours, removed, len(setup.index_rows), k)
    stage("search_s")
    columns = ["label", "modality", "anatomy"]
    result = evaluate(
        table.iloc[setup.query_rows][columns],
        table.iloc[setup.index_rows][columns],
        neighbours,
        own,
        ns=ns,
        levels=levels,
        curve_k=curve_k,
        removed_pairs=removed,
    )
    stage("metrics_s")
    if index_cfg.type != "flat":
        recall = recall_at(exact, neighbours[picked], exact.shape[1])
        result.metrics["index/recall_at_10"] = recall
        if "nlist" in params:
            result.metrics["index/nlist"], result.metrics["index/nprobe"] = params["nlist"], params.get("nprobe")
            log.info(
                "index %s: nlist=%s nprobe=%s (from %d index rows where unset), recall@10 %.4f",
                index_cfg.type,
                params["nlist"],
                params.get("nprobe"),
                len(vectors),
                recall,
            )
        if recall < RECALL_WARNING:
            log.warning(
                "index=%s: recall@10 against exact search is %.3f (< %.2f) on %d sampled queries; the P@N "
                "values are approximate: raise index.params.nprobe (or use index=flat)",
                index_cfg.type,
                recall,
                RECALL_WARNING,
                min(RECALL_QUERIES, len(queries)),
            )
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
    return (
        np.where(keep, np.take_along_axis(scores, order, axis=1), -np.inf),
        np.where(keep, np.take_along_axis(neighbours, order, axis=1), -1),
    )
