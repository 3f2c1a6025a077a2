"""What every benchmark section shares: child processes, the synthetic data, encoders built
with random weights, and peak-memory readings."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cbir import CONFIG_DIR

log = logging.getLogger("cbir.bench")
CONF = Path(CONFIG_DIR)
PROJECT = CONF.parent


def peak_rss_mb() -> float:
    """Peak resident set size of this process. VmHWM starts afresh at exec; ru_maxrss would
    include the launching process's peak, inherited through fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
    }


def run_child(target: str, spec: dict, timeout: int = 1200) -> dict:
    """Run `target(spec)` ("module:function") in a fresh interpreter; it prints one JSON line."""
    module, function = target.split(":")
    code = f"import sys; from {module} import {function}; {function}(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=child_env(), timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic(root: Path, n: int, image_size: int):
    """A synthetic dataset with at least n images of the given size; its first n rows."""
    from cbir.data.synthetic import SyntheticDataset

    per_class = max(2, math.ceil(n / 36) + 1)  # 4 modalities x 3 anatomies x 3 pathologies
    dataset = SyntheticDataset(
        root=root / f"synthetic-{image_size}px-{per_class}",
        max_per_class=per_class,
        min_per_class=per_class,
        image_size=image_size,
    )
    manifest = dataset.load_manifest()
    table = manifest.table.iloc[:n].reset_index(drop=True)
    return manifest.with_table(table)


def encoder_config(name: str, overrides: dict | None = None) -> DictConfig:
    cfg = OmegaConf.load(CONF / "encoder" / f"{name}.yaml")
    cfg.pop("defaults", None)
    if "pretrained" in cfg:
        cfg.pretrained = False  # random weights: no hub, same cost
        cfg.weights = None
    return OmegaConf.merge(cfg, overrides or {})


def build_encoder(name: str):
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(encoder_config(name))


def extract_cfg(**overrides) -> DictConfig:
    cfg = OmegaConf.load(CONF / "extract" / "default.yaml")
    cfg.progress = False
    return OmegaConf.merge(cfg, overrides)


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x
