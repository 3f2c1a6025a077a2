"""`python -m cbir.run` end to end on miniature copies of every real dataset layout."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from conftest import run_cbir
from fixtures_datasets import add_mimic_study, make_study_data
from mlflow.tracking import MlflowClient

from cbir.data.synthetic import SyntheticDataset

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

DATASETS = ["radimagenet", "nih14", "mimic_cxr", "chexpert", "combined", "folder", "csv"]


def test_every_dataset_runs_end_to_end(tmp_path):
    data = tmp_path / "data"
    make_study_data(data)  # nih14/, mimic/, radiology_ai/, CheXpert/ as the study's $DATA folder
    # the miniature MIMIC's test queries (Pneumothorax x2) get their class into the train index
    add_mimic_study(
        data / "mimic" / "files" / "mimic-cxr-jpg" / "2.0.0", 50000008, 13000033, "train", {"Pneumothorax": 1.0}, 1
    )
    # a user collection in the folder layout <modality>/<anatomy>/<finding>/*.png ...
    generated = SyntheticDataset(
        root=tmp_path / "generated",
        modalities=["CT", "XR"],
        anatomies=["chest"],
        pathologies=["normal", "lesion"],
        max_per_class=6,
        min_per_class=5,
        image_size=32,
    ).load_manifest()
    shutil.copytree(generated.root, data / "folder")
    # ... and the same images as a user CSV manifest next to it
    manifest = pd.read_csv(data / "folder" / "manifest.csv")
    manifest["path"] = "folder/" + manifest["path"]
    manifest.to_csv(data / "manifest.csv", index=False)
    (data / "folder" / "manifest.csv").unlink()

    proc = run_cbir(
        tmp_path,
        "-m",
        "debug=smoke",
        f"dataset={','.join(DATASETS)}",
        f"paths.data_dir={data}",
        "eval.n=[1,3]",
        check=False,
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    children = {r.data.tags["dataset"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(children) == sorted(DATASETS)
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        m = run.data.metrics
        assert m["queries/total"] > m["queries/excluded"], name  # some queries scored
        assert 0 <= m["micro/P_at_1"] <= 1, name
        assert run.data.params["dataset_info.digest"], name
        assert run.inputs.dataset_inputs, name  # the manifest is logged as an MLflow dataset
    # MIMIC scores exactly its two test images (Pneumothorax: one train image in the index);
    # the Fracture test study has no label row and is not a query
    mimic = children["mimic_cxr"].data.metrics
    assert (mimic["queries/total"], mimic["queries/excluded"]) == (2, 0)
    assert mimic["index/classes"] == 3  # No Finding, Edema, Pneumothorax
    # the combined set merges the chest classes of its parts by name
    assert children["combined"].data.metrics["index/classes"] > children["nih14"].data.metrics["index/classes"]
