"""The process behind an MLflow run: who runs it, whether it still lives, and how it stops.

Every job's run is tagged with its host, pid and the pid's start time (so a reused pid is not
mistaken for it), and a heartbeat refreshed every minute. A RUNNING run counts as dead when, on
this host, its process is gone, or, on another host, its heartbeat is older than
STALE_AFTER_SECONDS. SIGTERM (Slurm at its time limit, `kill`) raises `Terminated` in the job, so
the run ends as KILLED and the partial embedding cache stays for the re-run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST, PID, PID_STARTED, HEARTBEAT = "cbir.host", "cbir.pid", "cbir.pid_started", "cbir.heartbeat"
HEARTBEAT_SECONDS = 60
STALE_AFTER_SECONDS = 600


def hostname() -> str:
    return socket.gethostname()


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def pid_started(pid: int) -> str | None:
    """When the process started (clock ticks since boot; Linux), to tell a reused pid apart."""
    fields = _stat(pid)
    return fields[19] if fields else None


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {HOST: hostname(), PID: str(pid), PID_STARTED: pid_started(pid) or "", HEARTBEAT: str(int(time.time()))}


def describe(tags: dict[str, Any]) -> str:
    return f"host {tags.get(HOST)}, pid {tags.get(PID)}"


def is_alive(tags: dict[str, Any], now: float | None = None) -> bool | None:
    """Whether the process that runs a run still lives; None when the run has no process tags."""
    host, pid = tags.get(HOST), tags.get(PID)
    if not host or not pid:
        return None
    if host == hostname():
        pid = int(pid)
        if Path("/proc/self/stat").exists():
            fields = _stat(pid)
            if fields is None or fields[0] == "Z":  # gone, or a zombie waiting for its parent
                return False
            return not tags.get(PID_STARTED) or fields[19] == tags[PID_STARTED]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    beat = tags.get(HEARTBEAT)
    return beat is not None and (now or time.time()) - float(beat) < STALE_AFTER_SECONDS


class Heartbeat:
    """Refreshes a run's heartbeat tag from a daemon thread, so that jobs on other hosts can
    tell a live run from one whose node died. Failures are only logged: never stop the job."""

    def __init__(self, uri: str, run_id: str, every: float = HEARTBEAT_SECONDS) -> None:
        self.uri, self.run_id, self.every = uri, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cbir-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from mlflow.tracking import MlflowClient

        client = None
        while not self._stop.wait(self.every):
            try:
                client = client or MlflowClient(self.uri)  # opening the store may fail too (locked)
                client.set_tag(self.run_id, HEARTBEAT, str(int(time.time())))
            except Exception as e:  # a busy or unreachable store: the next beat may pass
                log.debug("heartbeat of run %s failed: %s", self.run_id, e)

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------ SIGTERM
class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so no `except Exception` stops it
    from unwinding the job (context managers end the run as KILLED, locks are released)."""


_terminated = False


def handle_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in this (main) thread."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum, frame):
        global _terminated
        if _terminated:  # a second SIGTERM while unwinding: let the first one finish
            return
        _terminated = True
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_sigterm)


def terminated() -> bool:
    return _terminated


def stopped_from_outside(error: BaseException) -> bool:
    """A signal, Ctrl-C or the scheduler (submitit's time-out handling) ended the job, rather
    than an error of its own: its run is KILLED, not FAILED."""
    return (
        _terminated
        or isinstance(error, (Terminated, KeyboardInterrupt, SystemExit))
        or type(error).__name__ == "UncompletedJobError"
    )
