"""Multi-label runs end to end (`dataset.labels=multi`): a real multirun over encoders into
MLflow, the job files, the report; and on single-label data the shares-a-finding P@N of real
search results equals the study's modified P@N bit for bit."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import compose, run_cbir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from cbir.evaluate import multilabel, retrieval

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")


@pytest.fixture(scope="module")
def multi_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("multilabel")
    # its own data folder: the multi-label synthetic set differs from the shared single-label one
    run_cbir(cwd, "-m", "debug=smoke", "dataset.labels=multi", "encoder=baseline,random", "paths.data_dir=data")
    return cwd


@pytest.mark.slow
def test_multirun_logs_multilabel_metrics_and_files(multi_sweep):
    client = MlflowClient(f"sqlite:///{multi_sweep}/mlruns/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.tags["encoder"] for c in children) == ["baseline", "random"]
    by_encoder = {c.data.tags["encoder"]: c for c in children}
    for encoder, run in by_encoder.items():
        m = run.data.metrics
        for name in (
            "ml/micro/P_at_1",
            "ml/macro/P_at_10",
            "ml/micro/mAP_at_10",
            "ml/micro/nDCG_at_10",
            "ml/micro/R_precision",
            "ml/modality/XR/micro/nDCG_at_10",
            "ml/anatomy/chest/macro/P_at_1",
        ):
            assert 0 <= m[name] <= 1, (encoder, name)
        assert m["ml/queries/multi_finding"] > 0 and m["ml/queries/excluded"] == 0
        # sharing a finding is easier than retrieving the exact finding set
        assert m["ml/micro/P_at_1"] >= m["micro/P_at_1"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"multilabel_metrics.json", "per_finding.csv"} <= artifacts
    assert (
        by_encoder["baseline"].data.metrics["ml/micro/nDCG_at_10"]
        > by_encoder["random"].data.metrics["ml/micro/nDCG_at_10"]
    )
    (job,) = [p.parent for p in (multi_sweep / "multirun").glob("*/*/0/multilabel_metrics.json")]
    saved = json.loads((job / "multilabel_metrics.json").read_text())["metrics"]
    run = by_encoder["baseline"]
    assert saved["ml/micro/nDCG_at_10"] == pytest.approx(run.data.metrics["ml/micro/nDCG_at_10"])
    per_finding = pd.read_csv(job / "per_finding.csv")
    assert {"finding", "queries", "n_index", "P@1", "mAP@10", "nDCG@10", "R_precision"} <= set(per_finding.columns)
    assert set(per_finding["finding"].str.split("/").str[2]) == {"normal", "lesion", "calcification"}


@pytest.mark.slow
def test_report_shows_the_multilabel_table(multi_sweep):
    run_cbir(multi_sweep, "report.output_dir=rep", module="cbir.report")
    table = pd.read_csv(multi_sweep / "rep" / "multilabel.csv")
    assert sorted(table["encoder"]) == ["baseline", "random"]
    client = MlflowClient(f"sqlite:///{multi_sweep}/mlruns/mlflow.db")
    for _, row in table.iterrows():
        (run,) = client.search_runs(
            [client.get_experiment_by_name("cbir").experiment_id], filter_string=f"tags.encoder = '{row['encoder']}'"
        )
        assert row["micro P@1"] == pytest.approx(run.data.metrics["ml/micro/P_at_1"])
        assert row["micro nDCG@10"] == pytest.approx(run.data.metrics["ml/micro/nDCG_at_10"])
    assert "Multi-label retrieval" in (multi_sweep / "rep" / "report.md").read_text()


@pytest.fixture(scope="module")
def single_label_embeddings(tmp_path_factory, shared_data_dir):
    """The shared single-label synthetic set (smoke size) and its baseline embeddings."""
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore

    cache = tmp_path_factory.mktemp("cache")
    cfg = compose("debug=smoke", f"paths.data_dir={shared_data_dir}", f"paths.cache_dir={cache}")
    manifest = instantiate(cfg.dataset).load_manifest()
    return (
        cfg,
        manifest.table,
        extract_embeddings(instantiate(cfg.encoder), manifest, EmbeddingStore(cache), cfg.extract),
    )


@pytest.mark.slow
@pytest.mark.parametrize("query_split", ["test", "train"])  # train: every query is also an index row
def test_single_label_search_gives_todays_precision_exactly(single_label_embeddings, query_split):
    cfg, table, extraction = single_label_embeddings
    assert "findings" not in table.columns
    setup = retrieval.choose_rows(table, extraction.valid, "train", query_split, None, 0)
    result, search = retrieval.run_retrieval(
        table, extraction.embeddings, setup, cfg.index, [1, 3, 5, 10], levels=[], return_search=True
    )
    ml = multilabel.evaluate_search(table, search, [1, 3, 5, 10]).metrics
    compared = [k for k in result.metrics if "P_at_" in k and "_std" not in k]
    assert len(compared) > 40
    for key in compared:
        assert ml["ml/" + key] == result.metrics[key], key
