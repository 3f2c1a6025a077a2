"""Retrieval as a service: the saved index logged as the MLflow model `retriever`, loaded through
cbir's checked loader, served by a real `mlflow models serve` process on loopback."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from cbir import serving
from cbir.common.errors import ConfigError

CLASSES = {
    "XR/chest/normal": "stripes",
    "CT/abd/lesion": "disc",
    "MR/head/normal": "checks",
}


def _pattern(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    if kind == "stripes":
        image = 200 * ((x // 6) % 2)
    elif kind == "disc":
        image = 220 * ((x - 32) ** 2 + (y - 32) ** 2 < 300)
    else:
        image = 200 * (((x // 8) + (y // 8)) % 2)
    return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)


def make_index_folder(folder: Path, images: Path) -> Path:
    """A saved index folder written by the code `index.save=true` runs (cbir.search.save_index), over
    fabricated images of three classes, with the weights-free baseline encoder."""
    from cbir.evaluate import index as cbir_index
    from cbir.evaluate.retrieval import RetrievalSetup, SearchOutput
    from cbir.job.inputs import build_encoder
    from cbir.search import embed_images, save_index

    rows = []
    for label, kind in CLASSES.items():
        for i in range(4):
            path = Path(*label.split("/")) / f"{i}.png"
            (images / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pattern(kind, 10 * i + len(rows))).save(images / path)
            modality, anatomy, _ = label.split("/")
            rows.append(
                {
                    "path": path.as_posix(),
                    "dataset": "fabricated",
                    "split": "train",
                    "modality": modality,
                    "anatomy": anatomy,
                    "label": label,
                }
            )
    table = pd.DataFrame(rows)
    cfg = compose("encoder=baseline", "index.save=true")
    encoder = build_encoder(cfg)
    embeddings = embed_images(encoder, [images / p for p in table["path"]])
    positions = np.arange(len(table))
    index = cbir_index.build_index(cbir_index.l2_normalise(embeddings), "flat", use_gpu=False)
    search = SearchOutput(RetrievalSetup(positions, positions), index, None, None)
    return save_index(folder, search, table, images, cfg, "fabricated", encoder, embeddings)


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("serving-index")
    return make_index_folder(work / "index", work / "images")


def save_model(index_folder: Path, path: Path) -> Path:
    """The model folder log_retriever writes, without a store (no input example: nothing is predicted)."""
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(serving.MODEL_CODE),
        artifacts={"index": str(index_folder)},
        signature=serving.signature(),
        pip_requirements=["cbir"],
    )
    return path


@pytest.fixture(scope="module")
def loaded_model(index_folder, tmp_path_factory):
    return mlflow.pyfunc.load_model(str(save_model(index_folder, tmp_path_factory.mktemp("model") / "retriever")))


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_model_folder_holds_no_pickle(loaded_model, index_folder, tmp_path):
    folder = save_model(index_folder, tmp_path / "m")
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))
    assert (folder / "serving_model.py").read_text() == serving.MODEL_CODE.read_text()


def test_predict_gives_the_neighbours_of_cbir_search(loaded_model, index_folder):
    from cbir.search import SavedIndex

    saved = SavedIndex.load(index_folder)
    queries = [saved.root / p for p in saved.manifest["path"].iloc[[0, 5, 9]]]
    answer = loaded_model.predict(
        pd.DataFrame({"image": [encoded(q) for q in queries], "name": [str(q) for q in queries]}),
        params={"k": 4},
    )
    scores, positions = saved.search(queries, 4)
    assert answer.groupby("query_row").size().tolist() == [4, 4, 4]
    assert answer["index_row"].tolist() == positions.ravel().tolist()
    np.testing.assert_allclose(answer["similarity"], scores.ravel(), atol=1e-5)
    # an indexed image finds itself first, with its known class
    first = answer[answer["rank"] == 1]
    assert first["path"].tolist() == [str(q) for q in queries]
    assert first["label"].tolist() == saved.manifest["label"].iloc[[0, 5, 9]].tolist()


def test_dicom_and_jpeg_queries_are_decoded_as_cbir_search_decodes_files(loaded_model, index_folder, tmp_path):
    from test_images import write_dicom

    from cbir.search import SavedIndex

    saved = SavedIndex.load(index_folder)
    pixels = _pattern("disc", 99).astype(np.uint16) * 200  # 16-bit CT-like values
    files = [write_dicom(tmp_path / "scan.dcm", pixels), tmp_path / "photo.jpg"]
    Image.fromarray(_pattern("checks", 98)).save(files[1], quality=90)
    answer = loaded_model.predict(
        pd.DataFrame({"image": [encoded(f) for f in files], "name": [f.name for f in files]}),
        params={"k": 3},
    )
    _, positions = saved.search(files, 3)
    assert answer["index_row"].tolist() == positions.ravel().tolist()
    assert answer.loc[answer["rank"] == 1, "label"].tolist() == [
        "CT/abd/lesion",
        "MR/head/normal",
    ]


@pytest.mark.parametrize(
    "image, message",
    [
        (
            "bm90IGFuIGltYWdl",
            "broken.png: not a readable PNG/JPEG/DICOM image",
        ),  # base64 of b"not an image"
        ("%%% not base64", "broken.png: 'image' is not valid base64"),
    ],
)
def test_a_bad_image_is_a_400_naming_it(loaded_model, index_folder, image, message):
    good = index_folder.parent / "images" / "XR" / "chest" / "normal" / "0.png"
    with pytest.raises(MlflowException, match=message) as error:
        loaded_model.predict(pd.DataFrame({"image": [encoded(good), image], "name": ["good.png", "broken.png"]}))
    assert error.value.get_http_status_code() == 400


def test_a_bad_k_is_a_400(loaded_model, index_folder):
    good = index_folder.parent / "images" / "XR" / "chest" / "normal" / "0.png"
    with pytest.raises(MlflowException, match=r"params.k=0") as error:
        loaded_model.predict(pd.DataFrame({"image": [encoded(good)]}), params={"k": 0})
    assert error.value.get_http_status_code() == 400


@pytest.mark.parametrize(
    "encoder",
    [
        {
            "_target_": "os.system",
            "_args_": ["touch {sentinel}"],
        },  # a callable outside the allow-list
        {
            "_target_": "cbir.encoders.classical.ClassicalEncoder",
            "name": "baseline",
            "_args_": ["touch {sentinel}"],
        },  # an allowed class, but a Hydra call key
        {"_target_": "builtins.eval", "_args_": ["open('{sentinel}', 'w')"]},
    ],
)
def test_a_crafted_model_folder_is_refused(index_folder, tmp_path, encoder):
    sentinel = tmp_path / "sentinel"
    folder = save_model(index_folder, tmp_path / "crafted")
    meta_path = folder / "artifacts" / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["encoder"] = json.loads(json.dumps(encoder).replace("{sentinel}", str(sentinel)))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        ConfigError,
        match=r"index\.json encoder.*(not a cbir\.encoders class|not allowed)",
    ):
        mlflow.pyfunc.load_model(str(folder))
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tracking.register_model=cbir-retriever"], "tracking.log_model=false"),
        (
            ["tracking.log_model=true", "tracking.enabled=false"],
            "tracking.enabled=true",
        ),
        (["tracking.log_model=yes please"], "tracking.log_model="),
        (["tracking.log_model=true", "task=linear_probe"], "runs no retrieval"),
    ],
)
def test_log_model_settings_are_checked_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        serving.check_config(compose(*overrides))


def test_log_model_settings_that_work_pass():
    serving.check_config(compose("tracking.log_model=true", "tracking.register_model=cbir-retriever"))
    serving.check_config(compose())


# ------------------------------------------------------------------ end to end: a job, a real server
@pytest.fixture(scope="module")
def logged_job(tmp_path_factory, shared_data_dir):
    """A real job with tracking.log_model=true (and registration), and its run."""
    cwd = tmp_path_factory.mktemp("serving-job")
    run_cbir(
        cwd,
        "debug=smoke",
        "encoder=baseline",
        "tracking.log_model=true",
        "tracking.register_model=cbir-retriever",
        "hydra.run.dir=job",
        f"paths.data_dir={shared_data_dir}",
    )
    uri = f"sqlite:///{cwd}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    return cwd, uri, run


@pytest.fixture(scope="module")
def server(logged_job):
    cwd, uri, run = logged_job
    with serving.served(f"runs:/{run.info.run_id}/retriever", uri, log_file=cwd / "serve.log") as url:
        yield url


@pytest.mark.slow
def test_job_logs_a_linked_registered_model(logged_job):
    _, uri, run = logged_job
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.name == "retriever" and model.source_run_id == run.info.run_id
    linked = {m.key: m.value for m in model.metrics}
    assert linked["micro/P_at_1"] == pytest.approx(run.data.metrics["micro/P_at_1"])
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/retriever")
    assert info.signature.params.to_dict()[0]["name"] == "k" and info.saved_input_example_info is not None
    (version,) = client.search_model_versions("name = 'cbir-retriever'")
    assert version.run_id == run.info.run_id


@pytest.mark.slow
def test_served_answers_equal_cbir_search(logged_job, server):
    cwd, _, _ = logged_job
    index = cwd / "job" / "index"
    meta = json.loads((index / "index.json").read_text())
    manifest = pd.read_csv(index / "manifest.csv")
    root = Path(meta["root"])
    known = manifest.iloc[0]  # an indexed image: its class is known, its first neighbour is itself
    table = pd.read_csv(cwd / "job" / "gallery.csv") if (cwd / "job" / "gallery.csv").exists() else None
    others = list(dict.fromkeys(table["query_path"]))[:2] if table is not None else list(manifest["path"].iloc[1:3])
    queries = [root / known["path"], *(root / p for p in others)]
    status, answer = serving.post(
        f"{server}/invocations",
        serving.request_body([(str(q), q.read_bytes()) for q in queries], k=5),
    )
    assert status == 200
    served = pd.DataFrame(answer["predictions"])
    first = served[(served["query"] == str(queries[0])) & (served["rank"] == 1)].iloc[0]
    assert (first["path"], first["label"], first["modality"]) == (
        str(root / known["path"]),
        known["label"],
        known["modality"],
    )
    images = ",".join(str(q) for q in queries)
    run_cbir(
        cwd,
        "search.index_dir=job/index",
        f"search.images=[{images}]",
        "search.k=5",
        "search.output=found.csv",
        module="cbir.search",
    )
    expected = pd.read_csv(cwd / "found.csv")
    assert served["query"].tolist() == expected["query"].tolist()
    assert served["path"].tolist() == expected["path"].tolist()
    assert served["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(served["similarity"], expected["similarity"], atol=1e-5)


@pytest.mark.slow
def test_served_bad_image_is_a_400_naming_it(server):
    status, answer = serving.post(f"{server}/invocations", serving.request_body([("scan.png", b"\x89PNG broken")]))
    assert status == 400 and "scan.png: not a readable PNG/JPEG/DICOM image" in answer["message"]


@pytest.mark.slow
def test_log_model_command_on_a_saved_index(index_folder, tmp_path):
    run_cbir(tmp_path, f"serving.index_dir={index_folder}", module="cbir.serving")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.source_run_id == run.info.run_id and run.info.status == "FINISHED"
    crafted = tmp_path / "crafted"
    shutil.copytree(index_folder, crafted)
    meta = json.loads((crafted / "index.json").read_text())
    meta["encoder"]["_target_"] = "os.system"
    (crafted / "index.json").write_text(json.dumps(meta))
    proc = run_cbir(tmp_path, f"serving.index_dir={crafted}", module="cbir.serving", check=False)
    assert proc.returncode == 2 and "refusing to build it" in proc.stdout + proc.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 1  # refused before any run is created
