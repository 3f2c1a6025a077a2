"""Memory: peak RSS of an extraction of N and 10 x N images (each in its own process)."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

from cbir.bench.common import build_encoder, extract_cfg, peak_rss_mb, run_child, synthetic


def child(spec_json: str) -> None:
    """One extraction in a clean process: prints peak RSS (this process and its workers)."""
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore

    spec = json.loads(spec_json)
    manifest = synthetic(Path(spec["data_dir"]), int(spec["images"]), int(spec["image_size"]))
    encoder = build_encoder(spec["encoder"])
    baseline = peak_rss_mb()
    cfg = extract_cfg(batch_size=32, num_workers=1, accelerator="auto")
    extraction = extract_embeddings(encoder, manifest, EmbeddingStore(spec["cache"]), cfg)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "images": len(manifest),
                "seconds": extraction.seconds,
                "peak_rss_mb": peak_rss_mb(),
                "rss_before_extraction_mb": baseline,
                "worker_peak_rss_mb": children,
                "embedding_mb": extraction.embeddings.nbytes / 2**20,
            }
        )
    )


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    mc = bc.memory
    n = int(sizes.memory_images)
    synthetic(data_dir, 10 * n, int(mc.image_size))  # generate once, outside the measurement
    runs = []
    for images in (n, 10 * n):
        cache = work / f"memory-{images}"
        shutil.rmtree(cache, ignore_errors=True)
        runs.append(
            run_child(
                "cbir.bench.memory:child",
                {
                    "images": images,
                    "image_size": int(mc.image_size),
                    "encoder": str(mc.encoder),
                    "data_dir": str(data_dir),
                    "cache": str(cache),
                },
            )
        )
        shutil.rmtree(cache, ignore_errors=True)
    small, large = runs

    main = large["peak_rss_mb"] / small["peak_rss_mb"]
    worker = large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"]
    return {
        "runs": runs,
        "ratio": max(main, worker),
        "main_ratio": main,
        "worker_ratio": worker,
        "target": 1 + float(mc.target),
        "baseline": f"peak RSS at N={n} (ratio = peak at 10N / peak at N; the larger of the main "
        "process and the decoding worker)",
    }


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    rows = []
    small, large = result["runs"]
    ok = result["ratio"] <= result["target"]
    rows.append(
        (
            f"memory {small['images']} vs {large['images']} images",
            f"{large['peak_rss_mb']:.0f} MB main, {large['worker_peak_rss_mb']:.0f} MB worker at 10N",
            f"{small['peak_rss_mb']:.0f} MB main, {small['worker_peak_rss_mb']:.0f} MB worker at N",
            f"{result['ratio']:.3f}",
            f"<= {result['target']:.2f} {'ok' if ok else 'MISS'}",
        )
    )
    return rows
