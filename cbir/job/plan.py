"""Plan: every check of a job, before any work (no image decoded, no embedding computed, no run
created). The config, each evaluation's settings, the tracking store, the data, the index parameters
against the encoder's dimension; returns what the job will do, or None when a re-run of its sweep
finds it already finished."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cbir.evaluate import audit as leakage
from cbir.evaluate import multilabel, tasks
from cbir.evaluate import retrieval as cbir_retrieval
from cbir.job import checks, evaluations
from cbir.job.inputs import build_encoder, load_job_manifest
from cbir.job.record import Record
from cbir.tracking import dashboard
from cbir.tracking import runs as tracking

log = logging.getLogger("cbir")


@dataclass
class Plan:
    cfg: DictConfig
    out: Path  # the job folder
    run_name: str
    tags: dict[str, Any]  # the run's tags at creation (encoder, dataset, index, config hash, ...)
    per_class: int | None  # index.per_class as a number (None: all)
    manifest: Any  # cbir.data.manifest.Manifest, checked
    n_duplicates: int  # manifest rows dropped as repeated paths
    encoder: Any  # built (weights loaded), its dimension checked against the index parameters
    evaluations: list  # the modules of cbir.job.evaluations this job runs, in order
    record: Record  # the record step, its store checked


def job_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called without Hydra (a script or test composing the config itself)
        return Path("outputs") / "direct" / time.strftime("%Y-%m-%d_%H-%M-%S")


def plan(cfg: DictConfig) -> Plan | None:
    checks.validate_config(cfg)
    tasks.check_config(cfg)  # the task group: known evaluations and their settings
    evaluations.check(cfg)  # each evaluation's own settings (intervals, the served model)
    record = Record(cfg)  # the tracking store: usable, or one line now
    per_class = cbir_retrieval.per_class_value(cfg.index.per_class)
    tags = {
        "encoder": cfg.encoder.name,
        "dataset": cfg.dataset.name,
        "index_type": cfg.index.type,
        "per_class": "all" if per_class is None else per_class,
        "config_hash": tracking.config_hash(cfg),
        "git_commit": tracking.git_commit(),
        "task": tasks.task_name(cfg),
        "labels": multilabel.labels_mode(cfg),
    }
    run_name = job_run_name(cfg)
    if record.enabled:
        log.info("%s", record.describe())
    if cfg.tracking.get("skip_finished", True) and record.finished_earlier(run_name, tags["config_hash"]):
        return None  # a cheap early look; the claim looks again under the store lock
    manifest, n_duplicates = load_job_manifest(cfg)
    tasks.check_data(cfg, manifest.table, manifest.source)
    checks.validate_data(manifest.table, cfg, manifest.source)
    if cfg.eval.get("exclude_same_patient") and leakage.patient_ids(manifest.table) is None:
        log.warning("eval.exclude_same_patient=true, but the manifest has no patient ids: nothing is excluded")
    encoder = build_encoder(cfg)
    checks.check_index_type(cfg, encoder.dim)  # encoders whose config does not state their dim
    checks.settle_index_params(cfg, manifest.table, encoder.dim)  # nlist, m: logged as used
    return Plan(
        cfg=cfg,
        out=job_dir(),
        run_name=run_name,
        tags=tags,
        per_class=per_class,
        manifest=manifest,
        n_duplicates=n_duplicates,
        encoder=encoder,
        evaluations=evaluations.planned(cfg),
        record=record,
    )


def job_run_name(cfg: DictConfig) -> str:
    """The job's run name: dashboard.run_name plus the task (unless retrieval) and multi-label."""
    task, labels = tasks.task_name(cfg), multilabel.labels_mode(cfg)
    return dashboard.run_name(
        cfg,
        extra=tuple(
            word
            for word in (f"task={task}" if task != "retrieval" else "", "multi-label" if labels == "multi" else "")
            if word
        ),
    )
