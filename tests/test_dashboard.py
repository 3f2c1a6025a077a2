"""What a user sees of a sweep: the MLflow dashboard (checked through a real `mlflow server`'s
REST API), the table across jobs at the end, run names and curated params."""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
import urllib.request

import pandas as pd
import pytest
from conftest import PROJECT, compose, run_cbir

from cbir.tracking import dashboard
from cbir.tracking import runs as tracking

sys.path.insert(0, str(PROJECT / "scripts"))
from dashboard_screenshots import api, mlflow_server  # noqa: E402

SWEEP = ["-m", "debug=smoke", "encoder=baseline,random", "index.per_class=3,all"]
# debug=smoke picks the small synthetic dataset, which the names say (the default one goes unsaid)
NAMES = {f"{encoder} · flat · {size} · synthetic_small" for encoder in ("baseline", "random") for size in ("3", "all")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_data_dir):
    cwd = tmp_path_factory.mktemp("dashboard")
    proc = run_cbir(cwd, *SWEEP, f"paths.data_dir={shared_data_dir}")
    return cwd, proc


def tags_of(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.slow
def test_dashboard_through_the_rest_api(sweep):
    cwd, _ = sweep
    with mlflow_server(f"sqlite:///{cwd}/mlruns/mlflow.db") as url:
        experiment = api(url, "experiments/get-by-name?experiment_name=cbir", method="GET")["experiment"]
        experiment_tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"  # opens on "Model training"
        runs = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        (parent,) = [r for r in runs if tags_of(r).get("cbir.role") == "sweep"]
        parent_id = parent["info"]["run_id"]
        children = [r for r in runs if tags_of(r).get("mlflow.parentRunId") == parent_id]
        assert len(runs) == 5 and len(children) == 4
        assert {c["info"]["run_name"] for c in children} == NAMES
        for child in children:
            params = {p["key"]: p["value"] for p in child["data"]["params"]}
            assert params["encoder.name"] == tags_of(child)["encoder"] and params["index.type"] == "flat"
            assert params["eval.n"] == "[1, 3, 5, 10]" and params["seed"] == "42"
            assert params["index.per_class"] in ("3", "all")
            assert not any(
                k.endswith("_target_") or k.startswith(("encoder.grids", "tracking.", "paths.")) for k in params
            ), sorted(params)
            assert len(params) < 30
            metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
            assert 0 <= metrics["micro/P_at_1"] <= 1 and "macro/P_at_1" in metrics
            note = tags_of(child)["mlflow.note.content"]
            # headline numbers first on the page, with their bootstrap interval
            assert f"| micro | {metrics['micro/P_at_1']:.3f} [{metrics['micro/P_at_1_ci_low']:.2f}, " in note
            files = api(url, f"artifacts/list?run_id={child['info']['run_id']}&path=config", method="GET")["files"]
            assert "config/resolved.yaml" in {f["path"] for f in files}
        files = {f["path"] for f in api(url, f"artifacts/list?run_id={parent_id}", method="GET")["files"]}
        assert {
            "comparison_table.json",
            "comparison.png",
            "comparison.csv",
            "saturation.png",
            "comparison.html",
        } <= files
        # the plain-words answer comes first, above MLflow's "Show more" fold
        assert tags_of(parent)["mlflow.note.content"].startswith("**best micro P@1: ")
        query = urllib.parse.urlencode({"run_uuid": parent_id, "path": "comparison_table.json"})
        with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=60) as response:
            table = json.loads(response.read())
        frame = pd.DataFrame(table["data"], columns=table["columns"])
        assert list(frame.columns[:3]) == ["run", "encoder", "index"]
        by_name = {c["info"]["run_name"]: {m["key"]: m["value"] for m in c["data"]["metrics"]} for c in children}
        for _, row in frame.iterrows():
            assert row["micro P@1"] == pytest.approx(by_name[row["run"]]["micro/P_at_1"], abs=1e-4)
            assert row["status"] == "FINISHED" and row["cache"] in ("hit", "miss")
        assert re.search(r"^\| baseline +\|", tags_of(parent)["mlflow.note.content"], re.M)


@pytest.mark.slow
def test_sweep_ends_with_a_table_and_where_to_look(sweep):
    cwd, proc = sweep
    out = proc.stdout
    assert "sweep: 4 jobs" in out and out.count("FINISHED") >= 4
    assert "python -m cbir.report report.runs=" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    parent = out.split("Parent run", 1)[1].split()[0]
    assert f"report.runs={parent}" in out
    # the addresses open MLflow's Model-training side: the parent's comparison page, the runs table in
    # the experiment's saved view (headline columns, best first)
    assert f"/runs/{parent}/artifacts/comparison.html?workflowType=machine_learning" in out
    assert "/runs?workflowType=machine_learning&viewStateShareKey=cbir-headline" in out
    # one line per finished job; its full table only in its run.log
    assert sum(line.startswith("done ") for line in out.splitlines()) == 4 and "all queries" not in out
    assert (proc.stdout + proc.stderr).count("GPU available:") <= 1
    # the console is free of third-party chatter; the job's table is also in its run.log
    for noise in ("litlogger", "LeafSpec", "interpreted in multiple ways", "database tables"):
        assert noise not in proc.stdout + proc.stderr, noise
    logs = sorted(cwd.glob("multirun/*/*/*/run.log"))
    assert len(logs) == 4 and all("P@10" in p.read_text() and "all queries" in p.read_text() for p in logs)
    summary = next(cwd.glob("multirun/*/*/sweep_summary.txt")).read_text()
    assert "baseline" in summary and "random" in summary


def test_run_names_say_what_the_sweep_varies(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(
        "encoder=random", "index.per_class=20", "dataset=synthetic_small", "++encoder.input_size=56", hydra_node=True
    )
    monkeypatch.delenv(dashboard.SWEPT_KEYS_ENV, raising=False)
    assert dashboard.run_name(cfg) == "random · flat · 20"
    monkeypatch.setenv(dashboard.SWEPT_KEYS_ENV, "encoder,index.per_class,dataset,encoder.input_size")
    assert dashboard.run_name(cfg) == "random · flat · 20 · synthetic · input_size=56"  # dataset.name
    HydraConfig.instance().set_config(cfg)  # as inside a job: the dataset option chosen
    try:
        assert dashboard.run_name(cfg) == "random · flat · 20 · synthetic_small · input_size=56"
    finally:
        HydraConfig.instance().cfg = None


def test_runs_on_different_datasets_get_different_names(monkeypatch):
    """The default dataset goes unsaid; any other says which, also unswept (the smoke preset's)."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.delenv(dashboard.SWEPT_KEYS_ENV, raising=False)
    names = {}
    for overrides in [(), ("dataset=synthetic_small",), ("debug=smoke",), ("dataset=chexpert",)]:
        cfg = compose("encoder=baseline", *overrides, hydra_node=True)
        HydraConfig.instance().set_config(cfg)  # as inside a job: the dataset option chosen
        try:
            names[overrides] = dashboard.run_name(cfg)
        finally:
            HydraConfig.instance().cfg = None
    assert names == {
        (): "baseline · flat · all",
        ("dataset=synthetic_small",): "baseline · flat · all · synthetic_small",
        ("debug=smoke",): "baseline · flat · all · synthetic_small",
        ("dataset=chexpert",): "baseline · flat · all · chexpert",
    }


def test_swept_keys_from_the_command_line_and_presets():
    from omegaconf import OmegaConf

    preset = compose("experiment=smoke", hydra_node=True).hydra.sweeper.params  # encoder, index.per_class
    command_line = [
        "encoder=baseline,random",
        "dataset=synthetic,synthetic_small",
        "++encoder.image_size=32,64",
        "seed=1",
        "experiment=smoke",
    ]
    cfg = OmegaConf.create({"hydra": {"overrides": {"task": command_line}, "sweeper": {"params": preset}}})
    assert dashboard.swept_keys(cfg) == ["encoder", "dataset", "encoder.image_size", "index.per_class"]


def test_curated_params_keep_the_config_hash_whole():
    cfg = compose("encoder=baseline")
    flat = tracking.flatten(tracking.resolved(cfg))
    params = dashboard.curated_params(flat)
    assert {"encoder.name", "dataset.name", "index.type", "index.per_class", "eval.n", "seed"} <= set(params)
    assert "encoder._target_" not in params and len(params) < len(flat) / 2
    # the resume hash still covers keys that are no longer params
    assert tracking.config_hash(cfg) != tracking.config_hash(compose("encoder=baseline", "encoder.grids=[1,2]"))


def test_quiet_console_drops_the_chatter_and_keeps_other_warnings(caplog):
    import logging
    import warnings

    from cbir.common import console

    console.quiet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        console.quiet()  # catch_warnings reset the filters: install them again inside
        warnings.warn("The specified dataset source can be interpreted in multiple ways: A, B.", UserWarning)
        warnings.warn("index.params.nlist is larger than the index", UserWarning)
    assert [str(w.message) for w in caught] == ["index.params.nlist is larger than the index"]
    console.DEVICE_LINES.seen.clear()  # an earlier in-process run may have shown the device lines
    with caplog.at_level(logging.INFO):
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info(
            "💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/project/litlogger/)"
        )
        rank_zero.info("GPU available: False, used: False")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        rank_zero.info("GPU available: False, used: False")  # the next job of a sweep: not again
        rank_zero.info("GPU available: True (cuda), used: True")  # another device: shown
    assert [r.getMessage() for r in caplog.records] == [
        "GPU available: False, used: False",
        "GPU available: True (cuda), used: True",
    ]


def test_the_sweep_end_searches_the_children_once(tmp_path, monkeypatch):
    """Both callbacks end a sweep (table, comparison page, saturation curves) from one search of
    the parent's children, in Hydra's order (SweepSummary first, SweepCallback last)."""
    from mlflow.tracking import MlflowClient

    from cbir.job.sweep import SweepCallback, SweepSummary
    from cbir.report import from_runs as report

    monkeypatch.setenv(tracking.PARENT_ENV, "")  # restored afterwards: the callbacks set both
    monkeypatch.setenv(dashboard.SWEPT_KEYS_ENV, "")
    cfg = compose(
        "debug=smoke",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.sweep.dir={tmp_path}/multirun",
        hydra_node=True,
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    searches = []
    search_runs = MlflowClient.search_runs

    def counted(self, experiment_ids, filter_string="", *args, **kwargs):
        searches.append(filter_string)
        return search_runs(self, experiment_ids, filter_string, *args, **kwargs)

    def sweep(encoders):
        """A sweep whose jobs finish as `encoders` x two index sizes: its parent-run callback, the summary."""
        parent_end, summary = SweepCallback(), SweepSummary()
        parent_end.on_multirun_start(cfg)
        summary.on_multirun_start(cfg)
        for encoder in encoders:  # finished jobs, as a sweep's children record them
            for size, value in (("3", 0.25), ("10", 0.5)):
                tags = {"mlflow.parentRunId": parent_end.parent_id, "encoder": encoder, "per_class": size}
                tags.update(dataset="synthetic_small", index_type="flat", config_hash=f"{encoder}-{size}")
                run = client.create_run(parent_end.experiment_id, tags=tags)
                for n in cfg.eval.n:
                    for average in ("micro", "macro"):
                        client.log_metric(run.info.run_id, f"{average}/P_at_{n}", value)
                client.set_terminated(run.info.run_id)
        searches.clear()
        with monkeypatch.context() as patch:
            patch.setattr(MlflowClient, "search_runs", counted)
            summary.on_multirun_end(cfg)
            parent_end.on_multirun_end(cfg)
        assert sum("mlflow.parentRunId" in f for f in searches) == 1, searches
        assert (tmp_path / "multirun" / "comparison.html").exists()
        assert client.get_run(parent_end.parent_id).info.status == "FINISHED"
        curve = client.get_metric_history(parent_end.parent_id, f"saturation/{encoders[0]}/micro/P_at_1")
        assert sorted((m.step, m.value) for m in curve) == [(3, 0.25), (10, 0.5)]
        return parent_end, (tmp_path / "multirun" / "sweep_summary.txt").read_text()

    parent_end, first = sweep(["baseline", "random"])
    assert "baseline" in first and "random" in first
    # the comparison page's table is the report's of this sweep (report.runs=<parent>): still the
    # newest FINISHED run per config, with a running job, one without a config hash and a rerun
    experiment, parent = parent_end.experiment_id, parent_end.parent_id
    for tags, status in (({"config_hash": "x"}, None), ({}, "FINISHED"), ({"config_hash": "random-3"}, "FINISHED")):
        tags.update({"mlflow.parentRunId": parent, "encoder": "random", "per_class": "3", "index_type": "flat"})
        run = client.create_run(experiment, tags={"dataset": "synthetic_small", **tags})
        if status:
            client.log_metric(run.info.run_id, "micro/P_at_1", 1.0)
            client.set_terminated(run.info.run_id, status)
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    expected, _ = report.load_runs(tracking.Tracker.from_config(cfg), parent, None)
    assert len(expected) == 4 and expected.loc[expected.config_hash == "random-3", "micro/P_at_1"].item() == 1.0
    pd.testing.assert_frame_equal(report.sweep_runs_table(children), expected)
    # the same sweep again in this process (same parent run) with one more encoder: searched anew
    assert "extra" in sweep(["extra"])[1]


def test_experiment_gets_the_runs_table_view_once(tmp_path):
    """The saved view behind the printed runs-table address: headline metrics as columns, best first;
    a view the user changed afterwards is left alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("cbir", artifact_location=str(tmp_path / "artifacts"))
    dashboard.tag_experiment(client, experiment_id)
    envelope = json.loads(client.get_experiment(experiment_id).tags[dashboard.RUNS_VIEW_TAG])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`micro/P_at_1`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:2] == ["metrics.`micro/P_at_1`", "metrics.`macro/P_at_1`"]
    _, address = dashboard.ui_address(f"sqlite:///{tmp_path}/mlflow.db", experiment_id)
    assert address.endswith(f"/runs?workflowType=machine_learning&viewStateShareKey={dashboard.RUNS_VIEW_KEY}")
    client.set_experiment_tag(experiment_id, dashboard.RUNS_VIEW_TAG, "edited in the UI")
    dashboard.tag_experiment(client, experiment_id)
    assert client.get_experiment(experiment_id).tags[dashboard.RUNS_VIEW_TAG] == "edited in the UI"
