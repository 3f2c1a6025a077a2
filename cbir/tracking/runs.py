"""MLflow tracking: one run per job; its params are a curated part of the resolved config
(cbir.tracking.dashboard), the whole of it is an artifact.

The store (SQLite under `tracking.dir` by default, or a server) is checked, located and locked in
`cbir.tracking.store`; the process behind each run (host, pid, heartbeat, SIGTERM) in `cbir.tracking.process`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cbir.tracking import process
from cbir.tracking import store as tracking_store
from cbir.tracking.store import resolve_uri  # noqa: F401  (kept importable from here)

log = logging.getLogger(__name__)
# a locked SQLite file: MLflow logs a traceback on every retry (as cbir.common.console.quiet() also says)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# Set by the sweep callback in the launching process; inherited by every job process
# (basic, joblib and Slurm launchers alike), it makes each job a child of the sweep's run.
PARENT_ENV = "CBIR_PARENT_RUN_ID"

# keys that change how a run looks or where it logs, not what it computes
COSMETIC_KEYS = (
    "extract.progress",
    "extract.num_workers",
    "extract.shared_pass",
    "extract.group_size",
    "extract.group_memory_gb",
    "tracking",
    "eval.search_batch_size",
    "paths.cache_dir",
    "dataset.cache_dir",
    "dataset.rebuild",
    "dataset.parts.*.cache_dir",
    "dataset.parts.*.rebuild",
)
MAX_PARAM_LENGTH = 6000


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists become their JSON text.

    Not pandas.json_normalize: it leaves lists as objects and drops empty dicts, so it would need
    this same pass over its result (MLflow params are text; the config hash must see every key)."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            else:
                out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig) -> str:
    """Hash of what a run computes: the resolved config minus cosmetic keys."""
    flat = flatten(resolved(cfg))
    kept = {
        k: v
        for k, v in flat.items()
        if not any(fnmatch.fnmatchcase(k, c) or fnmatch.fnmatchcase(k, c + ".*") for c in COSMETIC_KEYS)
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


WAIT_SECONDS = 2  # how often a job waiting for an identical running job looks again


LOCK_ATTEMPTS = 8  # tries of a store write while SQLite reports it locked (each waits MLflow's 20 s busy timeout)


def retry_locked(fn, *args, attempts: int | None = None, **kwargs):
    """Call fn, retrying while a parallel job holds the SQLite write lock. A server that stopped
    answering (after MLflow's own retries) becomes one clear TrackingUnavailable error.

    Creating the store, experiments and runs is serialised by the store's file lock
    (cbir.tracking.store); this covers the writes that stay concurrent (metrics, tags). Not
    tenacity: it would replace only the loop, while the decision stays this text test, because
    MLflow and SQLAlchemy wrap SQLite's "database is locked" in different exception types."""
    attempts = attempts or LOCK_ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy/mlflow wrap the sqlite error in several types
            text = str(e)
            if _connection_failed(text):
                raise _unavailable(text) from None
            if "locked" not in text.lower():
                raise
            if attempt == attempts - 1:
                raise _still_locked() from None
            time.sleep(0.2 * 2**attempt)


def _connection_failed(text: str) -> bool:
    return "Max retries exceeded" in text or "Connection refused" in text


def _unavailable(text: str) -> tracking_store.TrackingUnavailable:
    import mlflow

    reason = "connection refused" if "refused" in text.lower() else "no answer"
    return tracking_store.TrackingUnavailable(
        f"MLflow server {tracking_store.shown(mlflow.get_tracking_uri())} stopped answering ({reason}); "
        "the embeddings computed so far are kept: start the server again and re-run the same command"
    )


def _still_locked() -> tracking_store.TrackingUnavailable:
    import mlflow

    return tracking_store.TrackingUnavailable(
        f"MLflow store {tracking_store.shown(mlflow.get_tracking_uri())} {tracking_store.LOCKED}; close it "
        "and run the same command again (finished jobs are skipped, extracted embeddings kept)"
    )


class Tracker:
    """A thin layer over MLflow; `enabled=False` turns every call into a no-op."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: str | None = None,
        run_name: str | None = None,
        enabled: bool = True,
        lock_dir: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.artifact_root = tracking_store.artifact_root(self.uri, artifact_root)
        self.run_name = run_name
        self.lock_dir = lock_dir
        self.run_id: str | None = None
        self.lost: tracking_store.TrackingUnavailable | None = None  # the store failed during the run
        self._claimed = False
        self._experiment_id: str | None = None
        database = tracking_store.sqlite_path(self.uri)
        if enabled and database is not None:
            try:
                database.parent.mkdir(parents=True, exist_ok=True)  # SQLite will not create it
            except OSError:
                pass  # reported in one line by tracking_store.check_uri

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Tracker:
        t = cfg.tracking
        return cls(
            uri=t.uri,
            experiment=t.experiment,
            artifact_root=t.get("artifact_root"),
            run_name=t.get("run_name"),
            enabled=bool(t.enabled),
            lock_dir=OmegaConf.select(cfg, "paths.cache_dir"),
        )

    def describe(self) -> str:
        """The store for the first lines of a run or sweep: URI, experiment and where artifacts go."""
        where = f", artifacts in {self.artifact_root}" if self.artifact_root else ""
        return f"MLflow store {tracking_store.shown(self.uri)}, experiment {self.experiment}{where}"

    def lock(self):
        return tracking_store.store_lock(self.uri, self.lock_dir)

    def client(self):
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)  # the store a failure message names
        with self.lock():  # the first client of a process opens the store: on a new SQLite file, creates it
            return retry_locked(MlflowClient, self.uri)

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            with self.lock():  # the first call on a new SQLite file creates its schema
                self._experiment_id = retry_locked(
                    tracking_store.experiment_id, self.client(), self.experiment, self.artifact_root, self.uri
                )
        return self._experiment_id

    def claim(self, run_name: str, tags: dict[str, Any], skip_finished: bool = True) -> Any:
        """Create this job's run, or return the FINISHED run of the same config under the same sweep
        parent (`skip_finished`: the caller skips the job). Under the store lock: RUNNING runs of this
        config whose process is gone are marked KILLED first, and while an identical job of the same
        sweep is still running (two identical sweeps at once), this one waits for it instead of
        running it a second time."""
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        client, experiment_id = self.client(), self.experiment_id()
        parent = os.environ.get(PARENT_ENV)
        config = tags.get("config_hash")  # None: a run that is not a job (the benchmark)
        announced = None
        while True:
            with self.lock():
                running = self._mark_dead_runs(client, experiment_id, str(config)) if config else []
                busy = []
                if parent and skip_finished and config:
                    done = self.finished_run(config)
                    if done is not None:
                        return done
                    busy = [
                        r
                        for r in running
                        if r.data.tags.get("mlflow.parentRunId") == parent and process.is_alive(r.data.tags)
                    ]
                if not busy:
                    self.run_id = self._create_run(client, experiment_id, run_name, tags, parent)
                    self._claimed = True
                    return None
            if announced != busy[0].info.run_id:
                announced = busy[0].info.run_id
                log.info(
                    "waiting for run %s (%s), which computes the same config, to end",
                    announced,
                    process.describe(busy[0].data.tags),
                )
            time.sleep(WAIT_SECONDS)

    def _mark_dead_runs(self, client, experiment_id: str, config: str) -> list:
        """Mark RUNNING runs of this config whose process is gone as KILLED; return the others."""
        runs = retry_locked(
            client.search_runs,
            [experiment_id],
            max_results=1000,
            filter_string=f"tags.config_hash = '{config}' and attributes.status = 'RUNNING'",
        )
        alive = []
        for run in runs:
            if process.is_alive(run.data.tags) is not False:
                alive.append(run)
                continue
            reason = (
                f"its process ({process.describe(run.data.tags)}) had ended without closing the run; "
                f"found by {process.hostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S')}"
            )
            retry_locked(client.set_tag, run.info.run_id, "error", f"KILLED: {reason}")
            retry_locked(client.set_terminated, run.info.run_id, status="KILLED")
            log.warning("run %s was still RUNNING but %s: marked KILLED", run.info.run_id, reason)
        return alive

    def _create_run(self, client, experiment_id: str, run_name: str, tags: dict[str, Any], parent: str | None) -> str:
        from mlflow.tracking.context import registry

        tags = {k: str(v) for k, v in tags.items() if v is not None}
        tags.update(process.process_tags())
        if parent:
            tags["mlflow.parentRunId"] = parent
        tags = registry.resolve_tags(tags)  # source, user, ... as mlflow.start_run would add
        run = retry_locked(client.create_run, experiment_id, run_name=self.run_name or run_name, tags=tags)
        return run.info.run_id

    @contextmanager
    def start(self, run_name: str, tags: dict[str, Any], params: dict[str, Any], files_in: Path | None = None):
        """The run claimed by `claim` (claimed now if it was not), active for the body. It ends
        FINISHED, FAILED (with the error as its `error` tag) or KILLED (SIGTERM, Ctrl-C, the
        scheduler's time limit). A store that stops working during the body is reported at its end,
        naming `files_in`, the folder the job wrote its files to."""
        if not self.enabled:
            yield self
            return
        import mlflow

        if not self._claimed:
            self.claim(run_name, tags, skip_finished=False)
        self._claimed = False
        mlflow.set_tracking_uri(self.uri)
        retry_locked(mlflow.start_run, run_id=self.run_id)
        heartbeat = process.Heartbeat(self.uri, self.run_id)
        self.lost = None
        try:
            if params:
                self.log_params(params)
            yield self
            if self.lost is not None:  # the job's files are written: now report the store
                raise self._lost_with(files_in)
        except BaseException as e:
            status = "KILLED" if process.stopped_from_outside(e) else "FAILED"
            try:
                if self.lost is None:
                    mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
                mlflow.end_run(status)  # also leaves the run in this process, should the store not answer
            except Exception as end_error:  # e.g. the server is gone: report the original error
                log.warning("could not mark run %s %s: %s", self.run_id, status, _short_reason(str(end_error)))
            raise
        else:
            self._record(_end_run, self.run_id, "FINISHED")
            if self.lost is not None:
                raise self._lost_with(files_in)
        finally:
            heartbeat.stop()

    def _lost_with(self, files_in: Path | None) -> tracking_store.TrackingUnavailable:
        where = f"; this job's files are in {files_in}" if files_in else ""
        return tracking_store.TrackingUnavailable(f"{self.lost}{where}")

    def _record(self, fn, *args, **kwargs) -> None:
        """A write to the store during the run. If the store stops working (a server gone, a SQLite
        file held locked), the job goes on without recording and writes its files; the run then
        ends with the store's error (Tracker.start)."""
        if self.lost is not None:
            return
        try:
            retry_locked(fn, *args, **kwargs)
        except tracking_store.TrackingUnavailable as e:
            self.lost = e
            log.warning("%s (recording stops here; the job goes on and writes its files)", e)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import math

            import mlflow

            finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            self._record(mlflow.log_metrics, finite, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            self._record(mlflow.log_params, {k: _param_value(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            self._record(mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            p = Path(path)
            if p.is_dir():
                self._record(mlflow.log_artifacts, str(p), artifact_path)
            elif p.exists():
                self._record(mlflow.log_artifact, str(p), artifact_path)

    def log_dataset(self, manifest, name: str, folder: Path) -> None:
        """The manifest as an MLflow dataset input (with its content digest) plus class counts."""
        from cbir.data.stats import dataset_summary, mlflow_dataset

        summary = dataset_summary(manifest)
        self.log_params(
            {
                "dataset_info.rows": summary["rows"],
                "dataset_info.classes": summary["classes"],
                "dataset_info.digest": summary["digest"],
            }
        )
        self.log_metrics({f"dataset/{split}_rows": n for split, n in summary["split_counts"].items()})
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("class_counts", "modality_counts", "dataset_counts"):
            summary[key].to_csv(folder / f"{key}.csv", index=False)
        self.log_artifact(folder, "dataset")
        if self.enabled:
            import mlflow

            self._record(mlflow.log_input, mlflow_dataset(manifest, name), context="retrieval")

    def finished_run(self, config_hash: str) -> Any:
        """A FINISHED run of this config under the current sweep parent, if any (resume)."""
        parent = os.environ.get(PARENT_ENV)
        if not self.enabled or not parent:
            return None
        client = self.client()
        runs = retry_locked(
            client.search_runs,
            [self.experiment_id()],
            filter_string=(
                f"tags.config_hash = '{config_hash}' and tags.`mlflow.parentRunId` = '{parent}' "
                "and attributes.status = 'FINISHED'"
            ),
            max_results=1,
        )
        return runs[0] if runs else None


def _end_run(run_id: str, status: str) -> None:
    """mlflow.end_run, retried: it leaves the run in this process before it writes the status, so a
    retry after a failed write sets the status directly."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_terminated(run_id, status)


def _short_reason(text: str) -> str:
    if _connection_failed(text):
        return "the server stopped answering"
    return "the store is locked" if "locked" in text.lower() else text.splitlines()[0][:300] if text else "?"


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
