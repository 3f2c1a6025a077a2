"""MLflow tracking: one run per job, params = the flattened resolved config.

The default store is SQLite (`sqlite:///mlruns/mlflow.db`) with artifacts under
`mlruns/artifacts`; `tracking.uri` may name an MLflow server instead.
"""

from __future__ import annotations

import atexit
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

log = logging.getLogger(__name__)

# Set by the sweep callback in the launching process; inherited by every job process
# (basic, joblib and Slurm launchers alike), it makes each job a child of the sweep's run.
PARENT_ENV = "CBIR_PARENT_RUN_ID"

# keys that change how a run looks or where it logs, not what it computes
COSMETIC_KEYS = ("extract.progress", "extract.num_workers", "extract.shared_pass", "extract.group_size",
                 "extract.group_memory_gb", "tracking", "eval.search_batch_size", "paths.cache_dir",
                 "dataset.cache_dir", "dataset.rebuild", "dataset.parts.*.cache_dir", "dataset.parts.*.rebuild")
MAX_PARAM_LENGTH = 6000


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists become their JSON text."""
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
    kept = {k: v for k, v in flat.items()
            if not any(fnmatch.fnmatchcase(k, c) or fnmatch.fnmatchcase(k, c + ".*") for c in COSMETIC_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_uri(uri: str) -> str:
    """Make a relative SQLite URI absolute and create its folder (SQLite won't)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def retry_locked(fn, *args, attempts: int = 8, **kwargs):
    """Call fn, retrying while a parallel job holds the SQLite write lock."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy/mlflow wrap the sqlite error in several types
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


class Tracker:
    """A thin layer over MLflow; `enabled=False` turns every call into a no-op."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None,
                 run_name: str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.run_name = run_name
        self.run_id: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Tracker":
        t = cfg.tracking
        return cls(uri=t.uri, experiment=t.experiment, artifact_root=t.get("artifact_root"),
                   run_name=t.get("run_name"), enabled=bool(t.enabled))

    def experiment_id(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        existing = mlflow.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        location = None
        if self.artifact_root and self.uri.startswith("sqlite:"):
            location = (Path(self.artifact_root).resolve()).as_uri()
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # created meanwhile by a parallel job
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    @contextmanager
    def start(self, run_name: str, tags: dict[str, Any], params: dict[str, Any]):
        if not self.enabled:
            yield self
            return
        import mlflow

        experiment_id = retry_locked(self.experiment_id)
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        if os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        run = retry_locked(mlflow.start_run, experiment_id=experiment_id,
                           run_name=self.run_name or run_name, tags=tags)
        with run:
            self.run_id = run.info.run_id
            self.log_params(params)
            try:
                yield self
            except BaseException as e:  # the run context marks the run FAILED; say why
                mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
                raise

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import math

            import mlflow

            finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            retry_locked(mlflow.log_metrics, finite, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            retry_locked(mlflow.log_params, {k: _param_value(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            retry_locked(mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            p = Path(path)
            if p.is_dir():
                retry_locked(mlflow.log_artifacts, str(p), artifact_path)
            elif p.exists():
                retry_locked(mlflow.log_artifact, str(p), artifact_path)

    def log_dataset(self, manifest, name: str, folder: Path) -> None:
        """The manifest as an MLflow dataset input (with its content digest) plus class counts."""
        from cbir.data.stats import dataset_summary, mlflow_dataset

        summary = dataset_summary(manifest)
        self.log_params({"dataset_info.rows": summary["rows"], "dataset_info.classes": summary["classes"],
                         "dataset_info.digest": summary["digest"]})
        self.log_metrics({f"dataset/{split}_rows": n for split, n in summary["split_counts"].items()})
        folder.mkdir(parents=True, exist_ok=True)
        for key in ("class_counts", "modality_counts", "dataset_counts"):
            summary[key].to_csv(folder / f"{key}.csv", index=False)
        self.log_artifact(folder, "dataset")
        if self.enabled:
            import mlflow

            retry_locked(mlflow.log_input, mlflow_dataset(manifest, name), context="retrieval")

    def finished_run(self, config_hash: str) -> Any:
        """A FINISHED run of this config under the current sweep parent, if any (resume)."""
        parent = os.environ.get(PARENT_ENV)
        if not self.enabled or not parent:
            return None
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        runs = retry_locked(
            client.search_runs, [retry_locked(self.experiment_id)],
            filter_string=(f"tags.config_hash = '{config_hash}' and tags.`mlflow.parentRunId` = '{parent}' "
                           "and attributes.status = 'FINISHED'"),
            max_results=1,
        )
        return runs[0] if runs else None


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


# ------------------------------------------------------------------------------ sweeps
def sweep_key(config: DictConfig) -> str:
    """Identity of a sweep: its command-line overrides and sweeper parameters. Running the
    same command again finds the same parent run, so an interrupted sweep resumes under it."""
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    blob = json.dumps({"task": task, "params": params, "experiment": config.tracking.experiment}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def children_table(client, parent_id: str, experiment_id: str):
    """One row per FINISHED child of a sweep: its tags and final metric values."""
    import pandas as pd

    runs = retry_locked(client.search_runs, [experiment_id],
                        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'",
                        max_results=5000)
    rows = []
    for run in runs:
        tags = run.data.tags
        rows.append({"run_id": run.info.run_id, "encoder": tags.get("encoder"), "dataset": tags.get("dataset"),
                     "index_type": tags.get("index_type"), "per_class": tags.get("per_class"),
                     "config_hash": tags.get("config_hash"), **run.data.metrics})
    return pd.DataFrame(rows)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; keeps the module importable
    _HydraCallback = object


class SweepCallback(_HydraCallback):
    """Hydra callback: one MLflow parent run per multirun, created before any job starts.

    Jobs (in this process or others) attach to it through the `CBIR_PARENT_RUN_ID`
    environment variable. At the end the parent gets the saturation curves (P@N against
    index size per encoder) as stepped metrics, a figure and a CSV. If the sweep stops on a
    failed job, the parent is still finalised (FAILED) with what finished."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.finished = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        from mlflow.tracking import MlflowClient

        tracker = Tracker.from_config(config)
        # creating the SQLite schema here, once, avoids parallel jobs racing on its migration
        experiment_id = retry_locked(tracker.experiment_id)
        client = MlflowClient(tracker.uri)
        key = sweep_key(config)
        existing = retry_locked(client.search_runs, [experiment_id],
                                filter_string=f"tags.`cbir.sweep_key` = '{key}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task, resolve=False)) or "(preset)"
        if existing:
            self.parent_id = existing[0].info.run_id
            retry_locked(client.update_run, self.parent_id, status="RUNNING")
            log.info("resuming sweep %s (parent run %s)", overrides, self.parent_id)
        else:
            run = retry_locked(client.create_run, experiment_id, run_name=f"sweep {overrides}"[:240],
                               tags={"cbir.sweep_key": key, "cbir.role": "sweep", "sweep.overrides": overrides,
                                     "git_commit": git_commit() or ""})
            self.parent_id = run.info.run_id
            log.info("sweep parent run %s", self.parent_id)
        self.tracker, self.client, self.experiment_id = tracker, client, experiment_id
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.ns = list(config.eval.n)
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self._finish, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish("FINISHED")

    def _finish(self, status: str) -> None:
        if self.parent_id is None or self.finished:
            return
        self.finished = True
        os.environ.pop(PARENT_ENV, None)
        try:
            from cbir import reporting

            children = children_table(self.client, self.parent_id, self.experiment_id)
            # a resumed sweep with nothing new would log every curve point a second time
            logged_for = hashlib.sha256(" ".join(sorted(children.get("run_id", []))).encode()).hexdigest()[:16]
            previous = retry_locked(self.client.get_run, self.parent_id).data.tags.get("cbir.curves_of")
            if len(children) and logged_for != previous:
                curves = reporting.saturation_frame(children, self.ns)
                if len(curves):  # none when no child ran retrieval
                    self._log_curves(curves)
                retry_locked(self.client.set_tag, self.parent_id, "cbir.curves_of", logged_for)
        finally:
            retry_locked(self.client.set_terminated, self.parent_id, status=status)

    def _log_curves(self, curves) -> None:
        from mlflow.entities import Metric

        from cbir import reporting

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(f"saturation/{row.group}/{name}", float(row[name]), stamp, int(row.step))
            for _, row in curves.iterrows() for name in reporting.curve_metric_names(self.ns)
            if row[name] == row[name]
        ]
        for start in range(0, len(metrics), 1000):
            retry_locked(self.client.log_batch, self.parent_id, metrics=metrics[start:start + 1000])
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        csv, png = self.sweep_dir / "saturation.csv", self.sweep_dir / "saturation.png"
        curves.to_csv(csv, index=False)
        reporting.plot_saturation(curves, png, self.ns)
        for path in (csv, png):
            retry_locked(self.client.log_artifact, self.parent_id, str(path))
