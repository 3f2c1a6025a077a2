"""Modified precision at N and its breakdowns (SPEC section 3), vectorised.

For a query of class c with n_c rows of class c in the index and nearest rows r_1..r_k:
    n = min(N, n_c),   P@N = |{i <= n : class(r_i) = c}| / n.
Queries with n_c = 0 are excluded from every average and counted. micro = mean over
queries, macro = mean over classes of the per-class mean. Spreads follow the study's code
(pandas `.std()`, i.e. ddof=1): micro std over queries, macro = mean over classes of the
per-class std (classes with a single query have no std and are left out of that mean).
Coarser levels (modality, modality/anatomy) count a hit when the retrieved row shares the
query's key at that level, with n_c counted at that level too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

LEVELS = {
    "class": ("label",),
    "modality": ("modality",),
    "anatomy": ("modality", "anatomy"),  # anatomy within a modality, e.g. CT/abd
}


def metric_name(n: int) -> str:
    """MLflow rejects '@' in metric names: P@N is logged as P_at_N."""
    return f"P_at_{n}"


@dataclass
class RetrievalResult:
    metrics: dict[str, float]
    per_class: pd.DataFrame
    curve: pd.DataFrame  # columns N, micro, macro
    n_queries: int
    n_excluded: int
    excluded_classes: list[str] = field(default_factory=list)
    # one row per query: class, modality, anatomy, first (index position of the nearest row), P@N
    per_query: pd.DataFrame = field(default_factory=pd.DataFrame)


def modified_precision(hits: np.ndarray, n_relevant: np.ndarray, ns) -> np.ndarray:
    """(len(ns), Q) array of P@N per query; NaN where the query's class is not in the index.

    hits: (Q, k) bool, hits[q, i] = the i-th neighbour of q has q's class.
    n_relevant: (Q,) number of index rows of q's class (q itself excluded)."""
    ns = [int(n) for n in ns]
    q = hits.shape[0]
    out = np.full((len(ns), q), np.nan)
    if q == 0:
        return out
    cum = np.cumsum(hits, axis=1, dtype=np.int64)
    k = hits.shape[1]
    for j, n_value in enumerate(ns):
        n = np.minimum(n_value, n_relevant)
        ok = n > 0
        if np.any(n[ok] > k):
            raise ValueError(f"P@{n_value} needs {int(n[ok].max())} neighbours, search returned {k}")
        rows = np.flatnonzero(ok)
        out[j, rows] = cum[rows, n[rows] - 1] / n[rows]
    return out


def _codes(*columns: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Joint categorical codes for a key spread over several frames' columns."""
    keys = pd.concat(columns, ignore_index=True)
    codes, uniques = pd.factorize(keys, sort=True)
    return codes, np.asarray(uniques)


def _level_key(frame: pd.DataFrame, level: str) -> pd.Series:
    cols = LEVELS[level]
    key = frame[cols[0]].astype(str)
    for c in cols[1:]:
        key = key + "/" + frame[c].astype(str)
    return key.reset_index(drop=True)


def removed_relevant(q_codes: np.ndarray, i_codes: np.ndarray, removed_pairs) -> np.ndarray:
    """Per query, how many of its removed index rows (pairs of query and index positions, e.g.
    its patient's other images) match its key: they leave n_c as they leave its neighbours."""
    if removed_pairs is None:
        return np.zeros(len(q_codes), dtype=np.int64)
    q_pos, i_pos = removed_pairs
    same = i_codes[i_pos] == q_codes[q_pos]
    return np.bincount(q_pos[same], minlength=len(q_codes))


def level_precision(
    query: pd.DataFrame,
    index: pd.DataFrame,
    neighbours: np.ndarray,
    query_in_index: np.ndarray,
    ns,
    level: str = "class",
    removed_pairs=None,
):
    """Per-query P@N at a level. Returns (P (len(ns), Q), query codes, code names, n_relevant)."""
    codes, names = _codes(_level_key(query, level), _level_key(index, level))
    q_codes, i_codes = codes[: len(query)], codes[len(query) :]
    neighbour_codes = np.where(neighbours >= 0, i_codes[np.clip(neighbours, 0, None)], -1)
    hits = neighbour_codes == q_codes[:, None]
    n_relevant = np.bincount(i_codes, minlength=len(names))[q_codes] - (query_in_index >= 0)
    n_relevant = n_relevant - removed_relevant(q_codes, i_codes, removed_pairs)
    return modified_precision(hits, n_relevant, ns), q_codes, names, n_relevant


def summarise(p: np.ndarray, q_codes: np.ndarray) -> dict[str, np.ndarray]:
    """micro/macro mean and spread over queries for each N (rows of p); NaN rows excluded."""
    out = {"micro": [], "macro": [], "micro_std": [], "macro_std": []}
    for row in p:
        ok = ~np.isnan(row)
        values, codes = row[ok], q_codes[ok]
        if len(values) == 0:
            for key in out:
                out[key].append(np.nan)
            continue
        frame = pd.DataFrame({"p": values, "c": codes}).groupby("c")["p"]
        out["micro"].append(values.mean())
        out["micro_std"].append(values.std(ddof=1) if len(values) > 1 else np.nan)
        out["macro"].append(frame.mean().mean())
        out["macro_std"].append(frame.std(ddof=1).mean())  # NaN for 1-query classes, skipped
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def precision_curve(
    query, index, neighbours, query_in_index, k: int, chunk: int = 65536, removed_pairs=None
) -> pd.DataFrame:
    """micro and macro P@N for N = 1..k, computed in query chunks (bounded memory)."""
    codes, names = _codes(_level_key(query, "class"), _level_key(index, "class"))
    q_codes, i_codes = codes[: len(query)], codes[len(query) :]
    removed = removed_relevant(q_codes, i_codes, removed_pairs)
    n_index = np.bincount(i_codes, minlength=len(names))
    k = min(k, neighbours.shape[1])
    class_sum = np.zeros((len(names), k))
    class_count = np.zeros(len(names))
    total, count = np.zeros(k), 0
    for start in range(0, len(query), chunk):
        sl = slice(start, start + chunk)
        nb = neighbours[sl, :k]
        nb_codes = np.where(nb >= 0, i_codes[np.clip(nb, 0, None)], -1)
        qc = q_codes[sl]
        n_rel = n_index[qc] - (query_in_index[sl] >= 0) - removed[sl]
        ok = n_rel > 0
        hits = (nb_codes == qc[:, None])[ok]
        n_rel, qc = n_rel[ok], qc[ok]
        cum = np.cumsum(hits, axis=1)
        n = np.minimum(np.arange(1, k + 1)[None, :], n_rel[:, None])  # (q, k)
        p = np.take_along_axis(cum, n - 1, axis=1) / n
        total += p.sum(0)
        count += len(p)
        np.add.at(class_sum, qc, p)
        class_count += np.bincount(qc, minlength=len(names))
    present = class_count > 0
    micro = total / max(count, 1)
    macro = (class_sum[present] / class_count[present, None]).mean(0) if present.any() else np.full(k, np.nan)
    return pd.DataFrame({"N": np.arange(1, k + 1), "micro": micro, "macro": macro})


def evaluate(
    query: pd.DataFrame,
    index: pd.DataFrame,
    neighbours: np.ndarray,
    query_in_index: np.ndarray | None = None,
    ns=(1, 3, 5, 10),
    levels=("modality", "anatomy"),
    curve_k: int = 0,
    removed_pairs=None,
) -> RetrievalResult:
    """All metrics of one retrieval run.

    query, index: frames with label, modality, anatomy (row order = positions).
    neighbours: (Q, k) positions into `index`, nearest first, -1 for none; the query itself
    already removed when it is in the index (its position then given in query_in_index).
    removed_pairs: (query positions, index positions) also removed from the neighbours (e.g. the
    query's patient's other images, eval.exclude_same_patient): n_c is counted without them."""
    query = query.reset_index(drop=True)
    index = index.reset_index(drop=True)
    ns = sorted(int(n) for n in ns)
    if query_in_index is None:
        query_in_index = np.full(len(query), -1)
    query_in_index = np.asarray(query_in_index)
    metrics: dict[str, float] = {}

    p, q_codes, names, n_relevant = level_precision(
        query, index, neighbours, query_in_index, ns, removed_pairs=removed_pairs
    )
    excluded = np.isnan(p[0]) if len(ns) else np.zeros(len(query), bool)

    def put(prefix: str, stats: dict[str, np.ndarray], spread: bool = False) -> None:
        for j, n in enumerate(ns):
            for kind in ("micro", "macro") + (("micro_std", "macro_std") if spread else ()):
                metrics[f"{prefix}{kind}/{metric_name(n)}"] = float(stats[kind][j])

    put("", summarise(p, q_codes), spread=True)
    for column, prefix in (("modality", "modality"), ("anatomy", "anatomy")):
        for value in sorted(query[column].astype(str).unique()):
            mask = (query[column].astype(str) == value).to_numpy()
            put(f"{prefix}/{value}/", summarise(p[:, mask], q_codes[mask]))
    for level in levels:
        lp, lq, _, _ = level_precision(query, index, neighbours, query_in_index, ns, level, removed_pairs)
        put(f"level/{level}/", summarise(lp, lq))

    metrics["queries/total"] = float(len(query))
    metrics["queries/excluded"] = float(excluded.sum())
    metrics["index/size"] = float(len(index))
    metrics["index/classes"] = float(index["label"].nunique())
    metrics["index/max_per_class"] = float(index["label"].value_counts().max()) if len(index) else 0.0

    per_class = _per_class_table(query, index, neighbours, p, q_codes, names, n_relevant, ns)
    curve = (
        precision_curve(query, index, neighbours, query_in_index, curve_k, removed_pairs=removed_pairs)
        if curve_k > 0
        else pd.DataFrame(columns=["N", "micro", "macro"])
    )
    excluded_classes = sorted(set(query.loc[excluded, "label"].astype(str)))
    per_query = pd.DataFrame(
        {
            "class": query["label"].astype(str).to_numpy(),
            "modality": query["modality"].astype(str).to_numpy(),
            "anatomy": query["anatomy"].astype(str).to_numpy(),
            "first": neighbours[:, 0] if neighbours.shape[1] else np.full(len(query), -1),
            **{f"P@{n}": p[j] for j, n in enumerate(ns)},
        }
    )
    return RetrievalResult(metrics, per_class, curve, len(query), int(excluded.sum()), excluded_classes, per_query)


def _per_class_table(query, index, neighbours, p, q_codes, names, n_relevant, ns) -> pd.DataFrame:
    labels = query["label"].astype(str).to_numpy()
    first = neighbours[:, 0] if neighbours.shape[1] else np.full(len(query), -1)
    first_label = np.where(first >= 0, index["label"].astype(str).to_numpy()[np.clip(first, 0, None)], "")
    frame = pd.DataFrame(
        {
            "class": labels,
            "modality": query["modality"].astype(str).to_numpy(),
            "anatomy": query["anatomy"].astype(str).to_numpy(),
            "first": first_label,
        }
    )
    for j, n in enumerate(ns):
        frame[f"P@{n}"] = p[j]
    n_index = index["label"].astype(str).value_counts()
    grouped = frame.groupby("class", sort=True)
    table = grouped[[f"P@{n}" for n in ns]].mean()
    table.insert(0, "n_index", n_index.reindex(table.index).fillna(0).astype(int))
    table.insert(0, "queries", grouped.size())
    table.insert(0, "anatomy", grouped["anatomy"].first())
    table.insert(0, "modality", grouped["modality"].first())
    wrong = frame[(frame["first"] != frame["class"]) & (frame["first"] != "")]
    confused = wrong.groupby("class")["first"].agg(lambda s: s.value_counts().index[0])
    confused_count = wrong.groupby("class")["first"].agg(lambda s: int(s.value_counts().iloc[0]))
    table["most_confused"] = confused.reindex(table.index).fillna("")
    table["most_confused_count"] = confused_count.reindex(table.index).fillna(0).astype(int)
    return table.reset_index()
