"""The evaluations a job can run, one module each, all with the same small interface:

    wanted(cfg) -> bool         does this job's config ask for it
    check(cfg) -> None          (optional) its config checks, run by the plan step before any work
    evaluate(job: Job) -> Outcome | None

`evaluate` reads the job's data (`Job`: manifest, embeddings, the search once retrieval ran), writes
its files into the job folder and returns an `Outcome` (metrics, step series, files, tables, a
description); it never talks to MLflow (the record step logs every outcome). They run in the order
of EVALUATIONS: retrieval first, since the later ones reuse its search. Adding an evaluation means
adding a module here and its name to EVALUATIONS (and, for a task, to the `task` config group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cbir.job.evaluations import (
    audit,
    index_outputs,
    knn,
    multilabel,
    probe,
    retrieval,
    saturation,
    text_queries,
)

EVALUATIONS = [retrieval, index_outputs, multilabel, saturation, knn, probe, text_queries, audit]


@dataclass
class Job:
    """What every evaluation of one job reads; retrieval adds its search for the ones after it."""

    cfg: DictConfig
    manifest: Any  # cbir.data.manifest.Manifest
    embeddings: np.ndarray  # a memory map of the cache entry, one row per manifest row
    valid: np.ndarray  # rows with a usable embedding
    encoder: Any
    out: Path  # the job folder
    run_name: str
    per_class: int | None  # index.per_class as a number (None: all)
    search: Any = None  # retrieval's SearchOutput, shared by the later evaluations
    result: Any = None  # retrieval's RetrievalResult: the job's headline numbers
    records: list[pd.DataFrame] = field(default_factory=list)  # per-query records (per_query.parquet)

    @property
    def table(self) -> pd.DataFrame:
        return self.manifest.table

    @cached_property
    def excluded_patients(self) -> np.ndarray | None:
        """Patient ids whose pairs leave each query's neighbours (eval.exclude_same_patient)."""
        from cbir.evaluate import audit as leakage

        return leakage.patient_ids(self.table) if self.cfg.eval.get("exclude_same_patient") else None


def planned(cfg: DictConfig) -> list:
    """The evaluations this job's config asks for, in the order they run."""
    return [evaluation for evaluation in EVALUATIONS if evaluation.wanted(cfg)]


def check(cfg: DictConfig) -> None:
    """Every evaluation's config checks (all of them: a sweep's other jobs may run the others)."""
    for evaluation in EVALUATIONS:
        if hasattr(evaluation, "check"):
            evaluation.check(cfg)


def evaluate(plan, extraction, record):
    """Run the plan's evaluations in order on the job's embeddings; each outcome goes to the record
    step and its tables to the console. Returns the Job (its retrieval result is the headline)."""
    from cbir.evaluate import per_query
    from cbir.evaluate.outcome import Outcome
    from cbir.job import finish

    job = Job(
        cfg=plan.cfg,
        manifest=plan.manifest,
        embeddings=extraction.embeddings,
        valid=extraction.valid,
        encoder=plan.encoder,
        out=plan.out,
        run_name=plan.run_name,
        per_class=plan.per_class,
    )
    for evaluation in plan.evaluations:
        outcome = evaluation.evaluate(job)
        for table, width in outcome.tables:
            finish.show_table(table, width)
        record.add(outcome)
    if (records_file := per_query.write(job.records, job.table, job.out)) is not None:
        record.add(Outcome("per_query", files={"per_query": records_file}))
    return job
