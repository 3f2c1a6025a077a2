"""Leakage audit (shared patients, identical files, near-duplicates) and eval.exclude_same_patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import fixtures_datasets as fx
import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir
from mlflow.tracking import MlflowClient

from cbir.evaluate import audit, retrieval
from cbir.evaluate.metrics import evaluate


def leaky_dataset(root: Path) -> Path:
    """A CSV manifest of 2 classes x (8 train + 3 test) images, one patient per image, except:
    patient P-shared has a test image and a train image; test image copy.png is a byte copy of a
    train image (other name, other patient)."""
    rows = []
    for c, label in enumerate(["XR/chest/a", "XR/chest/b"]):
        for split, count in (("train", 8), ("test", 3)):
            for k in range(count):
                path = f"{label.replace('/', '_')}_{split}_{k}.png"
                fx.write_image(
                    root / path,
                    value=40 + 60 * c + 7 * k + (3 if split == "test" else 0),
                )
                rows.append(
                    {
                        "path": path,
                        "split": split,
                        "modality": "XR",
                        "anatomy": "chest",
                        "label": label,
                        "patient": f"P{len(rows)}",
                    }
                )
    table = pd.DataFrame(rows)
    table.loc[(table["split"] == "test") & (table["label"] == "XR/chest/a"), "patient"] = ["P-shared", "", "P-t2"]
    table.loc[2, "patient"] = "P-shared"  # a train image of the same patient
    shutil.copyfile(root / table.loc[5, "path"], root / "copy.png")
    rows = table.to_dict("records") + [
        {
            "path": "copy.png",
            "split": "test",
            "modality": "XR",
            "anatomy": "chest",
            "label": "XR/chest/a",
            "patient": "P-copy",
        }
    ]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_planted_patient_overlap_copied_image_and_near_duplicate_are_found(tmp_path):
    table = pd.read_csv(leaky_dataset(tmp_path), keep_default_na=False)
    query_rows = np.flatnonzero(table["split"] == "test")
    index_rows = np.flatnonzero(table["split"] == "train")
    first = np.zeros(len(query_rows), dtype=np.int64)
    cosine = np.full(len(query_rows), 0.5)
    cosine[3] = 0.9995  # the 4th query's nearest row is a near-duplicate
    cases, metrics = audit.audit(table, tmp_path, query_rows, index_rows, first, cosine, 0.999)
    by_kind = {kind: cases[cases["kind"] == kind] for kind in audit.KINDS}
    assert list(zip(by_kind["patient"]["query_path"], by_kind["patient"]["index_row"])) == [
        (table.loc[table["patient"] == "P-shared", "path"].iloc[1], 2)
    ]
    assert list(zip(by_kind["content"]["query_path"], by_kind["content"]["index_row"])) == [("copy.png", 5)]
    assert list(by_kind["near_duplicate"]["query_row"]) == [query_rows[3]]
    assert metrics["audit/patient/queries"] == 1 and metrics["audit/content/queries"] == 1
    assert metrics["audit/patient/fraction"] == pytest.approx(1 / len(query_rows))
    assert all(metrics[f"audit/{k}/checked"] == 1 for k in audit.KINDS)
    line = audit.warning_line(metrics, len(query_rows), tmp_path / "audit.csv")
    assert "1 queries by patient" in line and "1 queries by content" in line and "near-duplicate" in line
    # without patient ids the patient kind is reported as not checked, not as clean
    _, unchecked = audit.audit(table.drop(columns="patient"), tmp_path, query_rows, index_rows, None, None)
    assert unchecked["audit/patient/checked"] == 0 and "audit/patient/queries" not in unchecked


def test_readers_with_patients_give_the_patient_column(tmp_path):
    from cbir.data.chexpert import CheXpertDataset
    from cbir.data.mimic_cxr import MimicCXRDataset
    from cbir.data.nih14 import NIH14Dataset

    nih = NIH14Dataset(fx.make_nih14(tmp_path)).load_manifest().table
    by_name = {name: str(patient) for name, _, patient in fx.nih_rows()}
    assert (nih["patient"] == nih["path"].map(lambda p: by_name[Path(p).name])).all()
    mimic = MimicCXRDataset(fx.make_mimic_cxr(tmp_path)).load_manifest().table
    assert (mimic["patient"] == mimic["path"].str.split("/").str[2].str[1:]).all()  # files/p10/p<subject>/...
    chexpert = CheXpertDataset(fx.make_chexpert(tmp_path)).load_manifest().table
    assert chexpert["patient"].str.match(r"^patient\d+$").all()


def brute_force_precision(labels, patients, query_rows, index_rows, similarity, n):
    """Modified P@n of each query with its patient's index rows removed from the index."""
    out = []
    for j, q in enumerate(query_rows):
        keep = [i for i in range(len(index_rows)) if patients[index_rows[i]] != patients[q] or patients[q] == ""]
        n_c = sum(labels[index_rows[i]] == labels[q] for i in keep)
        if n_c == 0:
            out.append(np.nan)
            continue
        ranked = sorted(keep, key=lambda i: (-similarity[j, i], i))[: min(n, n_c)]
        out.append(np.mean([labels[index_rows[i]] == labels[q] for i in ranked]))
    return np.array(out)


def test_exclude_same_patient_drops_the_rows_from_neighbours_and_n_c():
    rng = np.random.default_rng(0)
    n = 60
    table = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(n)],
            "split": ["train"] * 40 + ["test"] * 20,
            "label": rng.choice(["a", "b", "c"], n),
            "modality": "XR",
            "anatomy": "chest",
        }
    )
    patients = np.array([f"p{i % 15}" for i in range(n)], dtype=object)  # every test patient has train rows
    patients[45] = ""  # unknown: nothing excluded
    embeddings = rng.normal(size=(n, 8)).astype(np.float32)
    setup = retrieval.RetrievalSetup(np.arange(40), np.arange(40, 60))
    index_cfg = compose("debug=smoke").index
    result = retrieval.run_retrieval(table, embeddings, setup, index_cfg, [1, 3, 5], patients=patients)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit[40:] @ unit[:40].T
    labels = table["label"].to_numpy()
    for n_value in (1, 3, 5):
        expected = brute_force_precision(labels, patients, setup.query_rows, setup.index_rows, similarity, n_value)
        assert np.allclose(result.per_query[f"P@{n_value}"], expected, equal_nan=True)
    plain = retrieval.run_retrieval(table, embeddings, setup, index_cfg, [1, 3, 5])
    assert not np.allclose(plain.per_query["P@5"], result.per_query["P@5"], equal_nan=True)  # it does change


def test_evaluate_counts_n_c_without_removed_rows():
    query = pd.DataFrame({"label": ["a"], "modality": ["XR"], "anatomy": ["chest"]})
    index = pd.DataFrame({"label": ["a", "a", "b"], "modality": "XR", "anatomy": "chest"})
    removed = (np.array([0]), np.array([0]))  # the query's patient owns index row 0
    result = evaluate(query, index, np.array([[1, 2]]), ns=[3], levels=(), removed_pairs=removed)
    assert result.metrics["micro/P_at_3"] == 1.0  # n_c = 1 (row 1), not 2


@pytest.mark.slow
def test_a_job_audits_and_warns_and_exclusion_changes_the_metrics(tmp_path):
    manifest = leaky_dataset(tmp_path / "data")
    common = [
        "debug=smoke",
        "dataset=csv",
        f"dataset.file={manifest}",
        "encoder=baseline",
        "index.per_class=null",
        "eval.n=[1,3]",
        "eval.curve_k=0",
    ]
    proc = run_cbir(tmp_path, *common)
    assert "leakage audit: of 7 queries, 1 queries by patient, 1 queries by content" in proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    assert run.data.metrics["audit/patient/queries"] == 1 and run.data.metrics["audit/content/cases"] == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"audit.csv", "per_query.parquet"} <= artifacts
    (job,) = [p.parent for p in (tmp_path / "outputs").glob("*/*/audit.csv")]
    assert set(pd.read_csv(job / "audit.csv")["kind"]) >= {"patient", "content"}
    records = pd.read_parquet(job / "per_query.parquet")
    assert len(records) == 7 and {
        "row",
        "path",
        "class",
        "P@1",
        "neighbour_row",
        "neighbour_cosine",
    } <= set(records)
    assert (
        run.data.metrics["micro/P_at_1_ci_low"]
        <= run.data.metrics["micro/P_at_1"]
        <= run.data.metrics["micro/P_at_1_ci_high"]
    )
    run_cbir(tmp_path, *common, "eval.exclude_same_patient=true")
    excluded = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert excluded[0].data.tags["cbir.query_set"] != run.data.tags["cbir.query_set"]  # not compared with it
