"""Sweep: wall time of a real E x S multirun over E single runs, and the naive E x S runs that
each extract again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cbir.bench.common import child_env


def _cbir_run(cwd: Path, *overrides: str) -> float:
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cbir.run", *overrides],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cbir.run {' '.join(overrides)} failed:\n{proc.stderr[-4000:]}")
    return seconds


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    sc = bc.sweep
    encoders = [str(e) for e in sc.encoders]
    per_class = [str(p) for p in sc.per_class]
    common = [*sc.overrides, f"paths.data_dir={data_dir}", "extract.progress=false"]
    _cbir_run(
        work / "warmup",
        *common,
        f"encoder={encoders[0]}",
        f"paths.cache_dir={work / 'warmup' / 'cache'}",
        "tracking.enabled=false",
    )  # generates the dataset and warms the file cache; untimed
    sweep = _cbir_run(
        work / "sweep",
        "-m",
        *common,
        f"encoder={','.join(encoders)}",
        f"index.per_class={','.join(per_class)}",
        f"paths.cache_dir={work / 'sweep' / 'cache'}",
    )
    singles = {
        e: _cbir_run(
            work / f"single-{e}",
            *common,
            f"encoder={e}",
            f"index.per_class={per_class[0]}",
            f"paths.cache_dir={work / f'single-{e}' / 'cache'}",
        )
        for e in encoders
    }
    single_total = sum(singles.values())
    if sizes.naive_sweep:
        naive = sum(
            _cbir_run(
                work / f"naive-{e}-{p}",
                *common,
                f"encoder={e}",
                f"index.per_class={p}",
                f"paths.cache_dir={work / f'naive-{e}-{p}' / 'cache'}",
            )
            for e in encoders
            for p in per_class
        )
    else:  # each naive job is a single run with its own cache: S x the single runs
        naive = single_total * len(per_class)
    return {
        "encoders": encoders,
        "per_class": per_class,
        "jobs": len(encoders) * len(per_class),
        "sweep_seconds": sweep,
        "single_seconds": singles,
        "singles_seconds": single_total,
        "naive_seconds": naive,
        "naive_measured": bool(sizes.naive_sweep),
        "ratio": sweep / single_total,
        "naive_ratio": naive / single_total,
        "speedup_vs_naive": naive / sweep,
        "target": float(sc.target),
        "baseline": f"{len(encoders)} single runs (one extraction each)",
    }


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    rows = []
    e, s = len(result["encoders"]), len(result["per_class"])
    rows.append(
        (
            f"sweep {e}x{s}",
            f"{result['sweep_seconds']:.1f} s multirun",
            f"{result['singles_seconds']:.1f} s for {e} single runs",
            f"{result['ratio']:.2f}",
            f"<= {result['target']:.2f} {'ok' if result['ratio'] <= result['target'] else 'MISS'}",
        )
    )
    rows.append(
        (
            f"sweep naive {e * s} runs",
            f"{result['naive_seconds']:.1f} s" + ("" if result["naive_measured"] else " (estimated)"),
            f"{result['singles_seconds']:.1f} s",
            f"{result['naive_ratio']:.2f}",
            f"multirun {result['speedup_vs_naive']:.1f}x faster",
        )
    )
    return rows
