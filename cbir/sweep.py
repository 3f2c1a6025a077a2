"""Sweeps: one MLflow parent run per multirun, created before any job starts, finalised with the
saturation curves when the sweep ends. Jobs attach to it through the environment (`PARENT_ENV`),
whichever launcher starts them (in-process, joblib workers, submitit, Slurm)."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cbir import process, tracking_store
from cbir.tracking import PARENT_ENV, Tracker, git_commit, retry_locked

log = logging.getLogger(__name__)

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
        import mlflow

        from cbir.checks import ConfigError

        tracker = Tracker.from_config(config)
        try:
            tracking_store.check_uri(tracker.uri, tracker.artifact_root)
        except ConfigError as e:
            log.error("%s", e)
            sys.exit(2)
        mlflow.set_tracking_uri(tracker.uri)
        log.info("MLflow store %s, experiment %s", tracking_store.shown(tracker.uri), tracker.experiment)
        experiment_id = tracker.experiment_id()  # creates a new SQLite store once, before any job
        client = tracker.client()
        key = sweep_key(config)
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task, resolve=False)) or "(preset)"
        with tracker.lock():  # two identical sweeps started at once share one parent
            existing = retry_locked(client.search_runs, [experiment_id],
                                    filter_string=f"tags.`cbir.sweep_key` = '{key}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
            if existing:
                self.parent_id = existing[0].info.run_id
                retry_locked(client.update_run, self.parent_id, status="RUNNING")
                log.info("resuming sweep %s (parent run %s)", overrides, self.parent_id)
            else:
                run = retry_locked(client.create_run, experiment_id, run_name=f"sweep {overrides}"[:240],
                                   tags={"cbir.sweep_key": key, "cbir.role": "sweep", "sweep.overrides": overrides,
                                         "git_commit": git_commit() or "", **process.process_tags()})
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
        if status == "FAILED" and process.terminated():
            status = "KILLED"
        try:
            from cbir import reporting

            with self.tracker.lock():  # two identical sweeps ending together log the curves once
                children = children_table(self.client, self.parent_id, self.experiment_id)
                # a resumed sweep with nothing new would log every curve point a second time
                logged_for = hashlib.sha256(" ".join(sorted(children.get("run_id", []))).encode()).hexdigest()[:16]
                previous = retry_locked(self.client.get_run, self.parent_id).data.tags.get("cbir.curves_of")
                if len(children) and logged_for != previous:
                    curves = reporting.saturation_frame(children, self.ns)
                    if len(curves):  # none when no child ran retrieval
                        self._log_curves(curves)
                    retry_locked(self.client.set_tag, self.parent_id, "cbir.curves_of", logged_for)
            retry_locked(self.client.set_terminated, self.parent_id, status=status)
        except Exception as e:  # e.g. the server went away: say so in one line, the re-run completes it
            log.error("could not finalise sweep parent run %s: %s", self.parent_id, str(e)[:500])

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
