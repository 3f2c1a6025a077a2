"""Every experiment script in smoke mode, for real: cbir sweeps on the small synthetic set
(random-weight encoders), results read back from MLflow, tables and figures written.

The study scripts share one working folder, so modality_levels and embedding_space resume the
sweep paper_table1 ran (as they do for a user)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import PROJECT
from mlflow.tracking import MlflowClient
from PIL import Image

sys.path.insert(0, str(PROJECT))

from experiments import embedding_space, index_types, paper_table1, pooling_resolution, saturation  # noqa: E402
from experiments.common import load_config  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def config(name, workdir, data_dir, *overrides):
    return load_config(name, ["smoke=true", f"workdir={workdir}", f"data_dir={data_dir}", *overrides])


def out(workdir, name):
    return workdir / "reports" / "experiments" / name


def is_png(path):
    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 100


def test_paper_table1(workdir, shared_data_dir):
    files = paper_table1.run(config("paper_table1", workdir, shared_data_dir))
    table = pd.read_csv(files["table1.csv"])
    assert sorted(table["encoder"]) == ["dinov2", "resnet50"]
    comparison = pd.read_csv(files["comparison.csv"])
    paper = pd.read_csv(PROJECT / "experiments" / "reference" / "paper_table1.csv").set_index("encoder")
    for _, row in comparison.iterrows():  # "measured (difference vs paper)" per cell
        measured = table.set_index("encoder").loc[row["encoder"], "micro P@1"]
        assert row["micro P@1"] == (
            f"{measured:.3f} ({measured - paper.loc[row['encoder'], 'micro_p1']:+.3f} "
            f"vs {paper.loc[row['encoder'], 'micro_p1']:.3f})"
        )
    assert is_png(files["table1.png"])
    beyond = pd.read_csv(files["table1_beyond.csv"])  # the study's rows, then the 2025 encoders
    assert list(beyond["rows"]) == ["the study"] * 2 + ["beyond the study"]
    assert beyond["encoder"].iloc[-1] == "dinov3" and beyond["micro P@1"].notna().all()
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    parents = client.search_runs(
        [client.get_experiment_by_name("cbir-study").experiment_id], filter_string="tags.`cbir.role` = 'sweep'"
    )  # the study's and the one beyond it
    logged = {a.path for p in parents for a in client.list_artifacts(p.info.run_id, "experiments/paper_table1")}
    assert "experiments/paper_table1/comparison.md" in logged


def test_modality_levels_command_line_resumes_the_study_sweep(workdir, shared_data_dir):
    proc = subprocess.run(
        [
            sys.executable,
            str(PROJECT / "experiments" / "modality_levels.py"),
            "smoke=true",
            f"workdir={workdir}",
            f"data_dir={shared_data_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out(workdir, "modality_levels")
    # progress while the sweep runs, and where the files went
    assert "job 1 of 2 (" in proc.stderr and "job 2 of 2 (" in proc.stderr and "left" in proc.stderr
    assert f"outputs in {folder}" in proc.stderr and str(folder / "modality_levels.png") in proc.stderr
    assert (folder / "sweep_0.log").exists() and "sweep: 2 jobs" in proc.stdout
    table = pd.read_csv(folder / "modality_levels.csv")
    assert set(table[table["kind"] == "modality"]["subset"]) == {"CT", "MR", "US", "XR"}
    assert set(table[table["kind"] == "level"]["subset"]) == {
        "modality",
        "modality + anatomy",
        "full class (pathology)",
    }
    findings = pd.read_csv(folder / "findings.csv")
    assert findings["pathology harder"].all()  # the synthetic data is built so, as the study found
    assert is_png(folder / "modality_levels.png")
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cbir-study").experiment_id])
    study = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("encoder") != "dinov3"]
    assert len(study) == 2  # nothing recomputed (dinov3: paper_table1's sweep beyond the study)


def test_embedding_space(workdir, shared_data_dir):
    files = embedding_space.run(config("embedding_space", workdir, shared_data_dir))
    summary = pd.read_csv(files["embedding_space.csv"])
    assert sorted(summary["encoder"]) == ["dinov2", "resnet50"]
    assert summary["silhouette_class"].between(-1, 1).all()
    # a class is a modality/anatomy/finding: neighbours sharing the class share the modality too
    assert (summary["knn10_purity_modality"] >= summary["knn10_purity_class"]).all()
    assert (summary["knn10_purity_modality"] > 0.25).all()  # above chance for 4 balanced modalities
    assert all(is_png(files[name]) for name in summary["figure"])
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    for row in summary.itertuples():  # the table holds the numbers logged to each encoder's run
        found = client.search_runs(
            [client.get_experiment_by_name("cbir-study").experiment_id], filter_string=f"tags.encoder = '{row.encoder}'"
        )
        (run,) = [r for r in found if "embedding/silhouette_class" in r.data.metrics]
        for name in ("silhouette_class", "silhouette_modality", "knn10_purity_class", "knn10_purity_modality"):
            assert run.data.metrics[f"embedding/{name}"] == pytest.approx(getattr(row, name)), (row.encoder, name)
        assert run.data.metrics["embedding/sample_rows"] == row.sample_rows > 0


def test_saturation(workdir, shared_data_dir):
    cfg = config("saturation", workdir, shared_data_dir)
    cfg.sweeps.smoke = [
        [
            "experiment=saturation",
            "debug=smoke",
            "dataset=synthetic_small",
            "encoder=baseline,random",
            "index.per_class=1,4,all",
        ]
    ]  # the tiniest sweep
    files = saturation.run(cfg)
    curves = pd.read_csv(files["saturation_by_modality.csv"])
    assert set(curves["modality"]) == {"all", "CT", "MR", "US", "XR"}
    assert set(curves["group"]) == {"baseline", "random"}
    assert curves.groupby(["group", "modality"]).size().eq(3).all()  # sizes 1, 4 and the whole split
    knee = pd.read_csv(files["knee.csv"])
    assert set(knee["reached at rows/class"].astype(str)) <= {"1", "4", "all"}
    assert (knee["P@1 there"] >= knee["95% of it"] - 1e-9).all()
    assert set(knee["encoder"]) == {"baseline"}  # no knee for the chance-level random control
    assert is_png(files["saturation.png"]) and is_png(files["saturation_by_modality.png"])


def test_index_types(workdir, shared_data_dir):
    files = index_types.run(config("index_types", workdir, shared_data_dir))
    table = pd.read_csv(files["index_types.csv"]).set_index("index")
    assert set(table.index) == {"flat", "ivf", "hnsw", "ivfpq"}
    assert table.loc["flat", "recall@k vs flat"] == 1.0 and table.loc["flat", "ΔP@1 vs flat"] == 0.0
    assert table.loc["ivfpq", "memory MB"] < table.loc["flat", "memory MB"]  # compressed codes
    assert (table["single-query ms (median)"] > 0).all()
    assert is_png(files["index_types.png"])


def test_pooling_resolution(workdir, shared_data_dir):
    cfg = config("pooling_resolution", workdir, shared_data_dir)
    cfg.sweeps.smoke = [
        [
            "debug=smoke",
            "dataset=synthetic_small",
            "encoder=dinov2_small",
            "++encoder.pretrained=false",
            "encoder.pool=cls,mean",
            "encoder.input_size=28",
        ]
    ]  # the tiniest sweep
    files = pooling_resolution.run(cfg)
    table = pd.read_csv(files["pooling_resolution.csv"])
    assert sorted(table["pool"]) == ["cls", "mean"] and set(table["input size"]) == {28}
    assert is_png(files["pooling_resolution.png"])
    # each row is its own job's numbers, and the two heads are two different embeddings
    from experiments.common import Context, run_embeddings

    ctx = Context(cfg)
    client = ctx.client()
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking_experiment).experiment_id],
        filter_string="tags.encoder = 'dinov2_small' and attributes.status = 'FINISHED'",
    )
    by_pool = {r.data.params["encoder.pool"]: r for r in runs}
    assert sorted(by_pool) == ["cls", "mean"]
    for _, row in table.iterrows():
        assert row["micro P@1"] == pytest.approx(by_pool[row["pool"]].data.metrics["micro/P_at_1"])
    embeddings = {pool: run_embeddings(ctx, ctx.job_overrides(run.info.run_id))[2] for pool, run in by_pool.items()}
    assert all(e.cache_hit for e in embeddings.values())  # the vectors the jobs searched
    assert embeddings["cls"].cached.key != embeddings["mean"].cached.key
    cls_rows, mean_rows = (np.asarray(embeddings[p].embeddings) for p in ("cls", "mean"))
    assert cls_rows.shape == mean_rows.shape and not np.allclose(cls_rows, mean_rows, atol=1e-3)


def test_sweep_progress_names_the_job_and_time_left(caplog):
    import io
    import logging

    from experiments.common import follow

    output = (
        "[HYDRA] Launching 3 jobs locally\n"
        "[HYDRA] \t#0 : encoder=a tracking.uri=sqlite\\:///x.db experiment=smoke\n"
        "some job output\n"
        "[HYDRA] \t#1 : encoder=b tracking.uri=sqlite\\:///x.db experiment=smoke\n"
    )
    record = io.StringIO()
    with caplog.at_level(logging.INFO, logger="cbir.experiments"):
        lines = follow(
            io.StringIO(output),
            record,
            constant=["-m", "encoder=a,b", "tracking.uri=sqlite:///x.db", "experiment=smoke"],
        )
    assert record.getvalue() == output and "".join(lines) == output
    first, second = [r.getMessage() for r in caplog.records]
    assert first.startswith("job 1 of 3 (encoder=a): 0:00:00 elapsed") and "left" not in first
    assert second.startswith("job 2 of 3 (encoder=b): ") and second.endswith("left")
