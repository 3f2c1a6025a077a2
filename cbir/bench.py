"""Performance benchmark: `python -m cbir.bench [bench.quick=true] [overrides]`.

Each section measures cbir's path and a baseline side by side, in this process (or in child
processes started from it) on the same data, and reports their ratio; absolute times on a
shared machine are context only.

1. extraction: full pipeline (decode, preprocess, Lightning predict, writer) images/s over
   the encoder's forward-only images/s on ready-made tensors (same batch size, precision);
2. sweep: wall time of a real E x S multirun over E single runs, and the naive E x S runs
   that each extract again;
3. search: cbir.index.search over raw `IndexFlatIP.search`, and over one-at-a-time add/search;
4. metrics: vectorised modified P@N over a per-query loop, at growing query counts, with
   the full `evaluate` time and peak RSS (each size in its own process);
5. memory: peak RSS of an extraction of N and 10 x N images (each in its own process);
6. scale: exact tiled search extrapolated to 1.6M queries x 1.6M index rows (GPU measured
   when present).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cbir import CONFIG_DIR  # noqa: E402

log = logging.getLogger("cbir.bench")
CONF = Path(CONFIG_DIR)
PROJECT = CONF.parent


# ----------------------------------------------------------------------------- helpers
def _peak_rss_mb() -> float:
    """Peak resident set size of this process. VmHWM starts afresh at exec; ru_maxrss would
    include the launching process's peak, inherited through fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}


def _run_child(function: str, spec: dict, timeout: int = 1200) -> dict:
    """Run `cbir.bench.<function>(spec)` in a fresh interpreter; it prints one JSON line."""
    code = f"import sys; from cbir.bench import {function}; {function}(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env=_child_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _synthetic(root: Path, n: int, image_size: int):
    """A synthetic dataset with at least n images of the given size; its first n rows."""
    from cbir.data.synthetic import SyntheticDataset

    per_class = max(2, math.ceil(n / 36) + 1)  # 4 modalities x 3 anatomies x 3 pathologies
    dataset = SyntheticDataset(root=root / f"synthetic-{image_size}px-{per_class}", max_per_class=per_class,
                               min_per_class=per_class, image_size=image_size)
    manifest = dataset.load_manifest()
    table = manifest.table.iloc[:n].reset_index(drop=True)
    return manifest.with_table(table)


def _encoder_config(name: str, overrides: dict | None = None) -> DictConfig:
    cfg = OmegaConf.load(CONF / "encoder" / f"{name}.yaml")
    cfg.pop("defaults", None)
    if "pretrained" in cfg:
        cfg.pretrained = False  # random weights: no hub, same cost
        cfg.weights = None
    return OmegaConf.merge(cfg, overrides or {})


def _build_encoder(name: str):
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(_encoder_config(name))


def _extract_cfg(**overrides) -> DictConfig:
    cfg = OmegaConf.load(CONF / "extract" / "default.yaml")
    cfg.progress = False
    return OmegaConf.merge(cfg, overrides)


# ------------------------------------------------------------------------ 1. extraction
def bench_extraction(bc, sizes, data_dir: Path, work: Path) -> dict:
    import torch

    from cbir.extract import _probe_shape, extract_embeddings, resolve_precision
    from cbir.store import EmbeddingStore

    ec = bc.extraction
    n = int(sizes.extract_images)
    manifest = _synthetic(data_dir, n, int(ec.image_size))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(str(ec.precision), accelerator)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    out = {"images": n, "image_size": int(ec.image_size), "batch_size": int(ec.batch_size),
           "precision": precision, "device": str(device), "encoders": {}}
    for name in ec.encoders:
        if not (CONF / "encoder" / f"{name}.yaml").exists():
            log.warning("extraction: no conf/encoder/%s.yaml, skipped", name)
            continue
        encoder = _build_encoder(name).eval()
        batch = int(ec.batch_size)
        shape = _probe_shape(encoder.transform())
        x = torch.randn(batch, *shape)
        if ec.channels_last and x.ndim == 4:
            encoder.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        encoder.to(device)
        x = x.to(device)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
                    if "mixed" in precision else None)
        forward = torch.compile(encoder) if ec.compile else encoder
        n_batches = math.ceil(n / batch)

        def forward_only() -> float:
            with torch.inference_mode():
                if autocast is not None:
                    autocast.__enter__()
                try:
                    forward(x)  # warm-up
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(n_batches):
                        forward(x).float().cpu()
                    return n_batches * batch / (time.perf_counter() - start)
                finally:
                    if autocast is not None:
                        autocast.__exit__(None, None, None)

        before = forward_only()
        encoder.cpu()
        cfg = _extract_cfg(batch_size=batch, num_workers=int(ec.num_workers), precision=precision,
                           accelerator="auto", channels_last=bool(ec.channels_last), compile=bool(ec.compile))
        cache = work / f"extract-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        extraction = extract_embeddings(encoder, manifest, EmbeddingStore(cache), cfg)
        pipeline = n / extraction.seconds
        assert extraction.rows_extracted == n and bool(np.isfinite(extraction.embeddings).all())
        shutil.rmtree(cache, ignore_errors=True)
        encoder.to(device)
        after = forward_only() if sizes.forward_twice else before  # before and after: less noise
        forward_ips = (before + after) / 2
        out["encoders"][name] = {"pipeline_images_per_s": pipeline, "forward_images_per_s": forward_ips,
                                 "forward_before": before, "forward_after": after,
                                 "ratio": pipeline / forward_ips, "target": float(ec.target)}
        log.info("extraction %s: pipeline %.1f img/s, forward-only %.1f img/s", name, pipeline, forward_ips)
        del encoder, forward
    ratios = [v["ratio"] for v in out["encoders"].values()]
    out["ratio"] = min(ratios) if ratios else float("nan")
    out["target"] = float(ec.target)
    out["baseline"] = "encoder forward-only on ready-made tensors"
    return out


# ----------------------------------------------------------------------------- 2. sweep
def _cbir_run(cwd: Path, *overrides: str) -> float:
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cbir.run", *overrides], cwd=cwd, env=_child_env(),
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cbir.run {' '.join(overrides)} failed:\n{proc.stderr[-4000:]}")
    return seconds


def bench_sweep(bc, sizes, data_dir: Path, work: Path) -> dict:
    sc = bc.sweep
    encoders = [str(e) for e in sc.encoders]
    per_class = [str(p) for p in sc.per_class]
    common = [*sc.overrides, f"paths.data_dir={data_dir}", "extract.progress=false"]
    _cbir_run(work / "warmup", *common, f"encoder={encoders[0]}", f"paths.cache_dir={work / 'warmup' / 'cache'}",
              "tracking.enabled=false")  # generates the dataset and warms the file cache; untimed
    sweep = _cbir_run(work / "sweep", "-m", *common, f"encoder={','.join(encoders)}",
                      f"index.per_class={','.join(per_class)}", f"paths.cache_dir={work / 'sweep' / 'cache'}")
    singles = {e: _cbir_run(work / f"single-{e}", *common, f"encoder={e}", f"index.per_class={per_class[0]}",
                            f"paths.cache_dir={work / f'single-{e}' / 'cache'}") for e in encoders}
    single_total = sum(singles.values())
    if sizes.naive_sweep:
        naive = sum(_cbir_run(work / f"naive-{e}-{p}", *common, f"encoder={e}", f"index.per_class={p}",
                              f"paths.cache_dir={work / f'naive-{e}-{p}' / 'cache'}")
                    for e in encoders for p in per_class)
    else:  # each naive job is a single run with its own cache: S x the single runs
        naive = single_total * len(per_class)
    return {"encoders": encoders, "per_class": per_class, "jobs": len(encoders) * len(per_class),
            "sweep_seconds": sweep, "single_seconds": singles, "singles_seconds": single_total,
            "naive_seconds": naive, "naive_measured": bool(sizes.naive_sweep),
            "ratio": sweep / single_total, "naive_ratio": naive / single_total,
            "speedup_vs_naive": naive / sweep, "target": float(sc.target),
            "baseline": f"{len(encoders)} single runs (one extraction each)"}


# ---------------------------------------------------------------------------- 3. search
def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_search(bc, sizes) -> dict:
    import faiss

    from cbir import index as cbir_index

    sc = bc.search
    n, nq, k, dim = int(sizes.search_index), int(sizes.search_queries), int(sc.k), int(sc.dim)
    vectors = _random_unit(n, dim, 1)
    queries = _random_unit(nq, dim, 2)

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
    return {"index": n, "queries": nq, "dim": dim, "k": k, "cbir_seconds": cbir_s, "raw_seconds": raw_s,
            "naive_seconds_extrapolated": naive_s, "naive_queries_measured": sub,
            "ratio": raw_s / cbir_s, "speedup_vs_naive": naive_s / cbir_s, "top1_agreement": agree,
            "target": float(sc.target), "baseline": "faiss.IndexFlatIP.search on all queries at once"}


# --------------------------------------------------------------------------- 4. metrics
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
    own = starts[query_codes][:, None] + (rng.random((q, k), dtype=np.float32)
                                          * np.maximum(counts[query_codes], 1)[:, None]).astype(np.int64)
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


def metrics_child(spec_json: str) -> None:
    """One metrics size in a clean process: prints timings and peak RSS as JSON."""
    from cbir.metrics import evaluate, level_precision, summarise

    spec = json.loads(spec_json)
    q, k, ns = int(spec["queries"]), int(spec["k"]), [int(n) for n in spec["ns"]]
    query, index, neighbours = _metric_data(q, k)
    rss_data = _peak_rss_mb()
    own = np.full(q, -1)
    start = time.perf_counter()
    p, q_codes, _, _ = level_precision(query, index, neighbours, own, ns)
    core = summarise(p, q_codes)
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
    print(json.dumps({"queries": q, "k": k, "core_seconds": core_s, "evaluate_seconds": evaluate_s,
                      "loop_seconds_extrapolated": loop_s, "loop_queries_measured": sub,
                      "speedup": loop_s / core_s, "loop_agrees": agree,
                      "input_mb": neighbours.nbytes / 2**20, "rss_after_data_mb": rss_data,
                      "peak_rss_mb": _peak_rss_mb(), "micro_P_at_1": result.metrics["micro/P_at_1"]}))


def bench_metrics(bc, sizes) -> dict:
    mc = bc.metrics
    runs = [_run_child("metrics_child", {"queries": int(q), "k": int(mc.k), "ns": list(mc.ns),
                                         "loop_queries": int(mc.loop_queries)})
            for q in sizes.metrics_queries]
    largest = runs[-1]
    target_q = int(mc.target_queries)
    # evaluate time grows linearly with the query count: extrapolate when 1.6M was not run
    at_target = largest["evaluate_seconds"] * target_q / largest["queries"]
    return {"sizes": runs, "ratio": min(r["speedup"] for r in runs),
            "evaluate_seconds_at_target": at_target, "target_measured": largest["queries"] >= target_q,
            "target_seconds": float(mc.target_seconds), "target_queries": target_q,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "baseline": "per-query Python loop (speedup = loop time / vectorised time)"}


# ---------------------------------------------------------------------------- 5. memory
def memory_child(spec_json: str) -> None:
    """One extraction in a clean process: prints peak RSS (this process and its workers)."""
    from cbir.extract import extract_embeddings
    from cbir.store import EmbeddingStore

    spec = json.loads(spec_json)
    manifest = _synthetic(Path(spec["data_dir"]), int(spec["images"]), int(spec["image_size"]))
    encoder = _build_encoder(spec["encoder"])
    baseline = _peak_rss_mb()
    cfg = _extract_cfg(batch_size=32, num_workers=1, accelerator="auto")
    extraction = extract_embeddings(encoder, manifest, EmbeddingStore(spec["cache"]), cfg)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": len(manifest), "seconds": extraction.seconds, "peak_rss_mb": _peak_rss_mb(),
                      "rss_before_extraction_mb": baseline, "worker_peak_rss_mb": children,
                      "embedding_mb": extraction.embeddings.nbytes / 2**20}))


def bench_memory(bc, sizes, data_dir: Path, work: Path) -> dict:
    mc = bc.memory
    n = int(sizes.memory_images)
    _synthetic(data_dir, 10 * n, int(mc.image_size))  # generate once, outside the measurement
    runs = []
    for images in (n, 10 * n):
        cache = work / f"memory-{images}"
        shutil.rmtree(cache, ignore_errors=True)
        runs.append(_run_child("memory_child", {"images": images, "image_size": int(mc.image_size),
                                                "encoder": str(mc.encoder), "data_dir": str(data_dir),
                                                "cache": str(cache)}))
        shutil.rmtree(cache, ignore_errors=True)
    small, large = runs

    main = large["peak_rss_mb"] / small["peak_rss_mb"]
    worker = large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"]
    return {"runs": runs, "ratio": max(main, worker), "main_ratio": main, "worker_ratio": worker,
            "target": 1 + float(mc.target),
            "baseline": f"peak RSS at N={n} (ratio = peak at 10N / peak at N; the larger of the main "
                        "process and the decoding worker)"}


# ----------------------------------------------------------------------------- 6. scale
def _torch_tiled_topk(index_t, queries_t, k: int, tile: int = 65536):
    """Top-k inner products, tiled over queries and index rows (GPU path)."""
    import torch

    best_s = torch.full((len(queries_t), k), -float("inf"), device=queries_t.device)
    best_i = torch.full((len(queries_t), k), -1, dtype=torch.int64, device=queries_t.device)
    for start in range(0, len(index_t), tile):
        block = index_t[start:start + tile]
        s = (queries_t @ block.T).float()
        s, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        merged_s = torch.cat([best_s, s], 1)
        merged_i = torch.cat([best_i, i + start], 1)
        best_s, order = torch.topk(merged_s, k, dim=1)
        best_i = torch.gather(merged_i, 1, order)
    return best_s, best_i


def bench_scale(bc, sizes) -> dict:
    import faiss
    import torch

    from cbir import index as cbir_index

    sc = bc.scale
    n, nq, k, dim = int(sizes.scale_index), int(sizes.scale_queries), int(sc.k), int(sc.dim)
    tq, ti = int(sc.target_queries), int(sc.target_index)
    vectors = _random_unit(n, dim, 3)
    queries = _random_unit(nq, dim, 4)
    index = cbir_index.build_index(vectors, "flat", use_gpu=False)
    wall, cpu = time.perf_counter(), time.process_time()
    cbir_index.search(index, queries, k, int(sc.batch_size))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    factor = (tq / nq) * (ti / n)
    out = {"index": n, "queries": nq, "dim": dim, "k": k, "cpu_seconds": cpu, "wall_seconds": wall,
           "cpu_hours_extrapolated": cpu * factor / 3600, "wall_hours_extrapolated": wall * factor / 3600,
           "gflops": 2 * n * nq * dim / wall / 1e9,
           "largest_tile_mb": int(sc.batch_size) * n * 4 / 2**20,
           "full_matrix_mb": tq * ti * 4 / 2**20, "gpu": {}}
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
                _torch_tiled_topk(a, b[s:s + int(sc.batch_size)], k)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out["gpu"][f"torch_{str(dtype).split('.')[-1]}"] = {
                "seconds": seconds, "hours_extrapolated": seconds * factor / 3600}
        if cbir_index.gpu_available():
            gpu_index = cbir_index.build_index(vectors, "flat", use_gpu=True)
            start = time.perf_counter()
            cbir_index.search(gpu_index, queries, k, int(sc.batch_size))
            seconds = time.perf_counter() - start
            out["gpu"]["faiss_gpu"] = {"seconds": seconds, "hours_extrapolated": seconds * factor / 3600,
                                       "gpus": faiss.get_num_gpus()}
    else:
        out["gpu"] = {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    out["ratio"] = out["full_matrix_mb"] / out["largest_tile_mb"]  # memory saved by tiling
    out["baseline"] = "a full 1.6M x 1.6M float32 score matrix (ratio = its size / the largest tile)"
    return out


# ------------------------------------------------------------------------------ report
SECTIONS = {"extraction": bench_extraction, "sweep": bench_sweep, "search": bench_search,
            "metrics": bench_metrics, "memory": bench_memory, "scale": bench_scale}


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    rows = []
    ext = results.get("extraction")
    if ext:
        for name, v in ext["encoders"].items():
            rows.append((f"extraction {name}", f"{v['pipeline_images_per_s']:.1f} img/s pipeline",
                         f"{v['forward_images_per_s']:.1f} img/s forward-only", f"{v['ratio']:.2f}",
                         f">= {v['target']:.2f} {'ok' if v['ratio'] >= v['target'] else 'MISS'}"))
    sw = results.get("sweep")
    if sw:
        e, s = len(sw["encoders"]), len(sw["per_class"])
        rows.append((f"sweep {e}x{s}", f"{sw['sweep_seconds']:.1f} s multirun",
                     f"{sw['singles_seconds']:.1f} s for {e} single runs", f"{sw['ratio']:.2f}",
                     f"<= {sw['target']:.2f} {'ok' if sw['ratio'] <= sw['target'] else 'MISS'}"))
        rows.append((f"sweep naive {e * s} runs", f"{sw['naive_seconds']:.1f} s"
                     + ("" if sw["naive_measured"] else " (estimated)"),
                     f"{sw['singles_seconds']:.1f} s", f"{sw['naive_ratio']:.2f}",
                     f"multirun {sw['speedup_vs_naive']:.1f}x faster"))
    se = results.get("search")
    if se:
        rows.append((f"search {se['queries']} q x {se['index']} rows", f"{se['cbir_seconds']:.2f} s cbir",
                     f"{se['raw_seconds']:.2f} s raw IndexFlatIP", f"{se['ratio']:.2f}",
                     f">= {se['target']:.2f} {'ok' if se['ratio'] >= se['target'] else 'MISS'}"))
        rows.append(("search naive (1 by 1)", f"{se['cbir_seconds']:.2f} s cbir",
                     f"{se['naive_seconds_extrapolated']:.1f} s (extrapolated)",
                     f"{se['speedup_vs_naive']:.0f}x faster", ""))
    me = results.get("metrics")
    if me:
        for r in me["sizes"]:
            rows.append((f"metrics {r['queries']:,} q, k={r['k']}", f"{r['core_seconds']:.2f} s vectorised P@N",
                         f"{r['loop_seconds_extrapolated']:.1f} s loop (extrapolated)",
                         f"{r['speedup']:.0f}x faster",
                         f"evaluate {r['evaluate_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                         f"(input {r['input_mb']:.0f} MB)"))
        ok = me["evaluate_seconds_at_target"] <= me["target_seconds"]
        rows.append((f"metrics at {me['target_queries']:,} q", f"{me['evaluate_seconds_at_target']:.1f} s evaluate"
                     + ("" if me["target_measured"] else " (extrapolated)"), "", "",
                     f"<= {me['target_seconds']:.0f} s {'ok' if ok else 'MISS'}"))
    mm = results.get("memory")
    if mm:
        small, large = mm["runs"]
        ok = mm["ratio"] <= mm["target"]
        rows.append((f"memory {small['images']} vs {large['images']} images",
                     f"{large['peak_rss_mb']:.0f} MB main, {large['worker_peak_rss_mb']:.0f} MB worker at 10N",
                     f"{small['peak_rss_mb']:.0f} MB main, {small['worker_peak_rss_mb']:.0f} MB worker at N",
                     f"{mm['ratio']:.3f}",
                     f"<= {mm['target']:.2f} {'ok' if ok else 'MISS'}"))
    sc = results.get("scale")
    if sc:
        rows.append((f"scale {sc['queries']} q x {sc['index']} rows, {sc['dim']}-d",
                     f"{sc['cpu_seconds']:.1f} s CPU ({sc['gflops']:.0f} GFLOP/s)",
                     f"1.6M x 1.6M: {sc['cpu_hours_extrapolated']:.1f} CPU-h, {sc['wall_hours_extrapolated']:.1f} h wall",
                     f"query tile {sc['largest_tile_mb']:.0f} MB", "GPU: " + ("skipped (no CUDA)" if "skipped" in sc["gpu"]
                                                                  else ", ".join(f"{k2} {v['hours_extrapolated']:.2f} h"
                                                                                 for k2, v in sc["gpu"].items()))))
    return rows


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cbir benchmark (ratios measured side by side in one run)")
    for column in ("section", "cbir", "baseline", "ratio", "target"):
        table.add_column(column)
    for row in table_rows(results):
        table.add_row(*row)
    Console(width=200).print(table)


def markdown_table(results: dict) -> str:
    lines = ["| section | cbir | baseline | ratio | target |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def _metrics_for_mlflow(results: dict) -> dict[str, float]:
    from cbir.tracking import flatten

    flat = flatten(json.loads(json.dumps(results, default=str)))
    return {k.replace("@", "_at_"): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run(cfg: DictConfig, out_dir: Path) -> dict:
    import torch

    from cbir.tracking import Tracker

    bc = cfg.bench
    sizes = bc.small if bc.quick else bc.full
    if bc.threads:
        import faiss

        torch.set_num_threads(int(bc.threads))
        faiss.omp_set_num_threads(int(bc.threads))
    data_dir = Path(cfg.paths.data_dir).resolve() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbir-bench-", dir=out_dir))
    results: dict = {"meta": {"quick": bool(bc.quick), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    started = time.perf_counter()
    try:
        for name in bc.sections:
            section_start = time.perf_counter()
            log.info("bench section %s", name)
            function = SECTIONS[name]
            if name in ("extraction", "sweep", "memory"):
                results[name] = function(bc, sizes, data_dir, work / name)
            else:
                results[name] = function(bc, sizes)
            results[name]["section_seconds"] = time.perf_counter() - section_start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["meta"]["seconds"] = time.perf_counter() - started
    path = out_dir / str(bc.json)
    path.write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "bench.md").write_text(markdown_table(results) + "\n")
    print_table(results)
    print(f"results: {path}")
    tracker = Tracker.from_config(cfg)
    with tracker.start("bench-quick" if bc.quick else "bench", {"quick": bool(bc.quick)},
                       {f"bench.{k}": v for k, v in OmegaConf.to_container(bc, resolve=True).items()
                        if not isinstance(v, dict)}):
        tracker.log_metrics(_metrics_for_mlflow(results))
        tracker.log_artifact(path)
        tracker.log_artifact(out_dir / "bench.md")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
