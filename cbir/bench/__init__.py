"""Performance benchmark: `python -m cbir.bench [bench.quick=true] [overrides]`.

Each section measures cbir's path and a baseline side by side, in this process (or in child
processes started from it) on the same data, and reports their ratio; absolute times on a
shared machine are context only.

1. extraction: full pipeline (decode, preprocess, Lightning predict, writer) images/s over
   the encoder's forward-only images/s on ready-made tensors (same batch size, precision);
2. sweep: wall time of a real E x S multirun over E single runs, and the naive E x S runs
   that each extract again;
3. search: cbir.evaluate.index.search over raw `IndexFlatIP.search`, and over one-at-a-time add/search;
4. metrics: vectorised modified P@N over a per-query loop, at growing query counts, with
   the full `evaluate` time and peak RSS (each size in its own process);
5. memory: peak RSS of an extraction of N and 10 x N images (each in its own process);
6. scale: exact tiled search extrapolated to 1.6M queries x 1.6M index rows (GPU measured
   when present);
7. serving (opt-in, `bench.sections=[serving]`): a job's `retriever` model behind `mlflow models
   serve` on loopback, images/s and latency p50/p95 at batch 1 and 32, over in-process predict.
8. uncertainty: bootstrap intervals and paired comparisons over per-query records up to 1.6M
   queries, over explicit index-array resampling; coverage of the 95 % interval.
9. published (opt-in, bench.sections=[published]): the Table-1 evaluation on fabricated study
   files at 1.6M rows, over exact flat search, and its peak RSS over the embedding matrix.

One module per section (`measure` returns the section's figures, `rows` its table lines); the
shared plumbing (child processes, synthetic data, encoders) is in `common.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cbir import CONFIG_DIR  # noqa: E402
from cbir.bench import extraction, memory, metrics, published, scale, search, serving, sweep, uncertainty  # noqa: E402

log = logging.getLogger("cbir.bench")
SECTIONS = {
    "extraction": extraction,
    "sweep": sweep,
    "search": search,
    "metrics": metrics,
    "memory": memory,
    "scale": scale,
    "serving": serving,
    "uncertainty": uncertainty,
    "published": published,
}


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    return [row for name, section in SECTIONS.items() if results.get(name) for row in section.rows(results[name])]


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
    from cbir.tracking.runs import flatten

    flat = flatten(json.loads(json.dumps(results, default=str)))
    return {
        k.replace("@", "_at_"): float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def run(cfg: DictConfig, out_dir: Path) -> dict:
    import torch

    from cbir.tracking.runs import Tracker

    bc = cfg.bench
    sizes = bc.small if bc.quick else bc.full
    if bc.threads:
        import faiss

        torch.set_num_threads(int(bc.threads))
        faiss.omp_set_num_threads(int(bc.threads))
    data_dir = Path(cfg.paths.data_dir).resolve() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbir-bench-", dir=out_dir))
    results: dict = {
        "meta": {
            "quick": bool(bc.quick),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    }
    started = time.perf_counter()
    try:
        for name in bc.sections:
            section_start = time.perf_counter()
            log.info("bench section %s", name)
            results[name] = SECTIONS[name].measure(bc, sizes, data_dir, work / name)
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
    with tracker.start(
        "bench-quick" if bc.quick else "bench",
        {"quick": bool(bc.quick)},
        {f"bench.{k}": v for k, v in OmegaConf.to_container(bc, resolve=True).items() if not isinstance(v, dict)},
    ):
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
