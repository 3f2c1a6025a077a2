"""Uncertainty: bootstrap intervals and paired comparisons over per-query records at growing
query counts (cbir.evaluate.uncertainty), against explicit index-array resampling (the textbook way,
measured on a subsample and extrapolated); and the coverage of the 95 % interval on repeated
datasets drawn with the synthetic generator's class layout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cbir.bench.common import peak_rss_mb, run_child


def records(q: int, classes: int = 165, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Per-query records of two encoders on the same q queries: long-tailed classes over four
    modalities, P@1 (0/1) and P@10 (tenths), encoder b about 0.01 worse."""
    rng = np.random.default_rng(seed)
    weights = 0.97 ** np.arange(classes)
    codes = rng.choice(classes, size=q, p=weights / weights.sum())
    rate = rng.uniform(0.3, 0.9, classes)[codes]
    frame = pd.DataFrame(
        {
            "row": np.arange(q),
            "class": codes,
            "modality": np.array(["CT", "MR", "US", "XR"])[codes % 4],
        }
    )
    out = {}
    for name, shift in (("a", 0.0), ("b", -0.01)):
        p1 = (rng.random(q) < rate + shift).astype(np.float64)
        p10 = rng.binomial(10, np.clip(rate + shift, 0, 1)) / 10
        out[name] = frame.assign(**{"P@1": p1, "P@10": p10})
    return out


def child(spec_json: str) -> None:
    """One query count in a clean process: timings and peak RSS as JSON."""
    from cbir.evaluate import uncertainty

    spec = json.loads(spec_json)
    q, resamples, flips = (
        int(spec["queries"]),
        int(spec["resamples"]),
        int(spec["flips"]),
    )
    runs = records(q)
    start = time.perf_counter()
    intervals = uncertainty.retrieval_intervals(runs["a"], [1, 10], resamples, 0.95, seed=0)
    intervals_s = time.perf_counter() - start
    start = time.perf_counter()
    pairs = uncertainty.compare_runs(
        runs,
        [("micro", "P@1"), ("macro", "P@1"), ("micro", "P@10"), ("macro", "P@10")],
        resamples,
        0.95,
        flips,
        seed=0,
    )
    compare_s = time.perf_counter() - start
    # the textbook way: one (resamples, n) index array per class, for one metric (micro P@10)
    sub = min(q, int(spec["naive_queries"]))
    values, classes = (
        runs["a"]["P@10"].to_numpy()[:sub],
        runs["a"]["class"].to_numpy()[:sub],
    )
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    total = np.zeros(resamples)
    for c in np.unique(classes):
        members = values[classes == c]
        for b in range(0, resamples, 100):
            total[b : b + 100] += members[
                rng.integers(0, len(members), size=(min(100, resamples - b), len(members)))
            ].sum(1)
    naive_s = (time.perf_counter() - start) * q / sub
    metrics_per_run = 2 * 2 * (1 + 4)  # P@1, P@10 x micro/macro x (all + 4 modalities)
    print(
        json.dumps(
            {
                "queries": q,
                "resamples": resamples,
                "flips": flips,
                "intervals_seconds": intervals_s,
                "interval_metrics": len(intervals) // 2,
                "compare_seconds": compare_s,
                "pairs": len(pairs),
                "naive_seconds_per_metric_extrapolated": naive_s,
                "naive_seconds_extrapolated": naive_s * metrics_per_run,
                "speedup": naive_s * metrics_per_run / intervals_s,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def coverage(
    datasets: int = 400,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    populations: int = 4,
) -> dict:
    """Fraction of repeated datasets whose interval covers the population value. Classes and
    query counts: the synthetic generator's (36 classes, 120 down to 12 queries); each of
    `populations` populations gives every class a hit rate, and its datasets draw every query's
    P@1 from its class's rate (datasets split evenly across the populations)."""
    from cbir.data.synthetic import SyntheticDataset
    from cbir.evaluate import uncertainty

    sizes = np.array(list(SyntheticDataset(root=".").class_sizes().values()))
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(len(sizes)), sizes)
    covered = {"micro": 0, "macro": 0}
    for d in range(datasets):
        if d % max(datasets // populations, 1) == 0:
            rates = rng.uniform(0.2, 0.9, len(sizes))
            population = {
                "micro": float((rates * sizes).sum() / sizes.sum()),
                "macro": float(rates.mean()),
            }
        values = (rng.random(len(classes)) < rates[classes]).astype(np.float64)
        bounds = uncertainty.mean_intervals(values, classes, resamples, level, uncertainty.rng_for(seed, f"cov{d}"))
        for average in covered:
            low, high = bounds[average]
            covered[average] += int(low <= population[average] <= high)
    return {
        "datasets": datasets,
        "populations": populations,
        "queries": int(sizes.sum()),
        "classes": len(sizes),
        "level": level,
        **{f"{average}_coverage": n / datasets for average, n in covered.items()},
    }


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    uc = bc.uncertainty
    runs = [
        run_child(
            "cbir.bench.uncertainty:child",
            {
                "queries": int(q),
                "resamples": int(uc.resamples),
                "flips": int(uc.flips),
                "naive_queries": int(uc.naive_queries),
            },
        )
        for q in sizes.uncertainty_queries
    ]
    return {
        "sizes": runs,
        "ratio": min(r["speedup"] for r in runs),
        "coverage": coverage(int(sizes.coverage_datasets), int(uc.resamples), populations=8),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "baseline": "explicit index-array resampling per class (extrapolated from a subsample)",
    }


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    out = []
    for r in result["sizes"]:
        out.append(
            (
                f"intervals {r['queries']:,} q x {r['resamples']} resamples",
                (
                    f"{r['intervals_seconds']:.1f} s for {r['interval_metrics']} intervals; "
                    f"{r['compare_seconds']:.1f} s for {r['pairs']} paired comparisons ({r['flips']:,} flips)"
                ),
                f"{r['naive_seconds_extrapolated']:.0f} s index arrays (extrapolated)",
                f"{r['speedup']:.0f}x faster",
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
            )
        )
    c = result["coverage"]
    shown = f"micro {c['micro_coverage']:.3f}, macro {c['macro_coverage']:.3f} over {c['datasets']} datasets"
    out.append((f"coverage of the {c['level']:.0%} interval", shown, "", "", "0.93-0.97"))
    return out
