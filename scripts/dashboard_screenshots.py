"""Screenshots of the MLflow dashboard for the README, from a real sweep.

    python scripts/dashboard_screenshots.py            # smoke sweep in a temporary folder
    python scripts/dashboard_screenshots.py --store sqlite:////path/mlruns/mlflow.db

Runs `python -m cbir.run -m experiment=smoke` (unless --store names an existing store), starts
`mlflow server` on a free loopback port, and photographs with headless Chromium, at the addresses
the sweep prints: the runs table, the comparison page inside MLflow's artifact viewer, then the parent
run and a child run, into docs/dashboard_*.png, and the sweep's comparison page from disk into
docs/comparison_page.png. A fresh browser profile each time: what a new user sees. The MLflow
Assistant side panel on the right is cut off. Needs a `chromium` (or `chromium-browser`,
`google-chrome`) on PATH.
"""

from __future__ import annotations

import argparse
import base64
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
def mlflow_server(store_uri: str, timeout: float = 300):
    """`mlflow server` on 127.0.0.1:<free port> for the store; yields its base URL. It can take a
    minute to start on a loaded machine, hence the long timeout."""
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


def screenshot(chrome: str, page: str, path: Path, size=(1400, 860), settle_s: float = 10) -> Path:
    """Open `page` in headless Chromium, wait `settle_s` seconds of real time and save a PNG.

    Real time, not `--virtual-time-budget`: MLflow shows an HTML artifact in a sandboxed iframe, and
    under virtual time Chromium takes the picture before that frame has run its scripts (the
    comparison page came out blank although it renders in a browser). The browser is driven through
    the DevTools protocol over a pipe (`--remote-debugging-pipe`: fd 3 in, fd 4 out)."""
    to_chrome, from_chrome = os.pipe(), os.pipe()

    def give_pipes() -> None:  # in the child, before exec: the DevTools pipe on fds 3 and 4
        os.dup2(to_chrome[0], 3)
        os.dup2(from_chrome[1], 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
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
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=give_pipes,
            close_fds=False,
        )
        os.close(to_chrome[0])
        os.close(from_chrome[1])
        devtools = DevTools(to_chrome[1], from_chrome[0])
        try:
            target = devtools.call("Target.createTarget", url=page)
            session = devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
            devtools.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=size[0],
                height=size[1],
                deviceScaleFactor=1,
                mobile=False,
            )
            time.sleep(settle_s)
            png = devtools.call("Page.captureScreenshot", session, format="png")["data"]
            path.write_bytes(base64.b64decode(png))
            devtools.call("Browser.close")
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(to_chrome[1])
            os.close(from_chrome[0])
    return path


class DevTools:
    """The Chrome DevTools protocol over a pipe: JSON messages ended by a NUL byte."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd, self.next_id, self.buffer = write_fd, read_fd, 0, b""

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:  # events arrive in between: skip them
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


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
    sys.path.insert(0, str(PROJECT))  # this checkout's cbir, whatever is installed
    from cbir.tracking import dashboard

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
            # the addresses the sweep prints (cbir.tracking.dashboard.ui_address), on this server
            # (name, address, height, seconds to wait): the comparison page inside MLflow's viewer is 4.7 MB
            # of HTML and plotly to run in its iframe: ~12 s on two busy cores, a few on a desktop
            pages = [
                ("dashboard_runs.png", dashboard.ui_address(url, eid)[1], 700, 10),
                ("dashboard_comparison.png", dashboard.ui_address(url, eid, parent, "comparison.html")[1], 1000, 30),
                ("dashboard_parent.png", dashboard.ui_address(url, eid, parent)[1], 1250, 10),
                ("dashboard_child.png", dashboard.ui_address(url, eid, child)[1], 1250, 10),
            ]
            args.out.mkdir(parents=True, exist_ok=True)
            for name, page, height, settle_s in pages:
                shrink(screenshot(chrome, page, args.out / name, size=(1400, height), settle_s=settle_s))
                print(f"wrote {args.out / name}  ({page})")
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
