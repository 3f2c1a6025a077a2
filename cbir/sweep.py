"""The sweep's Hydra callbacks. `SweepCallback`: one MLflow parent run per multirun, created
before any job starts, finalised with the saturation curves when the sweep ends; jobs attach to it
through the environment (`PARENT_ENV`), whichever launcher starts them (in-process, joblib workers,
submitit, Slurm). `SweepSummary`: the table across jobs and the parent's comparison (the content
comes from cbir.dashboard)."""

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

from cbir import comparisons, dashboard, process, tracking_store
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

    runs = retry_locked(
        client.search_runs,
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    rows = []
    for run in runs:
        tags = run.data.tags
        rows.append(
            {
                "run_id": run.info.run_id,
                "encoder": tags.get("encoder"),
                "dataset": tags.get("dataset"),
                "index_type": tags.get("index_type"),
                "per_class": tags.get("per_class"),
                "labels": tags.get("labels") or "single",
                "config_hash": tags.get("config_hash"),
                **run.data.metrics,
            }
        )
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
        log.info("%s", tracker.describe())
        experiment_id = tracker.experiment_id()  # creates a new SQLite store once, before any job
        client = tracker.client()
        key = sweep_key(config)
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task, resolve=False)) or "(preset)"
        with tracker.lock():  # two identical sweeps started at once share one parent
            existing = retry_locked(
                client.search_runs,
                [experiment_id],
                filter_string=f"tags.`cbir.sweep_key` = '{key}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if existing:
                self.parent_id = existing[0].info.run_id
                retry_locked(client.update_run, self.parent_id, status="RUNNING")
                log.info("resuming sweep %s (parent run %s)", overrides, self.parent_id)
            else:
                run = retry_locked(
                    client.create_run,
                    experiment_id,
                    run_name=f"sweep {overrides}"[:240],
                    tags={
                        "cbir.sweep_key": key,
                        "cbir.role": "sweep",
                        "sweep.overrides": overrides,
                        "git_commit": git_commit() or "",
                        **process.process_tags(),
                    },
                )
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
                    # none when no child ran retrieval; one index size is a point, not a curve
                    if len(curves) and curves["per_class"].astype(str).nunique() > 1:
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
            for _, row in curves.iterrows()
            for name in reporting.curve_metric_names(self.ns)
            if row[name] == row[name]
        ]
        for start in range(0, len(metrics), 1000):
            retry_locked(self.client.log_batch, self.parent_id, metrics=metrics[start : start + 1000])
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        csv, png = self.sweep_dir / "saturation.csv", self.sweep_dir / "saturation.png"
        curves.to_csv(csv, index=False)
        reporting.plot_saturation(curves, png, self.ns)
        for path in (csv, png):
            retry_locked(self.client.log_artifact, self.parent_id, str(path))


class SweepSummary(_HydraCallback):
    """Hydra callback (listed after cbir.sweep.SweepCallback, whose parent run it uses):
    names the swept keys for the jobs' run names; when the sweep ends, or stops on a failed
    job, prints one table across jobs and where to look next, and puts the comparison table
    and figure on the parent run."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.done = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import atexit

        from cbir import tracking

        os.environ[dashboard.SWEPT_KEYS_ENV] = ",".join(dashboard.swept_keys(config))
        self.parent_id = os.environ.get(tracking.PARENT_ENV) if config.tracking.enabled else None
        if not self.parent_id:
            return
        from mlflow.tracking import MlflowClient

        self.started_ms = int(time.time() * 1000)
        self.tracker = tracking.Tracker.from_config(config)
        self.client = MlflowClient(self.tracker.uri)
        self.experiment_id = tracking.retry_locked(self.tracker.experiment_id)
        dashboard.tag_experiment(self.client, self.experiment_id)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.ns = list(config.eval.n)
        self.ci = comparisons.ci_settings(config)
        atexit.register(self.finish)  # runs before SweepCallback's (atexit is last-in, first-out)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish()

    def finish(self) -> None:
        if self.done or not self.parent_id:
            return
        self.done = True
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped or a log file: no need to squeeze the table into 80 columns
            console = Console(width=max(console.width, 190))  # 190: metric cells carry intervals
        try:
            jobs = dashboard.sweep_jobs(self.client, self.parent_id, self.experiment_id, self.started_ms)
            if jobs.empty:
                console.print("[yellow]no job of this sweep started a run; see the errors above[/]")
                return
            pairs, verdicts = compare_jobs(self.client, jobs, self.ci, self.sweep_dir)
            if dashboard.classification_columns(jobs) and not console.is_terminal:  # task=all: 4 more columns
                console = Console(width=max(console.width, 250))
            console.print(dashboard.console_table(jobs, f"sweep: {len(jobs)} jobs"))
            for line in comparisons.summary_lines(verdicts) if len(verdicts) else []:
                console.print(line, highlight=False)
            for _, failed in jobs[jobs["status"] == "FAILED"].iterrows():
                console.print(f"[red]{failed['run']}[/]: {failed['error'][:300]}")
            files = dashboard.log_parent(self.client, self.parent_id, jobs, self.sweep_dir, self.ns, pairs, verdicts)
            write_summary_log(jobs, self.sweep_dir)
            files.update(
                write_comparison_page(self.client, self.tracker, self.parent_id, self.ns, verdicts, self.sweep_dir)
            )
        except Exception as e:  # the summary must not hide the sweep's own outcome
            log.warning("sweep summary incomplete: %s", e)
            files = {}
        has_page = comparison_page_name() in files
        start_ui, page = dashboard.ui_address(
            self.tracker.uri, self.experiment_id, self.parent_id, comparison_page_name() if has_page else None
        )
        _, runs_table = dashboard.ui_address(self.tracker.uri, self.experiment_id)
        lines = [
            f"Parent run  {self.parent_id}  (experiment '{self.tracker.experiment}')",
            f"Job files   {self.sweep_dir.resolve()}/<job number>/ (run.log, metrics.json, per_class.csv, ...)",
            *([f"Comparison  {', '.join(str(p.resolve()) for p in files.values())}"] if files else []),
            f"Report      python -m cbir.report report.runs={self.parent_id}",
            *([f"Dashboard   {start_ui}"] if start_ui else []),
            f"            then open {page}" + ("  (the comparison page)" if has_page else ""),
            f"            runs table, best micro P@1 first: {runs_table}",
        ]
        console.print("\n".join(lines), highlight=False, soft_wrap=True)


def compare_jobs(client, jobs, settings, folder: Path):
    """Paired comparisons of the jobs (cbir.comparisons); adds the `tied for best` column to jobs.
    A failure here is one warning: the table and the parent run still get everything else."""
    import tempfile

    import pandas as pd

    try:
        with tempfile.TemporaryDirectory(prefix="cbir-records-") as downloads:  # records are read into memory
            pairs, verdicts = comparisons.for_jobs(client, jobs, settings, Path(downloads))
    except Exception as e:
        log.warning("paired comparisons skipped: %s", str(e)[:300])
        return pd.DataFrame(), pd.DataFrame()
    if len(verdicts):
        jobs["tied for best"] = jobs["run"].map(comparisons.tied_labels(verdicts)).fillna("")
    return pairs, verdicts


def write_summary_log(jobs, folder: Path) -> Path:
    """The across-jobs table as plain text next to the job folders (sweep_summary.txt)."""
    from rich.console import Console

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep_summary.txt"
    with path.open("w") as f:
        width = 250 if dashboard.classification_columns(jobs) else 190  # task=all: 4 more columns
        Console(file=f, width=width, color_system=None).print(dashboard.console_table(jobs, f"sweep: {len(jobs)} jobs"))
    return path


def comparison_page_name() -> str:
    from cbir.comparison_page import PAGE_NAME

    return PAGE_NAME


def write_comparison_page(client, tracker, parent_id: str, ns, verdicts, folder: Path) -> dict[str, Path]:
    """comparison.html next to the sweep's files and on the parent run (cbir.comparison_page)."""
    from cbir import comparison_page, report

    runs, _ = report.load_runs(tracker, parent_id, None)
    if runs.empty:
        return {}
    tied = comparisons.tied_labels(verdicts) if len(verdicts) else None
    path = comparison_page.write_page(
        runs,
        ns,
        folder / comparison_page.PAGE_NAME,
        f"cbir sweep {parent_id}: which encoder wins",
        tied,
        comparison_page.per_class_tables(client, runs),
    )
    retry_locked(client.log_artifact, parent_id, str(path))
    return {comparison_page.PAGE_NAME: path}
