"""Shared test setup: offline hub, headless plotting, helpers to run cbir as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# cbir honours these; tests use the default store in their own folder, never the user's server
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("CBIR_MLRUNS_DIR", None)

PROJECT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT / "conf"


@pytest.fixture(autouse=True)
def no_tracking_uri_left_behind():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: a store set by one in-process test must
    not receive the runs of a later test's cbir processes."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """One generated synthetic dataset for the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("data")


def run_cbir(
    cwd: Path,
    *overrides: str,
    module: str = "cbir.run",
    env: dict | None = None,
    check: bool = True,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """`python -m cbir.run <overrides>` in `cwd` (its mlruns/, outputs/ and caches land there)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cbir failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_cbir_at_once(cwd: Path, *args: str, copies: int = 2, timeout: int = 600) -> list[tuple[int, str]]:
    """`copies` processes of `python -m cbir.run <args>` started together in `cwd` (two jobs or sweeps
    racing for the same cache keys and runs); (return code, combined output) of each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cbir.run", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(copies)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def compose(*overrides: str, config_name: str = "config", hydra_node: bool = False):
    """The composed config, exactly as `python -m cbir.run <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=hydra_node)


def run_cbir_hang_guarded(
    cwd: Path, *overrides: str, module: str = "cbir.run", timeout: int = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """run_cbir(check=False) for a case that once hung: in its own process group, and on timeout the
    whole group (loader workers included) is killed and the test fails. The timeout guards against
    a hang; it is not a speed limit (such a run takes seconds)."""
    import signal

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"python -m {module} did not finish within {timeout} s (hung):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
