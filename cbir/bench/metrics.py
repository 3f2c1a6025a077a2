"""Metrics: vectorised modified P@N over a per-query loop, at growing query counts, with the
full `evaluate` time and peak RSS (each size in its own process)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cbir.bench.common import peak_rss_mb, run_child


def _metric_data(q: int, k: int, seed: int = 0):
    """Query and index frames (60 classes, long tail) and neighbour ids with ~60 % hits."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    modalities, anatomies, findings = ["CT", "MR", "US", "XR"], ["head", "chest", "abd"], ["a", "b", "c", "d", "e"]
    classes = [(m, a, f"{m}/{a}/{f}") for m in modalities for a in anatomies for f in findings]
    weights = 0.93 ** np.arange(len(classes))
    weights /= weights.sum()

    def frame(n, codes):
        table = np.array(classes, dtype=object)[codes]
        return pd.DataFrame({"label": table[:, 2], "modality": table[:, 0], "anatomy": table[:, 1]})

    index_codes = np.sort(rng.choice(len(classes), size=q, p=weights))
    query_codes = rng.choice(len(classes) - 1, size=q, p=weights[:-1] / weights[:-1].sum())  # last class: few rows
    starts = np.searchsorted(index_codes, np.arange(len(classes)))
    counts = np.bincount(index_codes, minlength=len(classes))
    neighbours = rng.integers(0, q, size=(q, k), dtype=np.int64)
    hit = rng.random((q, k), dtype=np.float32) < 0.6
    own = starts[query_codes][:, None] + (
        rng.random((q, k), dtype=np.float32) * np.maximum(counts[query_codes], 1)[:, None]
    ).astype(np.int64)
    neighbours = np.where(hit & (counts[query_codes] > 0)[:, None], own, neighbours)
    del hit, own
    return frame(q, query_codes), frame(q, index_codes), neighbours


def _loop_precision(query, index, neighbours, ns) -> dict:
    """The per-query loop (the study's style): modified P@N query by query."""
    labels_q = query["label"].to_numpy()
    labels_i = index["label"].to_numpy()
    counts = index["label"].value_counts().to_dict()
    per_n = {n: {} for n in ns}
    for q in range(len(query)):
        c = labels_q[q]
        n_c = counts.get(c, 0)
        if n_c == 0:
            continue
        for n_value in ns:
            n = min(n_value, n_c)
            per_n[n_value].setdefault(c, []).append(sum(labels_i[neighbours[q, i]] == c for i in range(n)) / n)
    out = {}
    for n_value, by_class in per_n.items():
        values = [v for vs in by_class.values() for v in vs]
        out[f"micro/P_at_{n_value}"] = float(np.mean(values))
        out[f"macro/P_at_{n_value}"] = float(np.mean([np.mean(v) for v in by_class.values()]))
    return out


def child(spec_json: str) -> None:
    """One metrics size in a clean process: prints timings and peak RSS as JSON."""
    from cbir.evaluate.metrics import evaluate, level_precision, summarise

    spec = json.loads(spec_json)
    q, k, ns = int(spec["queries"]), int(spec["k"]), [int(n) for n in spec["ns"]]
    query, index, neighbours = _metric_data(q, k)
    rss_data = peak_rss_mb()
    own = np.full(q, -1)
    start = time.perf_counter()
    p, q_codes, _, _ = level_precision(query, index, neighbours, own, ns)
    summarise(p, q_codes)  # timed with level_precision: the vectorised core
    core_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(query, index, neighbours, own, ns=ns, levels=("modality", "anatomy"), curve_k=k)
    evaluate_s = time.perf_counter() - start
    sub = min(int(spec["loop_queries"]), q)
    start = time.perf_counter()
    loop = _loop_precision(query.iloc[:sub], index, neighbours[:sub], ns)
    loop_s = (time.perf_counter() - start) * q / sub
    # the loop on a subsample must agree with the vectorised values on the same subsample
    p_sub = summarise(p[:, :sub], q_codes[:sub])
    agree = all(abs(loop[f"micro/P_at_{n}"] - p_sub["micro"][j]) < 1e-9 for j, n in enumerate(ns))
    print(
        json.dumps(
            {
                "queries": q,
                "k": k,
                "core_seconds": core_s,
                "evaluate_seconds": evaluate_s,
                "loop_seconds_extrapolated": loop_s,
                "loop_queries_measured": sub,
                "speedup": loop_s / core_s,
                "loop_agrees": agree,
                "input_mb": neighbours.nbytes / 2**20,
                "rss_after_data_mb": rss_data,
                "peak_rss_mb": peak_rss_mb(),
                "micro_P_at_1": result.metrics["micro/P_at_1"],
            }
        )
    )


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    mc = bc.metrics
    runs = [
        run_child(
            "cbir.bench.metrics:child",
            {"queries": int(q), "k": int(mc.k), "ns": list(mc.ns), "loop_queries": int(mc.loop_queries)},
        )
        for q in sizes.metrics_queries
    ]
    largest = runs[-1]
    target_q = int(mc.target_queries)
    # evaluate time grows linearly with the query count: extrapolate when 1.6M was not run
    at_target = largest["evaluate_seconds"] * target_q / largest["queries"]
    return {
        "sizes": runs,
        "ratio": min(r["speedup"] for r in runs),
        "evaluate_seconds_at_target": at_target,
        "target_measured": largest["queries"] >= target_q,
        "target_seconds": float(mc.target_seconds),
        "target_queries": target_q,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "baseline": "per-query Python loop (speedup = loop time / vectorised time)",
    }


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    rows = []
    for r in result["sizes"]:
        rows.append(
            (
                f"metrics {r['queries']:,} q, k={r['k']}",
                f"{r['core_seconds']:.2f} s vectorised P@N",
                f"{r['loop_seconds_extrapolated']:.1f} s loop (extrapolated)",
                f"{r['speedup']:.0f}x faster",
                f"evaluate {r['evaluate_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(input {r['input_mb']:.0f} MB)",
            )
        )
    ok = result["evaluate_seconds_at_target"] <= result["target_seconds"]
    rows.append(
        (
            f"metrics at {result['target_queries']:,} q",
            f"{result['evaluate_seconds_at_target']:.1f} s evaluate"
            + ("" if result["target_measured"] else " (extrapolated)"),
            "",
            "",
            f"<= {result['target_seconds']:.0f} s {'ok' if ok else 'MISS'}",
        )
    )
    return rows
