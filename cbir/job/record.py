"""Record: the only step of a job that talks to MLflow.

The plan step opens the store (a store that cannot be used fails there, before any work) and asks
whether the job already finished in this sweep; `Record.open` claims the job's run (an identical job
still running is waited for) and keeps it RUNNING while the job embeds and evaluates. The steps hand
their outcomes to `Record.add`; the run gets them all at its end, each logged the same way, also when
a step fails (nothing computed is lost), and ends FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from cbir.evaluate.outcome import Outcome
from cbir.tracking import dashboard
from cbir.tracking import runs as tracking
from cbir.tracking import store as tracking_store

log = logging.getLogger("cbir.run")


class Record:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.tracker = tracking.Tracker.from_config(cfg)
        self.outcomes: list[Outcome] = []

    @property
    def enabled(self) -> bool:
        return self.tracker.enabled

    def describe(self) -> str:
        return self.tracker.describe()

    def finished_earlier(self, run_name: str, config_hash: str) -> bool:
        """The job already FINISHED in this sweep (a re-run of the sweep skips it)."""
        return skipped(run_name, self.tracker.finished_run(config_hash))

    def claim(self, run_name: str, tags: dict, skip_finished: bool) -> bool:
        """Create the job's run; True when an identical job finished it meanwhile (skip this one)."""
        return skipped(run_name, self.tracker.claim(run_name, tags, skip_finished))

    def add(self, outcome: Outcome | None) -> None:
        if outcome is not None:
            self.outcomes.append(outcome)

    @contextmanager
    def open(self, run_name: str, tags: dict, out: Path):
        """The job's run, active for the body; every outcome added is logged when the body ends."""
        with self.tracker.start(run_name, tags, {}, files_in=out):
            try:
                yield self
            finally:
                self._log_all(out)

    def _log_all(self, out: Path) -> None:
        tracker = self.tracker
        # params: what a person compares runs by; the full config is the artifact config/resolved.yaml
        tracker.log_params(dashboard.curated_params(tracking.flatten(tracking.resolved(self.cfg))))
        if tracker.lost is None:
            try:  # experiment tags through the client: a store lost now is reported as for every write
                dashboard.annotate_run(tracker, self.cfg, out)
            except tracking_store.TrackingUnavailable as e:
                tracker.lost = e
        for outcome in self.outcomes:
            log_outcome(tracker, outcome, self.cfg, out)
        tracker.log_artifact(out / ".hydra", "config")
        for outcome in self.outcomes:  # last: the model's page links the run's metrics, logged above
            if outcome.model is not None and tracker.enabled and tracker.lost is None:
                from cbir import serving

                serving.log_retriever(outcome.model, outcome.register_model)

    def address(self) -> tuple[str, str] | None:
        """(command that starts the dashboard, address of this run in it), when there is a run."""
        tracker = self.tracker
        if not (tracker.enabled and tracker.run_id):
            return None
        try:
            return dashboard.ui_address(tracker.uri, tracking.retry_locked(tracker.experiment_id), tracker.run_id)
        except Exception as e:  # noqa: BLE001 - the address is a courtesy; the run itself is done
            log.warning("could not look up the run's dashboard address: %s", str(e)[:200])
            return None


def log_outcome(tracker: tracking.Tracker, outcome: Outcome, cfg: DictConfig, out: Path) -> None:
    """One outcome, logged as every other: params, dataset, tags, metrics, step series, description,
    files at the run's root and folders under their name."""
    if outcome.params:
        tracker.log_params(outcome.params)
    if outcome.dataset is not None:
        tracker.log_dataset(outcome.dataset, cfg.dataset.name, out / "dataset")
    if outcome.tags:
        tracker.set_tags(outcome.tags)
    if outcome.metrics:
        tracker.log_metrics(outcome.metrics)
    if outcome.description is not None:
        tracker.set_tags({"mlflow.note.content": outcome.description})
    for step, values in outcome.steps:
        tracker.log_metrics(values, step=step)
    for path in outcome.files.values():
        tracker.log_artifact(path)
    for name, folder in outcome.folders.items():
        tracker.log_artifact(folder, name)


def skipped(run_name: str, done) -> bool:
    if done is not None:
        log.info(
            "skipping %s: already FINISHED as run %s (tracking.skip_finished=false forces)", run_name, done.info.run_id
        )
    return done is not None
