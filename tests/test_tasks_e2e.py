"""The classification tasks end to end: `python -m cbir.run task=...` into MLflow, a multirun over
encoders and tasks, and the report tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose, run_cbir
from mlflow.tracking import MlflowClient

from cbir.evaluate import classification

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

QUICK = ["debug=smoke", "++task.probe.max_epochs=3"]  # ++: the probe node exists only in some tasks


def runs(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("cbir")
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def test_task_is_part_of_the_config_and_its_hash():
    from cbir.tracking import runs as tracking

    default = compose()
    assert default.task.name == "retrieval" and list(default.task.evaluations) == ["retrieval"]
    knn = compose("task=knn_classification")
    assert knn.task.knn.k_max == 99 and knn.task.knn.mode == "study"
    both = compose("task=all")
    assert both.task.knn.k_max == 99 and both.task.probe.batch_size == 512 and both.task.probe.patience == 20
    assert len({tracking.config_hash(c) for c in (default, knn, both)}) == 3


@pytest.mark.slow
def test_all_tasks_in_one_run(tmp_path, shared_data_dir):
    proc = run_cbir(tmp_path, *QUICK, "task=all", f"paths.data_dir={shared_data_dir}")
    assert "knn_classification" in proc.stdout and "linear_probe" in proc.stdout and "P@1" in proc.stdout
    client, found = runs(tmp_path)
    (run,) = found
    assert run.data.tags["task"] == "all" and run.info.run_name.endswith(" · task=all")
    m = run.data.metrics
    for prefix in ("knn", "probe"):
        for name in classification.METRICS:
            assert 0 <= m[f"{prefix}/{name}"] <= 1, (prefix, name)
        assert f"{prefix}/modality/CT/macro_f1" in m
    assert "micro/P_at_1" in m  # retrieval too
    # the k-NN numbers in MLflow are those of the job directory; the first neighbour decides at k=1
    (job,) = [p.parent for p in (tmp_path / "outputs").glob("*/*/knn_metrics.json")]
    saved = json.loads((job / "knn_metrics.json").read_text())
    assert m["knn/macro_f1"] == pytest.approx(saved["metrics"]["macro_f1"]) and m["knn/k"] == saved["k"]
    val_curve = client.get_metric_history(run.info.run_id, "knn/val/micro_f1")
    assert sorted(p.step for p in val_curve) == list(range(1, 100))
    assert m["knn/k"] == min(val_curve, key=lambda p: (-p.value, p.step)).step
    # the probe's epochs are logged with step = epoch
    for name in ("probe/train/loss", "probe/train/acc", "probe/val/loss", "probe/val/acc"):
        assert sorted(p.step for p in client.get_metric_history(run.info.run_id, name)) == [0, 1, 2], name
    epochs = pd.read_csv(job / "probe_epochs.csv")
    assert m["probe/best_epoch"] == epochs["val_acc"].idxmax()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "knn_per_class.csv",
        "knn_confusion.csv",
        "knn_val_k.csv",
        "probe_per_class.csv",
        "probe_confusion.csv",
        "probe_epochs.csv",
        "metrics.json",
    } <= artifacts


@pytest.mark.slow
def test_sweep_over_encoders_and_tasks_and_the_report(tmp_path, shared_data_dir):
    run_cbir(
        tmp_path,
        "-m",
        *QUICK,
        "encoder=baseline,random",
        "task=retrieval,knn_classification,linear_probe",
        f"paths.data_dir={shared_data_dir}",
    )
    _, found = runs(tmp_path)
    parent = [r for r in found if r.data.tags.get("cbir.role") == "sweep"]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted((c.data.tags["encoder"], c.data.tags["task"]) for c in children) == [
        (e, t) for e in ("baseline", "random") for t in ("knn_classification", "linear_probe", "retrieval")
    ]
    for child in children:
        keys = {k.split("/")[0] for k in child.data.metrics}
        task = child.data.tags["task"]
        assert ("knn" in keys) == (task == "knn_classification") and ("probe" in keys) == (task == "linear_probe")
        assert ("micro" in keys) == (task == "retrieval")
    run_cbir(tmp_path, f"report.output_dir={tmp_path / 'reports'}", module="cbir.report")
    for name in ("table1", "knn_classification", "linear_probe"):
        table = pd.read_csv(tmp_path / "reports" / f"{name}.csv")
        assert sorted(table["encoder"]) == ["baseline", "random"], name
    knn = pd.read_csv(tmp_path / "reports" / "knn_classification.csv").set_index("encoder")
    child = next(
        c for c in children if c.data.tags["task"] == "knn_classification" and c.data.tags["encoder"] == "baseline"
    )
    assert knn.loc["baseline", "macro F1"] == pytest.approx(child.data.metrics["knn/macro_f1"])
    assert knn.loc["baseline", "k"] == child.data.metrics["knn/k"]
    # the embedding space of the baseline classifies better than random weights
    assert knn.loc["baseline", "accuracy"] > knn.loc["random", "accuracy"]
    per_modality = pd.read_csv(tmp_path / "reports" / "knn_per_modality.csv")
    assert set(per_modality["modality"]) == {"CT", "MR", "US", "XR"} and len(per_modality) == 8
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "## k-NN classification" in report and "## Linear probe" in report


def test_k_larger_than_the_index_fails_before_any_work(tmp_path, shared_data_dir):
    proc = run_cbir(
        tmp_path,
        "debug=smoke",
        "task=knn_classification",
        "task.knn.k_max=5000",
        f"paths.data_dir={shared_data_dir}",
        check=False,
    )
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "task.knn.k_max=5000: k is larger than the index" in out and "Traceback" not in out
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
