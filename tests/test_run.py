"""End to end: `python -m cbir.run` as a user runs it, into a temporary MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir
from mlflow.tracking import MlflowClient

from cbir.data.synthetic import SyntheticDataset


def client(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlruns/mlflow.db")


def job_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "outputs").glob("*/*/metrics.json"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared_data_dir):
    cwd = tmp_path_factory.mktemp("e2e")
    proc = run_cbir(cwd, "debug=smoke", f"paths.data_dir={shared_data_dir}")
    return cwd, proc


@pytest.mark.slow
def test_run_logs_metrics_params_and_artifacts(first_run):
    cwd, proc = first_run
    assert "P@1" in proc.stdout and "micro/macro" in proc.stdout  # the rich summary table
    runs = client(cwd).search_runs([client(cwd).get_experiment_by_name("cbir").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # the job directory holds the same numbers MLflow has
    (job,) = job_dirs(cwd)
    saved = json.loads((job / "metrics.json").read_text())["metrics"]
    for name in (
        "micro/P_at_1",
        "macro/P_at_10",
        "modality/CT/micro/P_at_1",
        "level/anatomy/micro/P_at_1",
        "anatomy/chest/macro/P_at_5",
        "micro_std/P_at_1",
    ):
        assert run.data.metrics[name] == pytest.approx(saved[name])
    assert 0 < run.data.metrics["micro/P_at_1"] <= 1
    assert run.data.metrics["queries/excluded"] == 0
    # params: flattened resolved config plus encoder facts
    params = run.data.params
    assert params["encoder.name"] == "baseline" and params["dataset.name"] == "synthetic"
    assert params["eval.n"] == "[1, 3, 5, 10]" and params["index.type"] == "flat"
    assert int(params["encoder_info.dim"]) > 0
    tags = run.data.tags
    assert tags["encoder"] == "baseline" and tags["per_class"] == "all" and tags["cache"] == "miss"
    assert len(tags["config_hash"]) == 16
    artifacts = {a.path for a in client(cwd).list_artifacts(run.info.run_id)}
    assert {"metrics.json", "per_class.csv", "precision_curve.csv", "config", "dataset"} <= artifacts
    class_counts = {Path(a.path).name for a in client(cwd).list_artifacts(run.info.run_id, "dataset")}
    assert "class_counts.csv" in class_counts
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == params["dataset_info.digest"]
    config_files = {Path(a.path).name for a in client(cwd).list_artifacts(run.info.run_id, "config")}
    assert {"config.yaml", "overrides.yaml"} <= config_files
    # the curve is logged with step = N
    history = client(cwd).get_metric_history(run.info.run_id, "curve/micro")
    assert [m.step for m in history] == list(range(1, 21))
    assert history[0].value == pytest.approx(run.data.metrics["micro/P_at_1"])
    per_class = pd.read_csv(job / "per_class.csv")
    assert {"class", "queries", "n_index", "P@1", "P@10", "most_confused"} <= set(per_class.columns)
    assert list(per_class.columns[:5]) == ["class", "P@1", "P@3", "P@5", "P@10"]  # visible first in the viewer
    assert per_class["queries"].sum() == run.data.metrics["queries/total"]


@pytest.mark.slow
def test_second_identical_run_does_not_extract_again(first_run, shared_data_dir):
    cwd, _ = first_run
    run_cbir(cwd, "debug=smoke", f"paths.data_dir={shared_data_dir}", "index.per_class=3")
    runs = client(cwd).search_runs(
        [client(cwd).get_experiment_by_name("cbir").experiment_id], order_by=["attributes.start_time DESC"]
    )
    assert len(runs) == 2
    latest = runs[0]
    assert latest.data.tags["cache"] == "hit" and latest.data.metrics["extract/rows"] == 0
    assert latest.data.tags["per_class"] == "3"
    assert latest.data.metrics["index/size"] <= 3 * 36


@pytest.mark.slow
def test_anatomy_is_easier_than_pathology_and_baseline_beats_chance(tmp_path, shared_data_dir):
    """The metrics discriminate: the baseline scores far above chance, the random control at
    chance (computed from the class frequencies), and coarse levels are easier."""
    from cbir.evaluate import retrieval
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore

    cfg = compose("debug=smoke", f"paths.data_dir={shared_data_dir}", f"paths.cache_dir={tmp_path}")
    manifest = SyntheticDataset(**{k: v for k, v in cfg.dataset.items() if k != "_target_"}).load_manifest()
    table = manifest.table
    scores = {}
    for name in ("baseline", "random"):
        from hydra.utils import instantiate

        encoder = instantiate(compose("debug=smoke", f"encoder={name}").encoder)
        extraction = extract_embeddings(encoder, manifest, EmbeddingStore(tmp_path), cfg.extract)
        setup = retrieval.choose_rows(table, extraction.valid, "train", "test", None, 0)
        scores[name] = retrieval.run_retrieval(table, extraction.embeddings, setup, cfg.index, [1, 5]).metrics
    train = table[table.split == "train"]["label"].value_counts(normalize=True)
    test = table[table.split == "test"]["label"].value_counts(normalize=True)
    chance = float((test * train.reindex(test.index).fillna(0)).sum())
    n_queries = int((table.split == "test").sum())
    tolerance = 3 * np.sqrt(chance * (1 - chance) / n_queries) + 0.01
    assert abs(scores["random"]["micro/P_at_1"] - chance) < tolerance
    assert scores["baseline"]["micro/P_at_1"] > 4 * chance
    assert scores["baseline"]["level/anatomy/micro/P_at_1"] > scores["baseline"]["micro/P_at_1"]
    assert scores["baseline"]["level/modality/micro/P_at_1"] >= scores["baseline"]["level/anatomy/micro/P_at_1"]


def test_synthetic_dataset_is_deterministic_and_long_tailed(tmp_path):
    a = SyntheticDataset(root=tmp_path / "a", max_per_class=20, min_per_class=4, image_size=32).load_manifest()
    b = SyntheticDataset(root=tmp_path / "b", max_per_class=20, min_per_class=4, image_size=32).load_manifest()
    assert a.table.equals(b.table)
    first = a.table.path.iloc[5]
    assert (a.root / first).read_bytes() == (b.root / first).read_bytes()
    counts = a.table.label.value_counts()
    assert len(counts) == 36 and counts.max() == 20 and counts.min() == 4
    assert set(a.table.modality) == {"CT", "MR", "US", "XR"}
    per_class_test = a.table[a.table.split == "test"].label.value_counts()
    assert len(per_class_test) == 36  # every class can be queried


def test_bad_config_fails_before_any_work(tmp_path):
    proc = run_cbir(tmp_path, "index.per_class=0", check=False)
    assert proc.returncode != 0
    assert "index.per_class=0: must be positive" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
