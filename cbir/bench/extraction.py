"""Extraction: full pipeline (decode, preprocess, Lightning predict, writer) images/s over the
encoder's forward-only images/s on ready-made tensors (same batch size, precision)."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from cbir.bench.common import CONF, build_encoder, extract_cfg, synthetic

log = logging.getLogger("cbir.bench")


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    import torch

    from cbir.extract.single import _probe_shape, extract_embeddings, resolve_precision
    from cbir.extract.store import EmbeddingStore

    ec = bc.extraction
    n = int(sizes.extract_images)
    manifest = synthetic(data_dir, n, int(ec.image_size))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(str(ec.precision), accelerator)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    out = {
        "images": n,
        "image_size": int(ec.image_size),
        "batch_size": int(ec.batch_size),
        "precision": precision,
        "device": str(device),
        "encoders": {},
    }
    for name in ec.encoders:
        if not (CONF / "encoder" / f"{name}.yaml").exists():
            log.warning("extraction: no conf/encoder/%s.yaml, skipped", name)
            continue
        encoder = build_encoder(name).eval()
        batch = int(ec.batch_size)
        shape = _probe_shape(encoder.transform())
        x = torch.randn(batch, *shape)
        if ec.channels_last and x.ndim == 4:
            encoder.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        encoder.to(device)
        x = x.to(device)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
            if "mixed" in precision
            else None
        )
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
        cfg = extract_cfg(
            batch_size=batch,
            num_workers=int(ec.num_workers),
            precision=precision,
            accelerator="auto",
            channels_last=bool(ec.channels_last),
            compile=bool(ec.compile),
        )
        cache = work / f"extract-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        extraction = extract_embeddings(encoder, manifest, EmbeddingStore(cache), cfg)
        pipeline = n / extraction.seconds
        assert extraction.rows_extracted == n and bool(np.isfinite(extraction.embeddings).all())
        shutil.rmtree(cache, ignore_errors=True)
        encoder.to(device)
        after = forward_only() if sizes.forward_twice else before  # before and after: less noise
        forward_ips = (before + after) / 2
        out["encoders"][name] = {
            "pipeline_images_per_s": pipeline,
            "forward_images_per_s": forward_ips,
            "forward_before": before,
            "forward_after": after,
            "ratio": pipeline / forward_ips,
            "target": float(ec.target),
        }
        log.info("extraction %s: pipeline %.1f img/s, forward-only %.1f img/s", name, pipeline, forward_ips)
        encoder = forward = None  # free this model before the next one is built
    ratios = [v["ratio"] for v in out["encoders"].values()]
    out["ratio"] = min(ratios) if ratios else float("nan")
    out["target"] = float(ec.target)
    out["baseline"] = "encoder forward-only on ready-made tensors"
    return out


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    rows = []
    for name, v in result["encoders"].items():
        rows.append(
            (
                f"extraction {name}",
                f"{v['pipeline_images_per_s']:.1f} img/s pipeline",
                f"{v['forward_images_per_s']:.1f} img/s forward-only",
                f"{v['ratio']:.2f}",
                f">= {v['target']:.2f} {'ok' if v['ratio'] >= v['target'] else 'MISS'}",
            )
        )
    return rows
