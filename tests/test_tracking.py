"""The tracking store under concurrency and faults: where runs go, stores that cannot work, parallel
creation, identical jobs at once, runs whose process died, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, compose, run_cbir, run_cbir_at_once
from mlflow.tracking import MlflowClient

from cbir.job.checks import ConfigError, check_tracking
from cbir.tracking import process
from cbir.tracking.runs import PARENT_ENV, Tracker

SMALL = ["debug=smoke", "dataset.max_per_class=6", "dataset.min_per_class=4"]


def output(proc) -> str:
    return proc.stdout + proc.stderr


def all_runs(uri: str, experiment: str = "cbir"):
    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


# ---------------------------------------------------------------------------- where runs go
def test_store_location_follows_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CBIR_MLRUNS_DIR", raising=False)
    assert compose().tracking.uri == "sqlite:///mlruns/mlflow.db"
    monkeypatch.setenv("CBIR_MLRUNS_DIR", "/srv/cbir/mlruns")
    cfg = compose()
    assert cfg.tracking.uri == "sqlite:////srv/cbir/mlruns/mlflow.db"
    assert Tracker.from_config(cfg).artifact_root == "/srv/cbir/mlruns/artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert compose().tracking.uri == "http://mlflow.example:5000"
    assert compose("tracking.uri=sqlite:///x.db").tracking.uri == "sqlite:///x.db"  # the command line wins


def test_artifacts_go_beside_the_named_database(monkeypatch, tmp_path):
    monkeypatch.delenv("CBIR_MLRUNS_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/env.db")
    assert Tracker.from_config(compose()).artifact_root == "/x/artifacts"  # not ./mlruns/artifacts
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Tracker.from_config(compose("tracking.uri=sqlite:////y/z/t.db")).artifact_root == "/y/z/artifacts"
    assert Tracker.from_config(compose()).artifact_root == str(Path.cwd() / "mlruns" / "artifacts")
    assert Tracker.from_config(compose(f"tracking.artifact_root={tmp_path}/a")).artifact_root == f"{tmp_path}/a"
    assert Tracker.from_config(compose("tracking.uri=http://mlflow.example:5000")).artifact_root is None


@pytest.mark.slow
def test_a_store_named_by_the_environment_keeps_its_artifacts_beside_it(tmp_path, shared_data_dir):
    database = tmp_path / "elsewhere" / "env.db"
    launch = tmp_path / "launch"
    launch.mkdir()
    proc = run_cbir(
        launch,
        *SMALL,
        f"paths.data_dir={shared_data_dir}",
        "tracking.enabled=true",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{database}"},
    )
    assert f"artifacts in {database.parent / 'artifacts'}" in output(proc)  # said at start
    _, (run,) = all_runs(f"sqlite:///{database}")
    assert run.info.artifact_uri.startswith((database.parent / "artifacts").as_uri())
    assert (database.parent / "artifacts").is_dir() and not (launch / "mlruns").exists()


# ---------------------------------------------------------------------------- stores that cannot work
def tracking_error(uri: str) -> str:
    with pytest.raises(ConfigError) as raised:
        check_tracking(compose(f"tracking.uri={uri}"))
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_unusable_stores_are_one_line_errors(tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert f"{folder} is a folder; name the database file inside it" in tracking_error(f"sqlite:///{folder}")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "cannot create the database folder" in tracking_error(f"sqlite:///{a_file}/mlflow.db")
    assert "cannot create the database folder /proc/cbir" in tracking_error("sqlite:////proc/cbir/mlflow.db")
    assert f"{a_file} is not a SQLite database" in tracking_error(f"sqlite:///{a_file}")
    message = tracking_error("mysql://user:secret@db.example/mlflow")
    assert "database driver is not installed (no module 'MySQLdb'); pip install mysqlclient" in message
    assert "secret" not in message and "user:***@" in message
    assert "pip install psycopg2-binary" in tracking_error("postgresql+psycopg2://db.example/mlflow")
    assert "plain folder store" in tracking_error(f"file://{tmp_path}/store")
    check_tracking(compose(f"tracking.uri=sqlite:///{tmp_path}/ok/mlflow.db"))  # a usable one passes


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_sqlite_under_a_read_only_folder_is_a_one_line_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert f"the database folder {folder} is not writable" in tracking_error(f"sqlite:///{folder}/mlflow.db")
    finally:
        folder.chmod(0o755)


def as_an_ordinary_user() -> list[str]:
    """Command prefix that runs a process without root's power to write anywhere: as root, the
    same user with every capability dropped (setpriv); as anyone else, nothing."""
    if os.geteuid() != 0:
        return []
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is not installed")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


@pytest.mark.slow
def test_a_read_only_store_is_a_one_line_error_before_any_work(tmp_path, shared_data_dir):
    """The user's command against a store folder (then a database file) it may not write, also
    when the tests run as root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    database = tmp_path / "rw" / "mlflow.db"
    database.parent.mkdir()
    import sqlite3

    with sqlite3.connect(database) as connection:  # a SQLite file, as an earlier run leaves it
        connection.execute("create table runs (id text)")
    folder.chmod(0o555)
    database.chmod(0o444)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    try:
        for uri, message in (
            (f"sqlite:///{folder}/mlflow.db", f"the database folder {folder} is not writable"),
            (f"sqlite:///{database}", f"{database} is not writable by this user"),
        ):
            proc = subprocess.run(
                [
                    *as_an_ordinary_user(),
                    sys.executable,
                    "-m",
                    "cbir.run",
                    *SMALL,
                    f"paths.data_dir={shared_data_dir}",
                    f"tracking.uri={uri}",
                ],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 2, output(proc)[-3000:]
            assert message in output(proc) and "Traceback" not in output(proc)
            assert not (tmp_path / ".cache").exists()  # refused before any extraction
    finally:
        folder.chmod(0o755)
        database.chmod(0o644)


@pytest.mark.slow
def test_environment_store_is_used_and_checked_before_any_work(tmp_path, shared_data_dir):
    folder = tmp_path / "store_folder"
    folder.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}"}  # a folder, not a database file
    proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={shared_data_dir}", env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in output(proc)
    assert f"tracking.uri=sqlite:///{folder}: {folder} is a folder" in output(proc)
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "mlruns").exists()
    # a sweep checks it in the launching process, before any job
    proc = run_cbir(
        tmp_path, "-m", *SMALL, "encoder=baseline,random", "tracking.uri=mysql://db.example/mlflow", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in output(proc)
    assert "tracking.uri=mysql://db.example/mlflow: the database driver is not installed" in output(proc)


HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # held until the test closes our stdin
"""


class StoreHeldLocked:
    """Another process holding the SQLite file in an exclusive transaction (a sqlite3 shell, say)."""

    def __init__(self, database: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(database)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_a_store_held_locked_at_start_is_one_line_before_any_work(tmp_path, shared_data_dir):
    database = tmp_path / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    sqlite3_file(database)
    holder = StoreHeldLocked(database)
    try:
        proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={shared_data_dir}", check=False)
    finally:
        holder.release()
    assert proc.returncode == 2 and "Traceback" not in output(proc)
    assert f"tracking.uri=sqlite:///{database}: {database} is locked by another process" in output(proc)
    assert not (tmp_path / ".cache").exists()  # nothing extracted


def sqlite3_file(path: Path) -> None:
    import sqlite3

    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE t (x)")
    connection.close()


def test_a_store_locked_during_a_run_lets_the_job_write_its_files_then_says_so(tmp_path, monkeypatch, capfd):
    import cbir.tracking.runs

    monkeypatch.setattr(cbir.tracking.runs, "LOCK_ATTEMPTS", 1)  # one wait on SQLite's busy timeout, not eight
    database = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{database}", "cbir", artifact_root=str(tmp_path / "artifacts"))
    tracker.claim("job", {"config_hash": "c1"})
    out = tmp_path / "job"
    with (
        pytest.raises(cbir.tracking.runs.tracking_store.TrackingUnavailable) as caught,
        tracker.start("job", {"config_hash": "c1"}, {"p": 1}, files_in=out),
    ):
        holder = StoreHeldLocked(database)
        try:
            tracker.log_metrics({"micro/P_at_1": 0.5})  # the store is locked: not recorded ...
            out.mkdir()
            (out / "metrics.json").write_text("{}")  # ... and the job still writes its files
            tracker.log_artifact(out / "metrics.json")  # not tried again
        finally:
            holder.release()
    message = str(caught.value)
    assert "\n" not in message and f"sqlite:///{database} is locked by another process" in message
    assert message.endswith(f"this job's files are in {out}") and (out / "metrics.json").exists()
    assert "Traceback" not in capfd.readouterr().err  # MLflow logs one for each database error
    import mlflow

    assert mlflow.active_run() is None  # a next job in this process can start its run


# ---------------------------------------------------------------------------- concurrency
ONE_RUN = """
import os, sys, time
from pathlib import Path
from cbir.tracking.runs import Tracker
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
tracker = Tracker(sys.argv[1], "cbir")
with tracker.start("job", {"config_hash": f"c{os.getpid()}"}, {"p": 1}):
    tracker.log_metrics({"m": 1.0})
"""


@pytest.mark.slow
def test_processes_starting_together_on_a_new_store_all_succeed(tmp_path):
    uri, go = f"sqlite:///{tmp_path}/new/mlflow.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ONE_RUN, uri, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(4)  # all three are waiting at the start line with mlflow imported
    go.touch()
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    _, runs = all_runs(uri)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3


@pytest.mark.slow
def test_claim_marks_dead_runs_killed_and_waits_for_a_live_twin(tmp_path, monkeypatch):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "cbir")
    client, experiment_id = tracker.client(), tracker.experiment_id()
    parent = client.create_run(experiment_id).info.run_id
    monkeypatch.setenv(PARENT_ENV, parent)
    now = time.time()

    def twin(**process_tags) -> str:
        tags = {"config_hash": "same", "mlflow.parentRunId": parent, **{k: str(v) for k, v in process_tags.items()}}
        return client.create_run(experiment_id, tags=tags).info.run_id

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = process.hostname()
    dead = {
        "process gone": twin(**{process.HOST: here, process.PID: ended.stdout.strip()}),
        "pid reused": twin(**{process.HOST: here, process.PID: os.getpid(), process.PID_STARTED: "1"}),
        "silent elsewhere": twin(
            **{
                process.HOST: "node-elsewhere",
                process.PID: 7,
                process.HEARTBEAT: int(now - 2 * process.STALE_AFTER_SECONDS),
            }
        ),
    }
    live = twin(**{process.HOST: "node-elsewhere", process.PID: 7, process.HEARTBEAT: int(now)})
    assert process.is_alive(process.process_tags()) is True and process.is_alive({}) is None
    # the live twin finishes a few seconds later: the claim waits for it, then skips the job
    threading.Timer(3, client.set_terminated, [live, "FINISHED"]).start()
    done = tracker.claim("job", {"config_hash": "same"})
    assert done is not None and done.info.run_id == live
    for why, run_id in dead.items():
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", why
        assert run.data.tags["error"].startswith("KILLED: its process"), why
    _, runs = all_runs(tracker.uri)
    assert len(runs) == 5  # the parent and the four twins: no run created for the skipped job


@pytest.mark.slow
def test_two_identical_sweeps_at_once_run_each_job_once(tmp_path, shared_data_dir):
    sweep = ["-m", *SMALL, "encoder=baseline,random", f"paths.data_dir={shared_data_dir}"]
    finished = run_cbir_at_once(tmp_path, *sweep)
    assert [code for code, _ in finished] == [0, 0], "\n".join(out for _, out in finished)
    _, runs = all_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parents = [r for r in runs if r.data.tags.get("cbir.role") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["encoder"] for c in children) == ["baseline", "random"]  # each job once
    assert all(c.info.status == "FINISHED" for c in children)
    assert "\n".join(out for _, out in finished).count("skipping") == 2  # the other sweep's two jobs


# ---------------------------------------------------------------------------- killed runs
def start_and_stop_mid_extraction(cwd: Path, overrides: list[str], sig: int) -> tuple[int, str, int]:
    """Start a run, send `sig` once it has extracted 8 more rows; returns its exit code, its output and
    the rows done when the signal was sent."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log_file = cwd / f"run-{sig}.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cbir.run", *overrides], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.time() + 300
    start_rows = None
    while time.time() < deadline and proc.poll() is None:
        for done_file in (cwd / ".cache/cbir/embeddings").glob("*.partial/done.npy"):
            rows = int((np.load(done_file, mmap_mode="r") > 0).sum())
            start_rows = rows if start_rows is None else start_rows
            if rows >= start_rows + 8:
                proc.send_signal(sig)
                proc.wait(timeout=120)
                return proc.returncode, log_file.read_text(), rows
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"extraction was not caught mid-way:\n{log_file.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_a_dead_run_is_marked_on_resume(tmp_path, shared_data_dir):
    overrides = [
        *SMALL,
        f"paths.data_dir={shared_data_dir}",
        "encoder=resnet50",
        "encoder.pretrained=false",
        "encoder.input_size=128",
        "extract.batch_size=4",
    ]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    # SIGTERM (Slurm's time limit): exit 143, run KILLED, the rows extracted so far kept
    returncode, text, rows_at_term = start_and_stop_mid_extraction(tmp_path, overrides, signal.SIGTERM)
    assert returncode == 143, text[-3000:]
    assert "stopped by SIGTERM" in text
    _, (terminated,) = all_runs(uri)
    assert terminated.info.status == "KILLED" and terminated.data.tags["error"].startswith("Terminated")
    (done_file,) = (tmp_path / ".cache/cbir/embeddings").glob("*.partial/done.npy")
    kept = int((np.load(done_file) > 0).sum())
    assert rows_at_term <= kept < len(np.load(done_file))
    # SIGKILL: nothing can close the run, it stays RUNNING ...
    start_and_stop_mid_extraction(tmp_path, overrides, signal.SIGKILL)
    _, runs = all_runs(uri)
    (killed,) = [r for r in runs if r.info.run_id != terminated.info.run_id]
    assert killed.info.status == "RUNNING"
    # ... until the next run of the same config finds its process gone; extraction resumes
    resumed = run_cbir(tmp_path, *overrides)
    assert "resuming extraction" in output(resumed) and "marked KILLED" in output(resumed)
    client, runs = all_runs(uri)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(killed.info.run_id).data.tags["error"].startswith("KILLED: its process")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED", "KILLED"]
