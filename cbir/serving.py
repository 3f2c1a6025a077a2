"""Retrieval as a service: a saved index (cbir.search) logged as the MLflow model `retriever`.

    python -m cbir.serving serving.index_dir=<saved index folder>      # or a run with tracking.log_model=true
    mlflow models serve -m runs:/<run id>/retriever --env-manager local -h 127.0.0.1 -p 5001
    curl -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_records": [{"image": "<base64 PNG/JPEG/DICOM>", "name": "scan.png"}], "params": {"k": 5}}'

The model is logged from code (cbir/serving_model.py), not as a pickled object: its folder holds
that file and the index folder (index.faiss, manifest.csv, index.json with the encoder's config
and seed, i.e. a reference to its weights, never the weights pickled). Loading it goes through
cbir.search.SavedIndex, which refuses a damaged folder or an encoder config naming anything but
cbir's own classes. The answer has one row per (image, neighbour): query, rank, path, label,
modality, similarity (cosine) and index_row (query_row: the image's position in the request), the same neighbours `python -m cbir.search` gives.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as cbir.run: never wait on an unreachable hub

import mlflow
import numpy as np
import pandas as pd

log = logging.getLogger("cbir.serving")
MODEL_NAME = "retriever"
MODEL_CODE = Path(__file__).with_name("serving_model.py")
DEFAULT_K = 5
OUTPUT_COLUMNS = [
    "query",
    "query_row",
    "rank",
    "path",
    "label",
    "modality",
    "similarity",
    "index_row",
]
LOOPBACK = "127.0.0.1"  # the only address a server is started on or requested from here


# ------------------------------------------------------------------ the served model
class Retriever(mlflow.pyfunc.PythonModel):
    """Embeds the posted images with the index's encoder and returns their k nearest index rows."""

    def load_context(self, context) -> None:
        from cbir.search import SavedIndex

        self.saved = SavedIndex.load(context.artifacts["index"])  # checked: data only, never code
        self.encoder = self.saved.build_encoder()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cbir.evaluate import index as cbir_index

        k = _k_param((params or {}).get("k", DEFAULT_K))
        table = pd.DataFrame(model_input)
        if "image" not in table.columns or table.empty:
            raise bad_request(
                "give one or more images: rows with an 'image' column holding base64 PNG/JPEG/DICOM "
                "bytes (and optionally a 'name')"
            )
        names = [_name(table, i) for i in range(len(table))]
        images = [decode_image(value, name) for value, name in zip(table["image"], names)]
        vectors = embed(self.encoder, images)
        scores, positions = cbir_index.search(
            self.saved.index,
            cbir_index.l2_normalise(vectors),
            min(k, self.saved.index.ntotal),
        )
        return neighbours_table(self.saved, names, scores, positions)


def bad_request(message: str):
    """MLflow's scoring server answers an MlflowException with INVALID_PARAMETER_VALUE as HTTP 400
    (any other exception from predict becomes a 400 without our message)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _k_param(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise bad_request(f"params.k={value!r}: give a whole number >= 1")
    return int(value)


def _name(table: pd.DataFrame, i: int) -> str:
    name = table["name"].iloc[i] if "name" in table.columns else None
    return str(name) if isinstance(name, str) and name else f"image {i}"


def decode_image(value, name: str):
    """The PIL image of one posted base64 string, decoded as cbir decodes files (PNG, JPEG, DICOM;
    by content, not name). A bad image is a 400 naming it."""
    from cbir.data.images import DICOM_SUFFIXES, ImageLoadError, load_image

    if not isinstance(value, str) or not value:
        raise bad_request(f"{name}: 'image' must be a base64 string of PNG/JPEG/DICOM bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{name}: 'image' is not valid base64 ({e}); send the file's bytes base64-encoded") from None
    suffix = Path(name).suffix.lower()
    with tempfile.TemporaryDirectory(prefix="cbir-serve-") as tmp:  # load_image reads files (DICOM via pydicom)
        path = Path(tmp) / f"query{suffix if suffix in DICOM_SUFFIXES else ''}"
        path.write_bytes(data)
        try:
            return load_image(path)
        except ImageLoadError as e:
            reason = str(e).split(": ", 1)[-1].replace(str(path), name)  # the temporary file is not the user's
            raise bad_request(f"{name}: not a readable PNG/JPEG/DICOM image ({reason})") from None


def embed(encoder, images, batch_size: int = 16) -> np.ndarray:
    """Embeddings of decoded images, preprocessed as cbir.search.embed_images does for files."""
    import torch

    transform = encoder.transform()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start : start + batch_size]])
        with torch.inference_mode():
            out.append(encoder(batch).float().cpu().numpy())
    return np.concatenate(out)


def neighbours_table(saved, names, scores, positions) -> pd.DataFrame:
    manifest = saved.manifest
    modality = manifest["modality"] if "modality" in manifest.columns else pd.Series("", index=manifest.index)
    rows = []
    for q, name in enumerate(names):
        for rank, (position, score) in enumerate(zip(positions[q], scores[q]), start=1):
            if position < 0:
                continue
            rows.append(
                {
                    "query": name,
                    "query_row": q,
                    "rank": rank,
                    "path": str(saved.root / manifest["path"].iloc[position]),
                    "label": manifest["label"].iloc[position],
                    "modality": modality.iloc[position],
                    "similarity": float(score),
                    "index_row": int(position),
                }
            )
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


# ------------------------------------------------------------------ logging the model
def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "name", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "query"),
            ColSpec("long", "query_row"),
            ColSpec("long", "rank"),
            ColSpec("string", "path"),
            ColSpec("string", "label"),
            ColSpec("string", "modality"),
            ColSpec("double", "similarity"),
            ColSpec("long", "index_row"),
        ]
    )
    return ModelSignature(
        inputs=inputs,
        outputs=outputs,
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]),
    )


def example_image(saved) -> tuple[str, str]:
    """(name, base64) of the first indexed image when it is at hand, else a small grey PNG."""
    import io

    from PIL import Image

    first = saved.root / saved.manifest["path"].iloc[0]
    if first.is_file() and first.stat().st_size < 2_000_000:
        return first.name, base64.b64encode(first.read_bytes()).decode()
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(buffer, format="PNG")
    return "example.png", base64.b64encode(buffer.getvalue()).decode()


def request_body(images: list[tuple[str, bytes]], k: int = DEFAULT_K) -> dict:
    """The JSON body of an /invocations request for (name, file bytes) pairs."""
    return {
        "dataframe_records": [{"image": base64.b64encode(data).decode(), "name": name} for name, data in images],
        "params": {"k": int(k)},
    }


def log_retriever(index_dir: str | Path, register: str | None = None):
    """Log the saved index folder as the model `retriever` of the active run (checked first with the
    same loader serving uses) and link the run's summary metrics to it; register it as `register`
    when given. Returns MLflow's ModelInfo."""
    from cbir.search import SavedIndex

    saved = SavedIndex.load(index_dir)
    run = mlflow.active_run()
    name, image = example_image(saved)
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(MODEL_CODE),
        artifacts={"index": str(Path(index_dir).resolve())},
        signature=signature(),
        input_example=(
            pd.DataFrame({"image": [image], "name": [name]}),
            {"k": DEFAULT_K},
        ),
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            "cbir",
        ],  # served with --env-manager local
        params={
            "encoder": str(saved.meta["encoder"].get("name", "")),
            "rows": int(saved.index.ntotal),
            "index_type": str(saved.meta.get("index", {}).get("type", "")),
            "dim": int(saved.index.d),
        },
        registered_model_name=register or None,
    )
    if run is not None:  # the run's summary metrics on the model's page (MLflow 3 links metrics by model_id)
        metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
        linked = {key: value for key, value in metrics.items() if not key.startswith(("curve/", "saturation/"))}
        if linked:
            mlflow.log_metrics(linked, model_id=info.model_id)
    log.info(
        "retriever logged as %s (model id %s)%s; serve it with: mlflow models serve -m %s --env-manager local "
        "-h 127.0.0.1 -p 5001",
        info.model_uri,
        info.model_id,
        f", registered as {register}" if register else "",
        f"runs:/{run.info.run_id}/{MODEL_NAME}" if run else info.model_uri,
    )
    return info


def check_config(cfg) -> None:
    """tracking.log_model / tracking.register_model, checked before any work."""
    from cbir.common.errors import ConfigError

    log_model, register = (
        cfg.tracking.get("log_model", False),
        cfg.tracking.get("register_model"),
    )
    if not isinstance(log_model, bool):
        raise ConfigError(f"tracking.log_model={log_model!r}: give true or false")
    if register is not None and (not isinstance(register, str) or not register.strip()):
        raise ConfigError(f"tracking.register_model={register!r}: give a model name, or null")
    if register and not log_model:
        raise ConfigError("tracking.register_model is set but tracking.log_model=false; add tracking.log_model=true")
    if log_model and not cfg.tracking.enabled:
        raise ConfigError("tracking.log_model=true needs tracking.enabled=true (the model is logged to the job's run)")
    if log_model:
        from cbir.evaluate import tasks

        if "retrieval" not in tasks.evaluations(cfg):
            raise ConfigError(
                f"tracking.log_model=true serves the retrieval index, but task={tasks.task_name(cfg)} "
                "runs no retrieval; use task=retrieval or task=all"
            )


# ------------------------------------------------------------------ a loopback server (tests, bench)
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a POST to a loopback server."""
    assert url.startswith(f"http://{LOOPBACK}:"), url
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with _opener().open(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"message": text}


@contextmanager
def served(
    model_uri: str,
    tracking_uri: str | None = None,
    startup_seconds: float = 180,
    log_file: Path | None = None,
):
    """`mlflow models serve` of `model_uri` on a free loopback port, for the body; yields its base URL.
    Readiness is a bounded poll of /ping; the server (its whole process group) is stopped on exit."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}),
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        LOOPBACK,
        "-p",
        str(port),
        "-w",
        "1",
    ]
    with open(log_file or os.devnull, "wb") as output:  # the child keeps its own copy of the handle
        process = subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"mlflow models serve exited with {process.returncode} before answering"
                    + (f"; its output: {log_file}" if log_file else "")
                )
            try:
                with _opener().open(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping within {startup_seconds:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    try:  # a worker that outlived the server
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ command: log an existing saved index
def log_command(cfg) -> object:
    from cbir.search import SearchError
    from cbir.tracking.runs import Tracker, retry_locked

    if not cfg.serving.get("index_dir"):
        raise SearchError("serving.index_dir is not set; give the `index` folder of a run made with index.save=true")
    register = cfg.tracking.get("register_model")
    tracker = Tracker.from_config(cfg)
    if not tracker.enabled:
        from cbir.common.errors import ConfigError

        raise ConfigError("tracking.enabled=false: the model is logged to MLflow; leave tracking enabled")
    from cbir.search import SavedIndex

    saved = SavedIndex.load(cfg.serving.index_dir)  # refused before any run is created
    mlflow.set_tracking_uri(tracker.uri)
    run_id = cfg.serving.get("run_id")
    if run_id:
        retry_locked(mlflow.start_run, run_id=str(run_id))
    else:
        name = f"retriever · {saved.meta.get('run_name') or Path(cfg.serving.index_dir).resolve().parent.name}"
        retry_locked(
            mlflow.start_run,
            experiment_id=tracker.experiment_id(),
            run_name=name,
            tags={"source_index": str(Path(cfg.serving.index_dir).resolve())},
        )
    try:
        info = log_retriever(cfg.serving.index_dir, register)
        print(
            f"run {mlflow.active_run().info.run_id}: serve with\n  MLFLOW_TRACKING_URI={tracker.uri} "
            f"mlflow models serve -m runs:/{mlflow.active_run().info.run_id}/{MODEL_NAME} --env-manager local "
            f"-h 127.0.0.1 -p 5001"
        )
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()
    return info


def main():
    import hydra

    from cbir import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serving")
    def serving_main(cfg) -> None:
        from cbir.job.inputs import user_errors
        from cbir.search import SearchError

        try:
            log_command(cfg)
        except (SearchError, *user_errors()) as e:
            log.error("%s", e)
            sys.exit(2)

    serving_main()


if __name__ == "__main__":
    main()
