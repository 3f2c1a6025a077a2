"""The benchmark runs end to end (quick mode, shrunk further) and writes every section."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cbir

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

SECTIONS = ("extraction", "sweep", "search", "metrics", "memory", "scale", "uncertainty")


def test_quick_benchmark_writes_all_sections(tmp_path, shared_data_dir):
    out = tmp_path / "out"
    proc = run_cbir(
        tmp_path,
        "bench.quick=true",
        f"paths.data_dir={shared_data_dir}",
        f"hydra.run.dir={out}",
        "bench.extraction.encoders=[resnet50]",
        "bench.extraction.batch_size=4",
        "bench.small.extract_images=8",
        "bench.extraction.image_size=64",
        "bench.sweep.encoders=[baseline]",
        "bench.sweep.per_class=[3,all]",
        "bench.small.search_index=5000",
        "bench.small.search_queries=500",
        "bench.small.naive_search_queries=20",
        "bench.small.metrics_queries=[2000]",
        "bench.small.memory_images=20",
        "bench.small.scale_index=5000",
        "bench.small.scale_queries=100",
        "bench.small.uncertainty_queries=[20000]",
        "bench.small.coverage_datasets=20",
        module="cbir.bench",
    )
    results = json.loads((out / "bench.json").read_text())
    assert all(math.isfinite(results[section]["ratio"]) for section in SECTIONS)
    # each ratio is what its section says it is, from the numbers it recorded (no timing asserted)
    extraction, sweep, search = results["extraction"], results["sweep"], results["search"]
    assert extraction["ratio"] == pytest.approx(
        min(v["pipeline_images_per_s"] / v["forward_images_per_s"] for v in extraction["encoders"].values())
    )
    assert sweep["ratio"] == pytest.approx(sweep["sweep_seconds"] / sweep["singles_seconds"])
    assert sweep["singles_seconds"] == pytest.approx(sum(sweep["single_seconds"].values()))
    assert search["ratio"] == pytest.approx(search["raw_seconds"] / search["cbir_seconds"])
    assert results["metrics"]["ratio"] == pytest.approx(min(r["speedup"] for r in results["metrics"]["sizes"]))
    memory = results["memory"]
    assert memory["ratio"] == pytest.approx(max(memory["main_ratio"], memory["worker_ratio"]))
    small, large = memory["runs"]
    assert memory["main_ratio"] == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"])
    # tiling: the full score matrix over the largest tile, sizes computed, not timed
    scale = results["scale"]
    assert scale["ratio"] == pytest.approx(scale["full_matrix_mb"] / scale["largest_tile_mb"]) and scale["ratio"] > 1
    for v in results["extraction"]["encoders"].values():
        assert v["pipeline_images_per_s"] > 0 and v["forward_images_per_s"] > 0
    assert results["sweep"]["jobs"] == 2 and results["sweep"]["sweep_seconds"] > 0
    assert results["search"]["top1_agreement"] == 1.0
    assert all(r["loop_agrees"] and r["peak_rss_mb"] > 0 for r in results["metrics"]["sizes"])
    assert [r["images"] for r in results["memory"]["runs"]] == [20, 200]
    assert "skipped" in results["scale"]["gpu"] or results["scale"]["gpu"]
    assert results["uncertainty"]["sizes"][0]["pairs"] == 4 and results["uncertainty"]["coverage"]["datasets"] == 20
    assert "extraction resnet50" in proc.stdout and (out / "bench.md").exists()
    # logged to MLflow, experiment cbir-bench
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("cbir-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and "search.ratio" in run.data.metrics
