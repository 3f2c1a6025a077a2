"""Multi-label retrieval metrics (`dataset.labels=multi`), vectorised, of a job's own search
(`evaluate_search`), with its console table and the report's table.

Every row has a set of findings, each keyed with its modality and anatomy
(`XR/chest/Edema`), so two rows can only share a finding within one modality/anatomy.
For a query q with finding set F_q and its nearest index rows r_1..r_K (K = search depth):

- relevant: rel_i = 1 when F_{r_i} and F_q share at least one finding;
  n_rel(q) = number of index rows sharing a finding with q (q itself left out when it is an
  index row). Queries with n_rel = 0 are excluded from every average and counted.
- P@N (shares a finding), modified as the study's P@N: n = min(N, n_rel(q)),
  P@N = (1/n) sum_{i<=n} rel_i. n_rel is per query (the rows sharing a finding with *this*
  query's set), not per class. On single-label data it is exactly the study's modified P@N.
- mAP@N: AP@N = (1/min(N, n_rel)) sum_{i<=N} rel_i * P@i (plain precision at i); mean over
  queries. With N >= index size this is sklearn's average_precision_score of the ranking.
- nDCG@N (graded): gain g_i = Jaccard(F_q, F_{r_i}) = |F_q & F_r| / |F_q | F_r|,
  DCG@N = sum_{i<=N} g_i / log2(i+1), divided by the DCG@N of the ideal ordering of the whole
  index (its N largest gains); as sklearn's ndcg_score with k=N.
- R-precision: P@R with R = n_rel(q), i.e. the fraction of relevant rows among the first R.
  The search returns K neighbours, so R is capped at K (then it equals P@K); the number of
  queries with n_rel > K is reported (`ml/R_precision/capped`).
- micro = mean over queries; macro = mean over findings of (mean over the queries that have
  that finding); per modality/anatomy: both within the queries of that subset; per finding:
  the table `per_finding.csv`. On single-label data micro/macro P@N equal today's exactly.
Ties in similarity are ordered by index row (as the search returns them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rich.table import Table

from cbir.data.findings import row_findings
from cbir.evaluate import retrieval
from cbir.evaluate.metrics import metric_name, modified_precision
from cbir.evaluate.uncertainty import with_interval

PREFIX = "ml/"


@dataclass
class MultiLabelResult:
    metrics: dict[str, float]
    per_finding: pd.DataFrame
    n_queries: int
    n_excluded: int
    per_query: dict[str, np.ndarray] = field(default_factory=dict)  # metric name -> (Q,) values, NaN excluded


@dataclass
class FindingSets:
    """Finding sets of the query and index rows as bitsets over the finding keys, grouped by
    distinct set (combination): few distinct sets even in large datasets."""

    keys: np.ndarray  # (F,) finding keys "<MOD>/<anatomy>/<finding>", sorted
    combo_bits: np.ndarray  # (C, W) uint64 bitset of each distinct set
    query_combo: np.ndarray  # (Q,) distinct-set id of each query
    index_combo: np.ndarray  # (I,) distinct-set id of each index row

    @classmethod
    def build(cls, query: pd.DataFrame, index: pd.DataFrame) -> FindingSets:
        frame = pd.concat([query, index], ignore_index=True)
        columns = [c for c in ("modality", "anatomy", "label", "findings") if c in frame.columns]
        # parse each distinct row once (few), then merge rows whose parsed sets are equal
        row_kind = frame[columns].astype(str).groupby(columns, sort=False).ngroup().to_numpy()
        distinct = frame.iloc[_first_of(row_kind)].reset_index(drop=True)
        prefix = (distinct["modality"].astype(str) + "/" + distinct["anatomy"].astype(str) + "/").to_numpy()
        members = [[p + f for f in found] for p, found in zip(prefix, row_findings(distinct))]
        kind_combo, _ = pd.factorize(pd.Series(["|".join(m) for m in members]))
        combo = kind_combo[row_kind]
        members = [members[k] for k in _first_of(kind_combo)]
        keys = np.array(sorted({k for m in members for k in m}), dtype=object)
        position = {k: i for i, k in enumerate(keys)}
        bits = np.zeros((len(members), max(1, -(-len(keys) // 64))), dtype=np.uint64)
        for c, m in enumerate(members):
            for k in m:
                bits[c, position[k] // 64] |= np.uint64(1) << np.uint64(position[k] % 64)
        return cls(keys, bits, combo[: len(query)], combo[len(query) :])

    def membership(self) -> np.ndarray:
        """(C, F) bool: which findings each distinct set holds."""
        f = np.arange(len(self.keys))
        words = self.combo_bits[:, f // 64]
        return ((words >> (f % 64).astype(np.uint64)) & np.uint64(1)).astype(bool)


def _first_of(codes: np.ndarray) -> np.ndarray:
    """Position of the first row of each code 0..max(codes)."""
    first = np.full(int(codes.max()) + 1 if len(codes) else 0, len(codes))
    np.minimum.at(first, codes, np.arange(len(codes)))
    return first


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|A & B| and |A | B| of bitsets (..., W)."""
    return (np.bitwise_count(a & b).sum(-1, dtype=np.int64), np.bitwise_count(a | b).sum(-1, dtype=np.int64))


def _ideal_gains(jaccard: np.ndarray, counts: np.ndarray, depth: int) -> np.ndarray:
    """(R, depth) gains of the ideal ranking: row r has counts[r, u] index rows of gain
    jaccard[r, u]; positions past the last row get 0."""
    r, u = jaccard.shape
    order = np.argsort(-jaccard, axis=1, kind="stable")
    gains = np.take_along_axis(jaccard, order, 1)
    cum = np.cumsum(np.take_along_axis(counts, order, 1), axis=1)
    span = int(cum[:, -1].max()) + depth + 1 if u else 1
    offsets = np.arange(r)[:, None] * span
    flat = (cum + offsets).ravel()
    # the position p (0-based) is covered by the first set u with cum[u] > p
    first = np.searchsorted(flat, offsets + np.arange(depth)[None, :], side="right") - np.arange(r)[:, None] * u
    inside = first < u
    out = np.zeros((r, depth))
    out[inside] = gains[np.nonzero(inside)[0], first[inside]]
    return out


def per_query(
    query: pd.DataFrame,
    index: pd.DataFrame,
    neighbours: np.ndarray,
    query_in_index: np.ndarray | None = None,
    ns=(1, 3, 5, 10),
    chunk: int = 16384,
):
    """Per-query values: dict name -> (Q,) array (NaN for excluded queries), FindingSets, n_rel."""
    query, index = query.reset_index(drop=True), index.reset_index(drop=True)
    ns = sorted(int(n) for n in ns)
    q = len(query)
    own = np.full(q, -1) if query_in_index is None else np.asarray(query_in_index)
    sets = FindingSets.build(query, index)
    bits = sets.combo_bits
    index_counts = np.bincount(sets.index_combo, minlength=len(bits))
    # overlap between the distinct sets of the queries (V rows) and all distinct sets (C columns)
    query_sets, query_row = np.unique(sets.query_combo, return_inverse=True)
    jaccard = np.zeros((len(query_sets), len(bits)))
    n_rel = np.zeros(len(query_sets), dtype=np.int64)
    for start in range(0, len(query_sets), 256):  # blocks bound the (V, C, words) temporaries
        block = slice(start, start + 256)
        shared, union = _overlap(bits[query_sets[block], None, :], bits[None, :, :])
        jaccard[block] = shared / np.maximum(union, 1)
        n_rel[block] = (shared > 0).astype(np.int64) @ index_counts
    n_rel_q = n_rel[query_row] - (own >= 0)

    depth = neighbours.shape[1]
    deepest = max(max(ns), 1)
    if deepest > depth:
        raise ValueError(f"metrics up to N={deepest} need {deepest} neighbours, search returned {depth}")
    # ideal gains per (distinct set, query is an index row): its own row leaves the ideal ranking
    ideal = np.zeros((q, deepest))
    for is_own in (False, True):
        rows = np.flatnonzero((own >= 0) == is_own)
        if len(rows) == 0:
            continue
        set_rows, inverse = np.unique(query_row[rows], return_inverse=True)
        counts = np.broadcast_to(index_counts, (len(set_rows), len(bits))).copy()
        if is_own:
            counts[np.arange(len(set_rows)), query_sets[set_rows]] -= 1
        ideal[rows] = _ideal_gains(jaccard[set_rows], counts, deepest)[inverse]
    discount = 1.0 / np.log2(np.arange(2, deepest + 2))
    ideal_dcg = np.cumsum(ideal * discount, axis=1)

    values = {name: np.full(q, np.nan) for name in metric_names(ns)}
    for start in range(0, q, chunk):
        sl = slice(start, min(start + chunk, q))
        nb = neighbours[sl]
        nb_combo = np.where(nb >= 0, sets.index_combo[np.clip(nb, 0, None)], -1)
        gain = np.where(nb_combo >= 0, jaccard[query_row[sl][:, None], np.clip(nb_combo, 0, None)], 0.0)
        hits = gain > 0
        rel = n_rel_q[sl]
        ok = rel > 0
        p = modified_precision(hits, rel, ns + [depth])
        cum = np.cumsum(hits, axis=1)
        precision_at_i = cum / np.arange(1, depth + 1)
        dcg = np.cumsum(gain[:, :deepest] * discount, axis=1)
        for j, n in enumerate(ns):
            values[f"P_at_{n}"][sl] = p[j]
            ap = (hits[:, :n] * precision_at_i[:, :n]).sum(1) / np.maximum(np.minimum(n, rel), 1)
            values[f"mAP_at_{n}"][sl] = np.where(ok, ap, np.nan)
            ndcg = dcg[:, n - 1] / np.where(ideal_dcg[sl, n - 1] > 0, ideal_dcg[sl, n - 1], np.nan)
            values[f"nDCG_at_{n}"][sl] = np.where(ok, ndcg, np.nan)
        values["R_precision"][sl] = p[-1]
    return values, sets, n_rel_q


def metric_names(ns) -> list[str]:
    ns = sorted(int(n) for n in ns)
    return [metric_name(n) for n in ns] + [f"mAP_at_{n}" for n in ns] + [f"nDCG_at_{n}" for n in ns] + ["R_precision"]


def _query_finding_pairs(sets: FindingSets, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query position, finding id) for every finding of every query."""
    _, finding_of_pair = np.nonzero(member)  # row-major: each set's findings contiguous
    sizes = member.sum(1)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    per_query = sizes[sets.query_combo]
    query_of_pair = np.repeat(np.arange(len(sets.query_combo)), per_query)
    within = np.arange(len(query_of_pair)) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    return query_of_pair, finding_of_pair[starts[sets.query_combo][query_of_pair] + within]


def _finding_means(values: np.ndarray, pairs, mask: np.ndarray) -> pd.Series:
    """Mean of the non-NaN values of the queries in mask that have each finding (by finding
    id), grouped as cbir.evaluate.metrics groups by class, so single-label macro values agree bit for bit."""
    query_of_pair, finding_of_pair = pairs
    v = values[query_of_pair]
    ok = mask[query_of_pair] & ~np.isnan(v)
    return pd.Series(v[ok]).groupby(finding_of_pair[ok]).mean()


def evaluate_multilabel(
    query: pd.DataFrame,
    index: pd.DataFrame,
    neighbours: np.ndarray,
    query_in_index: np.ndarray | None = None,
    ns=(1, 3, 5, 10),
) -> MultiLabelResult:
    """All multi-label metrics of one retrieval run (names prefixed `ml/`).

    query, index: frames with modality, anatomy, label and optionally findings (row order =
    positions); neighbours: (Q, K) positions into `index`, nearest first, -1 for none, the
    query itself already removed (its index position in query_in_index)."""
    query, index = query.reset_index(drop=True), index.reset_index(drop=True)
    values, sets, n_rel = per_query(query, index, neighbours, query_in_index, ns)
    member = sets.membership()
    names = list(values)
    excluded = n_rel <= 0
    metrics: dict[str, float] = {}

    pairs = _query_finding_pairs(sets, member)

    def put(prefix: str, mask: np.ndarray) -> dict[str, pd.Series]:
        """Micro and macro values of the queries in mask; returns the per-finding means."""
        finding_means = {}
        for name in names:
            v = values[name][mask]
            v = v[~np.isnan(v)]
            means = finding_means[name] = _finding_means(values[name], pairs, mask)
            metrics[f"{PREFIX}{prefix}micro/{name}"] = float(v.mean()) if len(v) else float("nan")
            metrics[f"{PREFIX}{prefix}macro/{name}"] = float(means.mean()) if len(means) else float("nan")
        return finding_means

    per_finding = put("", np.ones(len(query), bool))  # also the per-finding table's columns
    for column in ("modality", "anatomy"):
        for value in sorted(query[column].astype(str).unique()):
            put(f"{column}/{value}/", (query[column].astype(str) == value).to_numpy())
    set_sizes = member.sum(1)
    metrics[f"{PREFIX}queries/total"] = float(len(query))
    metrics[f"{PREFIX}queries/excluded"] = float(excluded.sum())
    metrics[f"{PREFIX}queries/multi_finding"] = float((set_sizes[sets.query_combo] > 1).sum())
    metrics[f"{PREFIX}index/multi_finding"] = float((set_sizes[sets.index_combo] > 1).sum())
    metrics[f"{PREFIX}index/findings"] = float(member[np.unique(sets.index_combo)].any(0).sum())
    metrics[f"{PREFIX}R_precision/capped"] = float((n_rel > neighbours.shape[1]).sum())

    table = pd.DataFrame({"finding": sets.keys})
    parts = table["finding"].str.split("/", n=2)
    table["modality"], table["anatomy"] = parts.str[0], parts.str[1]
    table["queries"] = np.bincount(pairs[1][~excluded[pairs[0]]], minlength=len(table))
    table["n_index"] = (member.T @ np.bincount(sets.index_combo, minlength=len(member))).astype(int)
    for name in names:
        table[name.replace("_at_", "@")] = per_finding[name].reindex(table.index)
    table = table[table["queries"] > 0].reset_index(drop=True)
    return MultiLabelResult(metrics, table, len(query), int(excluded.sum()), values)


def labels_mode(cfg) -> str:
    return str(cfg.dataset.get("labels") or "single")


def evaluate_search(table: pd.DataFrame, search, ns) -> MultiLabelResult:
    """Multi-label metrics of a run's SearchOutput (same neighbours as the single-label metrics)."""
    columns = [c for c in ("label", "modality", "anatomy", "findings") if c in table.columns]
    setup = search.setup
    return evaluate_multilabel(
        table.iloc[setup.query_rows][columns],
        table.iloc[setup.index_rows][columns],
        search.neighbours,
        retrieval.own_positions(setup.index_rows, setup.query_rows),
        ns,
    )


def summary_table(result: MultiLabelResult, ns, title: str) -> Table:
    m = result.metrics
    deepest = max(int(n) for n in ns)
    columns = [(f"P@{n}", metric_name(n)) for n in sorted(int(n) for n in ns)]
    columns += [
        (f"mAP@{deepest}", f"mAP_at_{deepest}"),
        (f"nDCG@{deepest}", f"nDCG_at_{deepest}"),
        ("R-prec", "R_precision"),
    ]
    table = Table(
        title=title,
        caption=(
            f"micro/macro over {result.n_queries - result.n_excluded} queries "
            "(macro: over findings); relevant = shares a finding, nDCG gain = Jaccard"
        ),
    )
    table.add_column("subset")
    for header, _ in columns:
        table.add_column(header, justify="center")

    def row(label: str, prefix: str) -> None:
        cells = []
        for _, name in columns:
            values = [m.get(f"{PREFIX}{prefix}{avg}/{name}") for avg in ("micro", "macro")]
            if f"{PREFIX}{prefix}micro/{name}_ci_low" in m:  # micro with its interval above macro
                cells.append(
                    with_interval(m, f"{PREFIX}{prefix}micro/{name}")
                    + "\n"
                    + ("-" if values[1] is None or values[1] != values[1] else f"{values[1]:.3f}")
                )
                continue
            cells.append("/".join("-" if v is None or v != v else f"{v:.3f}" for v in values))
        table.add_row(label, *cells)

    row("all queries", "")
    for mod in sorted({k.split("/")[2] for k in m if k.startswith(f"{PREFIX}modality/")}):
        row(f"  {mod}", f"modality/{mod}/")
    return table


def report_table(runs: pd.DataFrame, ns, identity) -> pd.DataFrame:
    """cbir.report.from_runs's multi-label table: the runs with ml/ metrics, P@N (shares a finding)
    micro | macro, then mAP, nDCG and R-precision (micro) at the largest N. `identity(runs)`
    names the columns that tell the runs apart."""
    first = f"{PREFIX}micro/{metric_name(min(ns))}"
    if first not in runs:
        return pd.DataFrame()
    runs = runs[runs[first].notna()]
    if runs.empty:
        return pd.DataFrame()
    deepest = max(int(n) for n in ns)
    columns = {f"{PREFIX}{avg}/{metric_name(n)}": f"{avg} P@{n}" for avg in ("micro", "macro") for n in ns}
    columns.update(
        {
            f"{PREFIX}micro/mAP_at_{deepest}": f"micro mAP@{deepest}",
            f"{PREFIX}micro/nDCG_at_{deepest}": f"micro nDCG@{deepest}",
            f"{PREFIX}micro/R_precision": "micro R-precision",
        }
    )
    for name, label in [(k, v) for k, v in columns.items() if "/micro/" in k]:  # bounds shown by to_markdown
        columns.update({f"{name}_ci_low": f"{label} low", f"{name}_ci_high": f"{label} high"})
    ident = identity(runs)
    table = runs[ident + [c for c in columns if c in runs]].rename(columns=columns)
    return table.sort_values(ident).reset_index(drop=True)
