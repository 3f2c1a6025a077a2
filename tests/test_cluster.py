"""Beyond one process: jobs started by submitit (the plugin that also drives Slurm), the sbatch script
of the Slurm preset, and a sweep logging to a real `mlflow server` over HTTP (loopback only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cbir
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher (test extra) not installed"
)

SMALL = ["debug=smoke", "dataset.max_per_class=6", "dataset.min_per_class=4"]
SWEEP = [*SMALL, "encoder=baseline,random", "index.per_class=3,10"]


def output(proc) -> str:
    return proc.stdout + proc.stderr


def sweep_runs(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cbir").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("cbir.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def check_sweep(client, parents, children) -> None:
    """One FINISHED parent; each of the four jobs FINISHED once under it; the curves on the parent."""
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert sorted((c.data.tags["encoder"], c.data.tags["per_class"]) for c in finished) == [
        ("baseline", "10"),
        ("baseline", "3"),
        ("random", "10"),
        ("random", "3"),
    ]
    for encoder in ("baseline", "random"):
        history = client.get_metric_history(parent.info.run_id, f"saturation/{encoder}/micro/P_at_1")
        assert sorted(m.step for m in history) == [3, 10]


# ---------------------------------------------------------------------------- submitit
@pytest.mark.slow
def test_submitit_jobs_share_one_parent_and_one_cache(tmp_path, shared_data_dir):
    sweep = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=20",
        *SWEEP,
        f"paths.data_dir={shared_data_dir}",
    ]
    run_cbir(tmp_path, *sweep)
    client, parents, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    check_sweep(client, parents, children)
    assert len(children) == 4
    # four job processes started by submitit, none of them the submitting one (which made the parent)
    pids = {c.data.tags["cbir.pid"] for c in children}
    assert len(pids) == 4 and parents[0].data.tags["cbir.pid"] not in pids
    assert sorted(c.data.tags["cache"] for c in children) == [
        "hit",
        "hit",
        "miss",
        "miss",
    ]  # one extraction per encoder
    assert len(list((tmp_path / ".cache/cbir/embeddings").glob("*-*[!k]"))) == 2
    # the same command again: every job skipped, nothing new in MLflow
    run_cbir(tmp_path, *sweep)
    client, parents, again = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(parents) == 1 and {c.info.run_id for c in again} == {c.info.run_id for c in children}
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "multirun").rglob("*.out"))
    assert logs.count("skipping") == 4


def test_slurm_preset_writes_the_expected_sbatch_script(tmp_path, shared_data_dir):
    """The Slurm launcher up to the submission: a stand-in `sbatch` keeps the script and refuses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script_copy = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script_copy}\necho "not submitting in a test" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that it exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cbir(
        tmp_path,
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        *SWEEP,
        f"paths.data_dir={shared_data_dir}",
        env=env,
        check=False,
    )
    assert proc.returncode != 0 and "not submitting in a test" in output(proc)
    script = script_copy.read_text()
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=240",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --array=0-3%4",  # the four jobs as one array (array_parallelism=16, capped at 4)
        "#SBATCH --signal=USR2@120",
    ]:
        assert line in script.splitlines(), line
    assert f"{sys.executable} -u -m submitit.core._submit" in script and "srun" in script
    # the parent run exists before submission: array jobs attach to it through the exported environment
    _, parents, children = sweep_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(parents) == 1 and children == []


# ---------------------------------------------------------------------------- MLflow server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a loopback port, SQLite backend, artifacts served by the server."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root}/server.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        with (self.root / "server.log").open("a") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )  # its own process group: stop() ends its workers too
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not answer within 180 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture()
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_parallel_sweep_over_an_mlflow_server_survives_the_server_going_away(tmp_path, shared_data_dir, mlflow_server):
    sweep = [
        "-m",
        "hydra/launcher=local_parallel",
        *SWEEP,
        f"paths.data_dir={shared_data_dir}",
        f"tracking.uri={mlflow_server.uri}",
    ]
    # MLflow's client would retry for minutes before giving up on a server; here, at once
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    log_file = tmp_path / "sweep.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cbir.run", *sweep], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        client = MlflowClient(mlflow_server.uri)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:  # stop the server once the first job finished
            experiment = client.get_experiment_by_name("cbir")
            if experiment and client.search_runs(
                [experiment.experiment_id], "tags.config_hash != '' and attributes.status = 'FINISHED'"
            ):
                break
            time.sleep(0.2)
        mlflow_server.stop()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_file.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert "stopped answering" in text or "MLflow server not reachable" in text, text[-3000:]
    # the server is back: the same command completes the sweep
    mlflow_server.start()
    rerun = run_cbir(tmp_path, *sweep, env=env)
    assert "skipping" in output(rerun)
    client, parents, children = sweep_runs(mlflow_server.uri)
    check_sweep(client, parents, children)
    assert not (tmp_path / "mlruns").exists()  # nothing went to a local store
    # artifacts come back through the server
    child = next(c for c in children if c.info.status == "FINISHED")
    assert {"metrics.json", "per_class.csv"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    curves = pd.read_csv(client.download_artifacts(parents[0].info.run_id, "saturation.csv", str(tmp_path)))
    assert set(curves["step"]) == {3, 10}


# ---------------------------------------------------------------------------- time limit
@pytest.mark.slow
def test_a_terminated_submitit_job_ends_killed_keeps_its_rows_and_resumes(tmp_path, shared_data_dir):
    """What Slurm does at a job's time limit (SIGTERM to the job's process), here to a job started by
    submitit; the job process is found through its run's `cbir.pid` tag."""
    sweep = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=20",
        *SMALL,
        "encoder=resnet50",
        "encoder.pretrained=false",
        "encoder.input_size=128",
        "extract.batch_size=4",
        f"paths.data_dir={shared_data_dir}",
    ]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "sweep.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cbir.run", *sweep], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    rows_at_term = None
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and rows_at_term is None:
            done_files = list((tmp_path / ".cache/cbir/embeddings").glob("*.partial/done.npy"))
            rows = int((np.load(done_files[0], mmap_mode="r") > 0).sum()) if done_files else 0
            if rows >= 8 and (tmp_path / "mlruns/mlflow.db").exists():
                _, _, children = sweep_runs(uri)
                running = [c for c in children if c.info.status == "RUNNING"]
                if running:
                    os.kill(int(running[0].data.tags["cbir.pid"]), signal.SIGTERM)
                    rows_at_term = rows
            time.sleep(0.1)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rows_at_term is not None, (tmp_path / "sweep.log").read_text()[-3000:]
    assert proc.returncode != 0
    _, _, (child,) = sweep_runs(uri)
    assert child.info.status == "KILLED" and child.data.tags["error"].startswith("Terminated")
    (done_file,) = (tmp_path / ".cache/cbir/embeddings").glob("*.partial/done.npy")
    assert rows_at_term <= int((np.load(done_file) > 0).sum()) < len(np.load(done_file))
    run_cbir(tmp_path, *sweep)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "multirun").rglob("*.out"))
    assert "resuming extraction" in logs
    _, parents, children = sweep_runs(uri)
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"] and parents[0].info.status == "FINISHED"
