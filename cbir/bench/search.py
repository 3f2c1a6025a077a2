"""Search: cbir.evaluate.index.search over raw `IndexFlatIP.search`, and over one-at-a-time add/search."""

from __future__ import annotations

import time
from pathlib import Path

from cbir.bench.common import random_unit


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    import faiss

    from cbir.evaluate import index as cbir_index

    sc = bc.search
    n, nq, k, dim = int(sizes.search_index), int(sizes.search_queries), int(sc.k), int(sc.dim)
    vectors = random_unit(n, dim, 1)
    queries = random_unit(nq, dim, 2)

    start = time.perf_counter()
    index = cbir_index.build_index(vectors, "flat", use_gpu=False)
    _, ids_cbir = cbir_index.search(index, queries, k, int(sc.batch_size))
    cbir_s = time.perf_counter() - start

    start = time.perf_counter()
    raw = faiss.IndexFlatIP(dim)
    raw.add(vectors)
    _, ids_raw = raw.search(queries, k)
    raw_s = time.perf_counter() - start
    agree = float((ids_cbir[:, 0] == ids_raw[:, 0]).mean())

    sub = min(int(sizes.naive_search_queries), nq)
    start = time.perf_counter()
    naive = faiss.IndexFlatIP(dim)
    for row in vectors:
        naive.add(row[None, :])
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    for q in queries[:sub]:
        naive.search(q[None, :], k)
    naive_s = add_s + (time.perf_counter() - start) * nq / sub
    return {
        "index": n,
        "queries": nq,
        "dim": dim,
        "k": k,
        "cbir_seconds": cbir_s,
        "raw_seconds": raw_s,
        "naive_seconds_extrapolated": naive_s,
        "naive_queries_measured": sub,
        "ratio": raw_s / cbir_s,
        "speedup_vs_naive": naive_s / cbir_s,
        "top1_agreement": agree,
        "target": float(sc.target),
        "baseline": "faiss.IndexFlatIP.search on all queries at once",
    }


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    rows = []
    rows.append(
        (
            f"search {result['queries']} q x {result['index']} rows",
            f"{result['cbir_seconds']:.2f} s cbir",
            f"{result['raw_seconds']:.2f} s raw IndexFlatIP",
            f"{result['ratio']:.2f}",
            f">= {result['target']:.2f} {'ok' if result['ratio'] >= result['target'] else 'MISS'}",
        )
    )
    rows.append(
        (
            "search naive (1 by 1)",
            f"{result['cbir_seconds']:.2f} s cbir",
            f"{result['naive_seconds_extrapolated']:.1f} s (extrapolated)",
            f"{result['speedup_vs_naive']:.0f}x faster",
            "",
        )
    )
    return rows
