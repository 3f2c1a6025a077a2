"""Screenshots of the MLflow dashboard for the README, from a real sweep.

    python scripts/dashboard_screenshots.py            # smoke sweep in a temporary folder
    python scripts/dashboard_screenshots.py --store sqlite:////path/mlruns/mlflow.db

Runs `python -m cbir.run -m experiment=smoke` (unless --store names an existing store), starts
`mlflow server` on a free loopback port, and photographs the experiment's runs table, the
parent run and a child run with headless Chromium into docs/dashboard_*.png, and the sweep's
comparison page into docs/comparison_page.png. Needs a
`chromium` (or `chromium-browser`, `google-chrome`) on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_uri: str, timeout: float = 120):
    """`mlflow server` on 127.0.0.1:<free port> for the store; yields its base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlflow server did not start:\n{log.read().decode()[-3000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # uvicorn waits for idle keep-alive connections
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def api(url: str, endpoint: str, body: dict | None = None, method: str = "POST") -> dict:
    """One MLflow REST call (`/api/2.0/mlflow/<endpoint>`), JSON in and out."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(chrome: str, page: str, path: Path, size=(1400, 860), wait_ms: int = 12000) -> Path:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chrome,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={path}",
                page,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    return path


def shrink(path: Path, width: int = 1040, colours: int = 64) -> None:
    """Keep the left `width` pixels (the page, not the assistant side panel) as a palette PNG:
    a few tens of kB instead of hundreds."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.crop((0, 0, min(width, image.width), image.height)).convert("RGB")
        small = small.quantize(colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def smoke_store(folder: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(PROJECT)}
    subprocess.run([sys.executable, "-m", "cbir.run", "-m", "experiment=smoke"], cwd=folder, env=env, check=True)
    return f"sqlite:///{folder}/mlruns/mlflow.db"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="an existing MLflow store URI (default: run the smoke sweep now)")
    parser.add_argument("--out", type=Path, default=PROJECT / "docs", help="folder of the PNGs (default: docs/)")
    args = parser.parse_args()
    chrome = browser()
    if chrome is None:
        raise SystemExit(f"no browser found (tried {', '.join(BROWSERS)}); install chromium first")
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or smoke_store(Path(tmp))
        with mlflow_server(store) as url:
            experiment = api(url, "experiments/get-by-name?experiment_name=cbir", method="GET")["experiment"]
            eid = experiment["experiment_id"]
            runs = api(
                url,
                "runs/search",
                {"experiment_ids": [eid], "max_results": 100, "order_by": ["attributes.start_time DESC"]},
            )["runs"]
            tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
            parent = next(r for r, t in zip(runs, tags) if t.get("cbir.role") == "sweep")["info"]["run_id"]
            child = next(r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent)["info"]["run_id"]
            training = "workflowType=machine_learning"  # the "Model training" side of the UI
            order = "orderByKey=metrics.%60micro%2FP_at_1%60&orderByAsc=false"
            runs_page = f"{url}/#/experiments/{eid}"
            pages = {
                "dashboard_runs.png": (f"{runs_page}/runs?{training}&{order}", 620),
                "dashboard_parent.png": (f"{runs_page}/runs/{parent}?{training}", 1250),
                "dashboard_child.png": (f"{runs_page}/runs/{child}?{training}", 1250),
            }
            args.out.mkdir(parents=True, exist_ok=True)
            for name, (page, height) in pages.items():
                shrink(screenshot(chrome, page, args.out / name, size=(1400, height)))
                print(f"wrote {args.out / name}")
            # the comparison page as the sweep's folder holds it (the path the sweep prints after "Comparison")
            html = (
                Path(
                    api(url, f"runs/get?run_id={parent}", method="GET")["run"]["info"]["artifact_uri"].removeprefix(
                        "file://"
                    )
                )
                / "comparison.html"
            )
            if html.is_file():
                name = "comparison_page.png"
                shrink(screenshot(chrome, html.as_uri(), args.out / name, size=(1300, 1500)), width=1300)
                print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
