"""Exact against approximate search: flat vs IVF vs HNSW vs IVF-PQ.

The retrieval quality (P@N) of each index type comes from a tracked cbir sweep over the index
presets (one extraction). The index itself is then measured on the same cached embeddings
with cbir.evaluate.index: recall@k of each structure against the exact (flat) neighbours, build time,
query latency (batched and one query at a time) and memory (serialised index size).

    python experiments/index_types.py data_dir=/data
    python experiments/index_types.py smoke=true

Outputs: index_types.{csv,md}, index_types.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.common import Context, ExperimentError, main, run_embeddings, show  # noqa: E402


def measure(
    index_cfg, vectors: np.ndarray, queries: np.ndarray, k: int, exact: np.ndarray | None, latency_queries: int
) -> tuple[dict, np.ndarray]:
    import faiss

    from cbir.evaluate import index as cbir_index

    start = time.perf_counter()
    index = cbir_index.build_index(
        vectors, str(index_cfg.type), index_cfg.get("use_gpu", "auto"), dict(index_cfg.get("params") or {})
    )
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, found = cbir_index.search(index, queries, k)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    single = []
    for q in queries[:latency_queries]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        single.append((time.perf_counter() - start) * 1000)
    cpu_index = faiss.index_gpu_to_cpu(index) if cbir_index.gpu_available() else index  # serialisable form
    reference = found if exact is None else exact
    recall = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / k for a, b in zip(found, reference)])
    return {
        "recall@k vs flat": float(recall),
        "build s": build_seconds,
        "batched ms/query": batch_ms,
        "single-query ms (median)": float(np.median(single)),
        "memory MB": len(faiss.serialize_index(cpu_index)) / 2**20,
        "rows": int(index.ntotal),
    }, found


def run(cfg) -> dict:
    from cbir.evaluate import retrieval
    from cbir.evaluate.index import l2_normalise
    from cbir.report import figures

    ctx = Context(cfg)
    runs, parents = ctx.sweep_runs()
    ns = [int(n) for n in cfg.ns]
    runs = runs.sort_values("index_type", key=lambda s: s.map({"flat": 0}).fillna(1), kind="stable")
    if "flat" not in set(runs["index_type"]):
        raise ExperimentError("index_types needs a flat run in the sweep: it is the exact reference")
    k = int(cfg.k)
    exact, rows = None, []
    for _, run in runs.iterrows():
        job_cfg, manifest, extraction = run_embeddings(ctx, ctx.job_overrides(run["run_id"]))
        setup = retrieval.choose_rows(
            manifest.table,
            extraction.valid,
            job_cfg.index.split,
            job_cfg.eval.query_split,
            retrieval.per_class_value(job_cfg.index.per_class),
            job_cfg.index.seed,
        )
        vectors = l2_normalise(extraction.embeddings[setup.index_rows])
        queries = l2_normalise(extraction.embeddings[setup.query_rows])
        numbers, found = measure(job_cfg.index, vectors, queries, k, exact, int(cfg.latency_queries))
        if run["index_type"] == "flat":
            exact = found
        rows.append({"index": run.index_type, **numbers, **{f"micro P@{n}": run[f"micro/P_at_{n}"] for n in ns}})
    table = pd.DataFrame(rows)
    for n in ns:
        table[f"ΔP@{n} vs flat"] = table[f"micro P@{n}"] - table.loc[table["index"] == "flat", f"micro P@{n}"].item()
    files = {p.name: p for p in ctx.write_table(table, "index_types")}
    long = table.melt(
        id_vars="index",
        value_vars=["recall@k vs flat", f"micro P@{ns[0]}", f"micro P@{ns[-1]}"],
        var_name="measure",
        value_name="value",
    )
    files["index_types.png"] = figures.grouped_bars(
        long,
        "measure",
        "index",
        "value",
        ctx.out / "index_types.png",
        f"index structures: recall@{k} against flat and micro P@N",
        ylabel="",
    )
    ctx.keep(parents[-1], *files.values())
    show(table, "index types")
    return files


if __name__ == "__main__":
    main("index_types", run)
