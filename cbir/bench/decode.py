"""Decode benchmark: `python -m cbir.bench.decode [images=64] [size=1024] [quick=true]` (conf/bench_decode.yaml).

E single-encoder extractions (one decode per image per encoder, as E separate jobs do) against
one shared pass (`cbir.extract.shared`, one decode per image for all E), on the same images, in
this process, alternating their order to even out drift. The shared pass also reports where
its time goes, per encoder: decode and preprocess (loader workers), forward and write (main
process). A per-image micro-measure of decode and of CPU preprocessing at the study's input
sizes gives the parts the README's projection for 1.6M images is built from.

Images are synthetic radiograph-like 8-bit grey PNGs (smooth anatomy-like structure plus
noise, so they compress like real X-ray PNGs rather than like flat test images).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cbir import CONFIG_DIR  # noqa: E402

log = logging.getLogger("cbir.bench.decode")

# Encoder sets, random weights. `cheap`: three encoders whose forward and preprocessing
# (bilinear, grey, small) cost little next to decoding a large PNG, the case a shared pass is
# for. `mixed`: a 160-px bicubic RGB ViT in place of one, where resizing costs more than decoding.
BASELINE = {"_target_": "cbir.encoders.classical.ClassicalEncoder", "name": "baseline"}
RANDOM = {"_target_": "cbir.encoders.control.RandomEncoder", "name": "random"}
ENCODER_SETS = {
    "cheap": {
        "baseline": BASELINE,
        "random": RANDOM,
        "random96": {**RANDOM, "name": "random96", "image_size": 96, "dim": 32},
    },
    "mixed": {
        "baseline": BASELINE,
        "random": RANDOM,
        "tiny_vit": {
            "_target_": "cbir.encoders.timm_encoder.TimmEncoder",
            "name": "tiny_vit",
            "model_name": "test_vit",
            "pretrained": False,
            "preprocess": {"mode": "squash", "crop": 160, "interpolation": "bicubic"},
        },
    },
}
# CPU preprocessing of one decoded image at the study's input sizes (resize the shorter side
# then centre-crop, bicubic, RGB as the neural encoders use)
PREPROCESS_SIZES = (224, 518, 768, 1024)

# The study's 14 encoders for the projection: (input size, preprocessing group, GPU images/s).
# Encoders in one preprocessing group share one input in the shared pass. GPU throughput: timm's
# published inference benchmark (results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv: one
# RTX 4090, AMP, NCHW, batch up to 1024); rows marked ~ are scaled from the nearest listed model
# by token count (same family, other resolution or patch size).
STUDY_ENCODERS = {
    "resnet50": (224, "bilinear-256-224-imagenet", 4218),
    "vit": (224, "squash-224-half", 2787),
    "dinov2": (224, "bicubic-256-224-imagenet", 2130),  # ~ vit_base_patch16_224 x 196/256 tokens
    "dinov2_small": (224, "bicubic-256-224-imagenet", 5890),  # ~ vit_small_patch16_224 x 196/256
    "dinov2_large": (224, "bicubic-256-224-imagenet", 658),  # vit_large_patch14_clip_224 (same tokens)
    "mae": (224, "squash-224-imagenet", 2787),
    "clip": (224, "bicubic-224-clip", 566),  # vit_large_patch14_clip_quickgelu_224
    "bmc_clip": (224, "bicubic-224-clip", 658),
    "biomedclip": (224, "bicubic-224-clip", 2784),  # vit_base_patch16_clip_224
    "medclip": (224, "pad-square-224", 2659),  # swin_tiny_patch4_window7_224
    "sam": (1024, "longest-pad-1024", 31.1),  # samvit_base_patch16 at 1024
    "medsam": (1024, "squash-1024-minmax", 31.1),
    "ark": (768, "squash-768", 46),  # ~ swin_large_patch4_window12_384 (185.9) / 4 (4x the tokens)
    "rad_dino": (518, "bicubic-518", 330),  # vit_base_patch14_dinov2 at 518
}


def projection(per_image: dict, images: int = 1_600_000, cores: int = 16, gpu_speedup: float = 1.0) -> dict:
    """Hours for the study's encoders on one GPU node, from the measured per-image parts.

    E single passes: each encoder's job decodes and preprocesses on `cores` loader cores while
    the GPU runs that encoder; a job takes the longer of the two. The shared pass: one decode
    plus one preprocessing per distinct group on the cores, all forwards on the GPU, the longer
    of the two; with device preprocessing the cores only decode. `gpu_speedup` scales the
    published RTX 4090 throughput (e.g. ~2 for an H100 in bf16)."""

    def prep_s(size: int) -> float:
        known = min(PREPROCESS_SIZES, key=lambda s: abs(s - size))
        return per_image[f"preprocess_{known}_ms"] / 1000

    decode_s = per_image["decode_ms"] / 1000
    gpu = {name: images / (ips * gpu_speedup) for name, (_, _, ips) in STUDY_ENCODERS.items()}
    singles = sum(
        max(images * (decode_s + prep_s(size)) / cores, gpu[name]) for name, (size, _, _) in STUDY_ENCODERS.items()
    )
    groups = {group: size for size, group, _ in STUDY_ENCODERS.values()}
    cpu_shared = images * (decode_s + sum(prep_s(size) for size in groups.values())) / cores
    cpu_device = images * decode_s / cores
    gpu_total = sum(gpu.values())
    hours = 3600
    return {
        "images": images,
        "cores": cores,
        "gpu_speedup": gpu_speedup,
        "encoders": len(STUDY_ENCODERS),
        "preprocess_groups": len(groups),
        "singles_hours": singles / hours,
        "singles_cpu_hours": sum(images * (decode_s + prep_s(s)) / cores for s, _, _ in STUDY_ENCODERS.values())
        / hours,
        "shared_cpu_hours": cpu_shared / hours,
        "shared_device_cpu_hours": cpu_device / hours,
        "gpu_hours": gpu_total / hours,
        "shared_hours": max(cpu_shared, gpu_total) / hours,
        "shared_device_hours": max(cpu_device, gpu_total) / hours,
        "bound": "GPU (encoder forward)" if gpu_total >= cpu_shared else "CPU (decode + preprocess)",
        "gpu_hours_sam_medsam_ark": sum(gpu[n] for n in ("sam", "medsam", "ark")) / hours,
    }


def radiograph_pngs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """n grey PNGs of size x size, reused when already written with the same parameters."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    marker = folder / f"params-{n}-{size}-{seed}.json"
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    if marker.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for path in paths:
        body = np.exp(-((((xx - 0.5) / 0.35) ** 2 + ((yy - 0.55) / 0.45) ** 2) ** 2))  # bright body
        lungs = sum(np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.45) / 0.25) ** 2)) for cx in (0.33, 0.67))
        texture = gaussian_filter(rng.standard_normal((size, size)), size / 128)  # ribs/vessels-like structure
        image = 170 * body - 90 * lungs + 25 * texture / texture.std() + rng.normal(0, 3, (size, size)) + 30
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    marker.write_text(json.dumps({"n": n, "size": size, "seed": seed}))
    return paths


def manifest_of(paths: list[Path]):
    import pandas as pd

    from cbir.data.manifest import Manifest

    table = pd.DataFrame(
        {
            "path": [p.name for p in paths],
            "dataset": "bench",
            "split": "train",
            "modality": "XR",
            "anatomy": "chest",
            "label": "XR/chest/normal",
        }
    )
    return Manifest(table=table, root=paths[0].parent, source="bench images")


def build_encoders(encoder_set: str = "cheap") -> list:
    import torch
    from hydra.utils import instantiate

    out = []
    for config in ENCODER_SETS[encoder_set].values():
        torch.manual_seed(0)
        out.append(instantiate(config))
    return out


def extract_config(**overrides):
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "extract" / "default.yaml")
    cfg.progress = False
    return OmegaConf.merge(cfg, overrides)


def per_image_parts(paths: list[Path], repeats: int = 3) -> dict:
    """Median ms per image (one core) of decoding and of preprocessing at each study size."""
    from cbir.data.images import load_image
    from cbir.encoders.preprocess import Preprocess

    def median_ms(function, items) -> float:
        times = []
        for _ in range(repeats):
            for item in items:
                start = time.perf_counter()
                function(item)
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    sample = paths[: min(len(paths), 8)]
    images = [load_image(p) for p in sample]
    out = {
        "decode_ms": median_ms(load_image, sample),
        "file_kb": float(np.mean([p.stat().st_size for p in sample]) / 1024),
    }
    for size in PREPROCESS_SIZES:
        transform = Preprocess(mode="shortest", resize=size, crop=size, interpolation="bicubic").build()
        out[f"preprocess_{size}_ms"] = median_ms(transform, images)
    return out


def run(
    images: int = 64,
    size: int = 1024,
    repeats: int = 2,
    batch_size: int = 16,
    num_workers: int = 1,
    data_dir: Path | None = None,
    work: Path | None = None,
    encoder_set: str = "cheap",
) -> dict:
    import torch

    from cbir.extract.shared import extract_shared
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore

    data_dir = Path(data_dir or Path("data") / "bench_decode") / f"{size}px"
    paths = radiograph_pngs(data_dir, images, size)
    manifest = manifest_of(paths)
    work = Path(work or tempfile.mkdtemp(prefix="cbir-bench-decode-"))
    cfg = extract_config(batch_size=batch_size, num_workers=num_workers, accelerator="auto")
    singles, shared, parts = [], [], []

    def fresh(name: str) -> EmbeddingStore:
        shutil.rmtree(work / name, ignore_errors=True)
        return EmbeddingStore(work / name)

    def run_singles() -> float:
        total = 0.0
        for encoder in build_encoders(encoder_set):
            total += extract_embeddings(encoder, manifest, fresh("single"), cfg).seconds
        return total

    def run_shared() -> float:
        result = extract_shared(build_encoders(encoder_set), manifest, fresh("shared"), cfg)
        assert result.decodes == images, result.decodes
        parts.append(result.timings)
        return result.seconds

    for r in range(repeats):  # alternate the order: singles-shared, shared-singles, ...
        order = (("singles", run_singles), ("shared", run_shared))
        for name, fn in order if r % 2 == 0 else reversed(order):
            (singles if name == "singles" else shared).append(fn())
    device_shared = extract_shared(
        build_encoders(encoder_set),
        manifest,
        fresh("device"),
        extract_config(batch_size=batch_size, num_workers=num_workers, device_preprocess=True),
    ).seconds
    single_s, shared_s = statistics.mean(singles), statistics.mean(shared)
    timing = {
        name: {part: statistics.mean(p[name][part] for p in parts) for part in parts[0][name]} for name in parts[0]
    }
    busy = sum(sum(v.values()) for v in timing.values())
    decode = sum(v["decode"] for v in timing.values())
    shutil.rmtree(work, ignore_errors=True)
    return {
        "images": images,
        "image_size": size,
        "encoder_set": encoder_set,
        "encoders": list(ENCODER_SETS[encoder_set]),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "singles_seconds": single_s,
        "shared_seconds": shared_s,
        "ratio": shared_s / single_s,
        "target": 0.6,
        "shared_device_preprocess_seconds": device_shared,
        "singles_runs": singles,
        "shared_runs": shared,
        "shared_parts_seconds": timing,
        "decode_share": decode / busy if busy else float("nan"),
        "per_image": per_image_parts(paths),
    }


def with_projection(result: dict, cores: int = 16, gpu_speedup: float = 1.0) -> dict:
    return {**result, "projection": projection(result["per_image"], cores=cores, gpu_speedup=gpu_speedup)}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"one decode per image: {result['images']} PNGs of {result['image_size']} px, "
        f"encoders {', '.join(result['encoders'])}"
    )
    for column in ("encoder", "decode s", "preprocess s", "forward s", "write s"):
        table.add_column(column)
    for name, parts in result["shared_parts_seconds"].items():
        table.add_row(name, *(f"{parts[k]:.2f}" for k in ("decode", "preprocess", "forward", "write")))
    console = Console()
    console.print(table)
    console.print(
        f"E single passes {result['singles_seconds']:.1f} s, one shared pass {result['shared_seconds']:.1f} s: "
        f"ratio {result['ratio']:.2f} (target <= {result['target']}); decode share of the shared pass's "
        f"work {result['decode_share']:.0%}; shared with device_preprocess "
        f"{result['shared_device_preprocess_seconds']:.1f} s"
    )
    per = result["per_image"]
    console.print(
        "per image, one core: decode {decode_ms:.1f} ms ({file_kb:.0f} kB PNG); ".format(**per)
        + ", ".join(f"preprocess to {s} px {per[f'preprocess_{s}_ms']:.1f} ms" for s in PREPROCESS_SIZES)
    )
    pr = result.get("projection")
    if pr:
        console.print(
            f"projection, {pr['encoders']} encoders x {pr['images']:,} images, {pr['cores']} loader cores, GPU "
            f"{pr['gpu_speedup']:g} x RTX 4090: E single passes {pr['singles_hours']:.1f} h; shared pass "
            f"{pr['shared_hours']:.1f} h (CPU {pr['shared_cpu_hours']:.1f} h, GPU {pr['gpu_hours']:.1f} h, of which "
            f"SAM+MedSAM+Ark {pr['gpu_hours_sam_medsam_ark']:.1f} h); with device preprocessing "
            f"{pr['shared_device_hours']:.1f} h (CPU {pr['shared_device_cpu_hours']:.1f} h). Bound: {pr['bound']}"
        )


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench_decode")
    def bench(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.WARNING)
        images, size, repeats = (16, 512, 1) if cfg.quick else (int(cfg.images), int(cfg.size), int(cfg.repeats))
        if cfg.encoders not in ENCODER_SETS:
            raise SystemExit(f"encoders={cfg.encoders}: use one of {', '.join(sorted(ENCODER_SETS))}")
        result = with_projection(
            run(images, size, repeats, int(cfg.batch_size), int(cfg.num_workers), encoder_set=str(cfg.encoders)),
            int(cfg.cores),
            float(cfg.gpu_speedup),
        )
        print_table(result)
        if cfg.json:
            Path(cfg.json).write_text(json.dumps(result, indent=1))
            print(f"written: {cfg.json}")

    bench()


if __name__ == "__main__":
    main()
