"""Serving: a job's `retriever` model behind `mlflow models serve` on loopback, images/s and request
latency p50/p95 at each batch size, over the same model's predict called in this process (what HTTP
and JSON cost). Bounded request loops; the server is stopped when the section ends."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cbir.bench.sweep import _cbir_run


def _figures(seconds: list[float], batch: int) -> dict:
    return {
        "requests": len(seconds),
        "images_per_s": batch * len(seconds) / sum(seconds),
        "p50_ms": 1000 * float(np.percentile(seconds, 50)),
        "p95_ms": 1000 * float(np.percentile(seconds, 95)),
    }


def _seconds(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    import json

    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from cbir import serving

    sc = bc.serving
    job = work / "job"
    _cbir_run(
        work,
        *sc.overrides,
        f"encoder={sc.encoder}",
        f"paths.data_dir={data_dir}",
        "extract.progress=false",
        f"paths.cache_dir={work / 'cache'}",
        f"hydra.run.dir={job}",
        "tracking.log_model=true",
    )
    uri = f"sqlite:///{work}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cbir").experiment_id
    (run,) = client.search_runs([experiment])
    (logged,) = client.search_logged_models([experiment])
    # the model's own folder: loading it needs no tracking URI (mlflow.set_tracking_uri would change
    # the store the benchmark's own run goes to, through MLFLOW_TRACKING_URI)
    local_model = mlflow.artifacts.download_artifacts(logged.artifact_location)
    model = mlflow.pyfunc.load_model(local_model)
    root = Path(json.loads((job / "index" / "index.json").read_text())["root"])
    manifest = pd.read_csv(job / "index" / "manifest.csv")
    files = [(p, (root / p).read_bytes()) for p in manifest["path"]]
    k = int(sc.k)
    repeats = {int(b): int(n) for b, n in sizes.serving_requests.items()}
    results = {
        "encoder": str(sc.encoder),
        "index_rows": len(files),
        "k": k,
        "batches": {},
    }
    model_uri = f"runs:/{run.info.run_id}/{serving.MODEL_NAME}"
    with serving.served(model_uri, uri, log_file=work / "serve.log") as url:

        def request(body: dict) -> None:
            status, answer = serving.post(f"{url}/invocations", body)
            if status != 200:
                raise RuntimeError(f"the server answered {status}: {str(answer)[:500]}")

        for size, n in repeats.items():
            bodies = [
                serving.request_body([files[(i * size + j) % len(files)] for j in range(size)], k) for i in range(n)
            ]
            frames = [pd.DataFrame(body["dataframe_records"]) for body in bodies]
            request(bodies[0])  # warm-up, both ways
            model.predict(frames[0], params={"k": k})
            served, local = [], []
            for body, frame in zip(bodies, frames):  # bounded: n requests; interleaved, so that
                served.append(_seconds(request, body))  # the shared machine's load hits both alike
                local.append(_seconds(model.predict, frame, {"k": k}))
            figures = {
                "served": _figures(served, size),
                "in_process": _figures(local, size),
            }
            figures["ratio"] = figures["served"]["images_per_s"] / figures["in_process"]["images_per_s"]
            results["batches"][size] = figures
    results["ratio"] = results["batches"][max(repeats)]["ratio"]
    results["baseline"] = "the same model's predict in this process (same base64 input, no HTTP or JSON)"
    return results


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    out = []
    for size, figures in result["batches"].items():
        served, local = figures["served"], figures["in_process"]
        out.append(
            (
                f"serving {result['encoder']} batch {size} (k={result['k']}, {served['requests']} requests)",
                f"{served['images_per_s']:.1f} img/s, p50 {served['p50_ms']:.0f} ms, p95 {served['p95_ms']:.0f} ms",
                f"{local['images_per_s']:.1f} img/s in process",
                f"{figures['ratio']:.2f}",
                "",
            )
        )
    return out
