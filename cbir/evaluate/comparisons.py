"""Paired comparisons across runs that answered the same queries (SPEC section 11), for the
sweep's end table, its parent run and cbir.report.from_runs.

Runs are compared only within a group of one `cbir.query_set` tag (manifest digest, query split,
index split, index size rule and type, labels mode, patient exclusion: see `query_set`) and only
when their per-query records hold the same query rows. For every pair of runs of a group and
each of micro/macro P@1 and P@10: the difference A - B, its paired stratified bootstrap interval,
the sign-flip permutation p and the Holm-adjusted p over the group's pairs of that metric. A run
is "tied for best" on a metric when it is the best or its Holm-adjusted p against the best is
>= 0.05.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pandas as pd

from cbir.evaluate import uncertainty

log = logging.getLogger(__name__)
TAG = "cbir.query_set"
METRICS = (("micro", "P@1"), ("macro", "P@1"), ("micro", "P@10"), ("macro", "P@10"))
SHORT = {
    "micro P@1": "µP@1",
    "macro P@1": "MP@1",
    "micro P@10": "µP@10",
    "macro P@10": "MP@10",
}
PAIR_COLUMNS = [
    "group",
    "metric",
    "a",
    "b",
    "a_value",
    "b_value",
    "difference",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
]


def query_set(cfg, manifest_digest: str) -> str:
    """Identity of the queries a job answered and the index they were answered against."""
    blob = json.dumps(
        {
            "manifest": manifest_digest,
            "query_split": str(cfg.eval.query_split),
            "index_split": str(cfg.index.split),
            "per_class": str(cfg.index.per_class),
            "index_seed": int(cfg.index.seed),
            "index_type": str(cfg.index.type),
            "labels": str(cfg.dataset.get("labels") or "single"),
            "exclude_same_patient": bool(cfg.eval.get("exclude_same_patient", False)),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compare_groups(
    runs: pd.DataFrame,
    records: dict[str, pd.DataFrame],
    resamples: int,
    level: float,
    flips: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """runs: one row per run with columns name, group (its query set) and run_id; records: run_id ->
    per-query records. Returns (pairs, verdicts): the pair table (PAIR_COLUMNS) and one row per
    (group, metric, run) with value and tied_for_best."""
    pairs, verdicts = [], []
    for group, members in runs.dropna(subset=["group"]).groupby("group", sort=True):
        members = members[members["run_id"].isin(records)].drop_duplicates("name")
        by_name = {row.name: records[row.run_id] for row in members.itertuples()}
        by_name = _same_queries(by_name, group)
        if len(by_name) < 2:
            continue
        metrics = [(avg, column) for avg, column in METRICS if all(column in r for r in by_name.values())]
        table = uncertainty.compare_runs(by_name, metrics, resamples, level, flips, seed)
        points = {
            f"{avg} {column}": {name: _point(r, avg, column) for name, r in by_name.items()} for avg, column in metrics
        }
        table["a_value"] = [points[m][a] for m, a in zip(table["metric"], table["a"])]
        table["b_value"] = [points[m][b] for m, b in zip(table["metric"], table["b"])]
        table.insert(0, "group", group)
        pairs.append(table)
        for metric, values in points.items():
            tied = set(uncertainty.tied_for_best(values, table[table["metric"] == metric]))
            best = max(values, key=lambda name: (values[name], name))
            verdicts += [
                {
                    "group": group,
                    "metric": metric,
                    "run": name,
                    "value": value,
                    "best": name == best,
                    "tied_for_best": name in tied,
                }
                for name, value in values.items()
            ]
    pair_table = pd.concat(pairs, ignore_index=True)[PAIR_COLUMNS] if pairs else pd.DataFrame(columns=PAIR_COLUMNS)
    return pair_table, pd.DataFrame(verdicts, columns=["group", "metric", "run", "value", "best", "tied_for_best"])


def _point(records: pd.DataFrame, average: str, column: str) -> float:
    ok = records[column].notna()
    micro, macro = uncertainty.point_micro_macro(
        records.loc[ok, column].to_numpy(), records.loc[ok, "class"].to_numpy()
    )
    return micro if average == "micro" else macro


def _same_queries(by_name: dict[str, pd.DataFrame], group: str) -> dict[str, pd.DataFrame]:
    """The runs whose query rows equal those of the group's most common set (failed images can
    leave a run with fewer queries: it is not comparable and is left out, with a warning)."""
    keys = {name: tuple(sorted(r["row"].tolist())) for name, r in by_name.items()}
    common = pd.Series(list(keys.values())).value_counts().index[0] if keys else ()
    left_out = sorted(name for name, key in keys.items() if key != common)
    if left_out:
        log.warning(
            "comparisons: %s answered other queries than the rest of group %s; left out of the comparison",
            ", ".join(left_out),
            group,
        )
    return {name: r for name, r in by_name.items() if keys[name] == common}


def tied_labels(verdicts: pd.DataFrame) -> dict[str, str]:
    """run name -> the metrics it is tied for best on (`µP@1 MP@10`), '' when none."""
    out: dict[str, list[str]] = {}
    for row in verdicts.itertuples():
        out.setdefault(row.run, [])
        if row.tied_for_best:
            out[row.run].append(SHORT.get(row.metric, row.metric))
    return {name: " ".join(metrics) for name, metrics in out.items()}


def summary_lines(verdicts: pd.DataFrame) -> list[str]:
    """One line per (group, metric): the runs tied for best, best first."""
    lines = []
    groups = verdicts["group"].unique()
    for (group, metric), rows in verdicts.groupby(["group", "metric"], sort=False):
        rows = rows.sort_values("value", ascending=False)
        tied = [f"{r.run} ({r.value:.3f})" for r in rows.itertuples() if r.tied_for_best]
        where = f" [queries {group}]" if len(groups) > 1 else ""
        lines.append(f"{metric}{where}: tied for best: {', '.join(tied)}")
    return lines


def ci_settings(cfg) -> tuple[int, float, int, int]:
    """(resamples, level, flips, seed) from a config with eval.ci and seed (defaults otherwise)."""
    ci = cfg.get("eval", {}).get("ci") or {} if cfg is not None else {}
    return (
        int(ci.get("resamples", 1000)),
        float(ci.get("level", 0.95)),
        int(ci.get("flips", 10000)),
        int(cfg.get("seed", 42)) if cfg is not None else 42,
    )
