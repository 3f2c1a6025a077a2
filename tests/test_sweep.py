"""Real multiruns: parent/child runs, one extraction per encoder, saturation curves, resume,
failed jobs, parallel jobs, and the report command."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import compose, run_cbir
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

SWEEP = ["-m", "debug=smoke", "encoder=baseline,random", "index.per_class=3,10"]


def runs(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("cbir")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags.get("cbir.role") == "sweep"]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_data_dir):
    cwd = tmp_path_factory.mktemp("sweep")
    run_cbir(cwd, *SWEEP, f"paths.data_dir={shared_data_dir}")
    return cwd


def test_one_parent_four_children_two_extractions(sweep):
    client, parents, children = runs(sweep)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted((c.data.tags["encoder"], c.data.tags["per_class"]) for c in children) == [
        ("baseline", "10"),
        ("baseline", "3"),
        ("random", "10"),
        ("random", "3"),
    ]
    # both encoders were extracted in one shared pass before the jobs: every job is a cache hit
    assert [c.data.tags["cache"] for c in children] == ["hit"] * 4
    assert parent.data.metrics["extract/shared_encoders"] == 2
    assert len({c.data.tags["config_hash"] for c in children}) == 4
    # saturation: one point per index size, values equal to the children's metrics
    for encoder in ("baseline", "random"):
        history = client.get_metric_history(parent.info.run_id, f"saturation/{encoder}/micro/P_at_1")
        assert sorted(m.step for m in history) == [3, 10]
        for point in history:
            (child,) = [
                c for c in children if c.data.tags["encoder"] == encoder and c.data.tags["per_class"] == str(point.step)
            ]
            assert point.value == pytest.approx(child.data.metrics["micro/P_at_1"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"saturation.csv", "saturation.png"} <= artifacts


def test_rerun_is_a_no_op(sweep, shared_data_dir):
    proc = run_cbir(sweep, *SWEEP, f"paths.data_dir={shared_data_dir}")
    _, parents, children = runs(sweep)
    assert len(parents) == 1 and len(children) == 4  # no new runs, same parent
    assert proc.stderr.count("skipping") + proc.stdout.count("skipping") == 4
    assert "4 of 4 jobs already FINISHED, left out" in proc.stderr + proc.stdout  # no encoder built for them
    assert "extracted" not in proc.stderr + proc.stdout
    client = MlflowClient(f"sqlite:///{sweep}/mlruns/mlflow.db")
    history = client.get_metric_history(parents[0].info.run_id, "saturation/baseline/micro/P_at_1")
    assert len(history) == 2  # curves not logged twice


def test_report_matches_logged_metrics(sweep):
    run_cbir(sweep, "report.output_dir=rep", module="cbir.report")
    table = pd.read_csv(sweep / "rep" / "table1.csv")
    _, _, children = runs(sweep)
    assert len(table) == 4
    assert list(table.columns[:2]) == ["encoder", "per_class"]
    assert [c for c in table.columns if "P@" in c and not c.endswith((" low", " high"))] == [
        f"{a} P@{n}" for a in ("micro", "macro") for n in (1, 3, 5, 10)
    ]
    assert table["micro P@1 low"].le(table["micro P@1"]).all()  # bootstrap bounds beside each value
    for child in children:
        row = table[
            (table.encoder == child.data.tags["encoder"])
            & (table.per_class.astype(str) == child.data.tags["per_class"])
        ]
        assert row["micro P@1"].item() == pytest.approx(child.data.metrics["micro/P_at_1"])
        assert row["macro P@10"].item() == pytest.approx(child.data.metrics["macro/P_at_10"])
    assert list(table["per_class"]) == [3, 10, 3, 10]  # index sizes in numeric order, not as text
    per_modality = pd.read_csv(sweep / "rep" / "per_modality.csv")
    assert [c for c in per_modality.columns if "P@" in c and not c.endswith((" low", " high"))][:2] == [
        "micro P@1",
        "micro P@3",
    ]  # as table1
    assert "micro P@1 low" in per_modality  # bootstrap bounds beside each value
    assert list(per_modality["per_class"][:8]) == [3, 3, 3, 3, 10, 10, 10, 10]
    _, parents, _ = runs(sweep)
    client = MlflowClient(f"sqlite:///{sweep}/mlruns/mlflow.db")
    logged = {Path(a.path).name for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report.md", "table1.csv", "per_modality.csv"} <= logged  # the report is kept on the sweep's run
    markdown = (sweep / "rep" / "table1.md").read_text()
    assert [cell.strip() for cell in markdown.splitlines()[0].split("|")][1:4] == ["encoder", "per_class", "micro P@1"]
    saturation = pd.read_csv(sweep / "rep" / "saturation.csv")
    assert set(saturation["max rows/class in index"]) == {3, 10}
    assert list(saturation.columns[:3]) == ["encoder", "rows/class", "max rows/class in index"]
    header = [cell.strip() for cell in (sweep / "rep" / "saturation.md").read_text().splitlines()[0].split("|")]
    assert header[4:6] == ["micro P@1", "micro P@3"]
    assert (sweep / "rep" / "per_modality.csv").exists()


def test_failed_job_is_marked_and_retried_alone(tmp_path, shared_data_dir):
    # IVF with 4096 lists cannot be trained on the small index: that job fails after it started
    overrides = ["-m", "debug=smoke", "index.type=flat,'IVF4096,Flat'", f"paths.data_dir={shared_data_dir}"]
    proc = run_cbir(tmp_path, *overrides, check=False)
    assert proc.returncode != 0
    _, parents, children = runs(tmp_path)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    failed = [c for c in children if c.info.status == "FAILED"][0]
    assert "IVF4096" in failed.data.tags["index_type"] and failed.data.tags["error"]
    assert parents[0].info.status == "FAILED"
    # the sweep still ends with its table across jobs, the failed one marked, and its error
    assert "sweep: 2 jobs" in proc.stdout and "FAILED" in proc.stdout and "FINISHED" in proc.stdout
    assert f"{failed.data.tags['mlflow.runName']}: " in proc.stdout
    proc = run_cbir(tmp_path, *overrides, check=False)
    _, parents, children = runs(tmp_path)
    assert len(parents) == 1
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED", "FINISHED"]
    # the resumed sweep's table: one row per job (latest attempt), the finished one from before
    assert "sweep: 2 jobs" in proc.stdout and "done earlier" in proc.stdout


def test_parallel_jobs_share_cache_and_store(tmp_path, shared_data_dir):
    run_cbir(tmp_path, *SWEEP, "hydra/launcher=local_parallel", f"paths.data_dir={shared_data_dir}")
    client, parents, children = runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    assert [c.data.tags["cache"] for c in children] == ["hit"] * 4  # the shared pass ran before the jobs
    rows = int(client.get_run(children[0].info.run_id).data.params["dataset_info.rows"])
    assert parents[0].data.metrics["extract/shared_decodes"] == rows  # each image decoded once
    assert parents[0].data.metrics["extract/shared_encoders"] == 2


def test_saturation_inside_one_run(tmp_path, shared_data_dir):
    run_cbir(tmp_path, "debug=smoke", "eval.saturation=[2,5,null]", f"paths.data_dir={shared_data_dir}")
    client, _, _ = runs(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    history = client.get_metric_history(run.info.run_id, "saturation/micro/P_at_1")
    steps = sorted(m.step for m in history)
    assert steps[:2] == [2, 5] and steps[2] >= 5  # "all" is placed at the largest class size
    assert {"saturation.csv", "saturation.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_launcher_presets_compose():
    cfg = compose("hydra/launcher=slurm", hydra_node=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1
    cfg = compose("hydra/launcher=local_parallel", hydra_node=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    assert "mlflow_sweep" in compose(hydra_node=True).hydra.callbacks


@pytest.mark.parametrize("preset", ["smoke"])
def test_experiment_presets_define_sweeps(preset):
    cfg = compose(f"experiment={preset}", hydra_node=True)
    assert cfg.hydra.sweeper.params
