"""Scale: exact tiled search extrapolated to 1.6M queries x 1.6M index rows (GPU measured when
present)."""

from __future__ import annotations

import time
from pathlib import Path

from cbir.bench.common import random_unit


def _torch_tiled_topk(index_t, queries_t, k: int, tile: int = 65536):
    """Top-k inner products, tiled over queries and index rows (GPU path)."""
    import torch

    best_s = torch.full((len(queries_t), k), -float("inf"), device=queries_t.device)
    best_i = torch.full((len(queries_t), k), -1, dtype=torch.int64, device=queries_t.device)
    for start in range(0, len(index_t), tile):
        block = index_t[start : start + tile]
        s = (queries_t @ block.T).float()
        s, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        merged_s = torch.cat([best_s, s], 1)
        merged_i = torch.cat([best_i, i + start], 1)
        best_s, order = torch.topk(merged_s, k, dim=1)
        best_i = torch.gather(merged_i, 1, order)
    return best_s, best_i


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    import faiss
    import torch

    from cbir.evaluate import index as cbir_index

    sc = bc.scale
    n, nq, k, dim = int(sizes.scale_index), int(sizes.scale_queries), int(sc.k), int(sc.dim)
    tq, ti = int(sc.target_queries), int(sc.target_index)
    vectors = random_unit(n, dim, 3)
    queries = random_unit(nq, dim, 4)
    index = cbir_index.build_index(vectors, "flat", use_gpu=False)
    wall, cpu = time.perf_counter(), time.process_time()
    cbir_index.search(index, queries, k, int(sc.batch_size))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    factor = (tq / nq) * (ti / n)
    out = {
        "index": n,
        "queries": nq,
        "dim": dim,
        "k": k,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cpu_hours_extrapolated": cpu * factor / 3600,
        "wall_hours_extrapolated": wall * factor / 3600,
        "gflops": 2 * n * nq * dim / wall / 1e9,
        "largest_tile_mb": int(sc.batch_size) * n * 4 / 2**20,
        "full_matrix_mb": tq * ti * 4 / 2**20,
        "gpu": {},
    }
    if torch.cuda.is_available():
        device = torch.device("cuda")
        index_t = torch.from_numpy(vectors).to(device)
        queries_t = torch.from_numpy(queries).to(device)
        for dtype in (torch.float32, torch.bfloat16):
            a, b = index_t.to(dtype), queries_t.to(dtype)
            _torch_tiled_topk(a, b[:8], k)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for s in range(0, nq, int(sc.batch_size)):
                _torch_tiled_topk(a, b[s : s + int(sc.batch_size)], k)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out["gpu"][f"torch_{str(dtype).split('.')[-1]}"] = {
                "seconds": seconds,
                "hours_extrapolated": seconds * factor / 3600,
            }
        if cbir_index.gpu_available():
            gpu_index = cbir_index.build_index(vectors, "flat", use_gpu=True)
            start = time.perf_counter()
            cbir_index.search(gpu_index, queries, k, int(sc.batch_size))
            seconds = time.perf_counter() - start
            out["gpu"]["faiss_gpu"] = {
                "seconds": seconds,
                "hours_extrapolated": seconds * factor / 3600,
                "gpus": faiss.get_num_gpus(),
            }
    else:
        out["gpu"] = {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    out["ratio"] = out["full_matrix_mb"] / out["largest_tile_mb"]  # memory saved by tiling
    out["baseline"] = "a full 1.6M x 1.6M float32 score matrix (ratio = its size / the largest tile)"
    return out


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    gpu = (
        "skipped (no CUDA)"
        if "skipped" in result["gpu"]
        else ", ".join(f"{name} {v['hours_extrapolated']:.2f} h" for name, v in result["gpu"].items())
    )
    rows = []
    rows.append(
        (
            f"scale {result['queries']} q x {result['index']} rows, {result['dim']}-d",
            f"{result['cpu_seconds']:.1f} s CPU ({result['gflops']:.0f} GFLOP/s)",
            f"1.6M x 1.6M: {result['cpu_hours_extrapolated']:.1f} CPU-h, {result['wall_hours_extrapolated']:.1f} h wall",
            f"{result['ratio']:,.0f}x less memory: {result['largest_tile_mb']:.0f} MB tile vs full score matrix",
            "GPU: " + gpu,
        )
    )
    return rows
