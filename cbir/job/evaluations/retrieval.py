"""Retrieval (`task=retrieval`, in `task=all`): the job's search, modified P@N with intervals, the
P@N curve, the job files (metrics.json, per_class.csv, ...) and the run's description."""

from __future__ import annotations

from cbir.evaluate import per_query, tasks
from cbir.evaluate import retrieval as cbir_retrieval
from cbir.evaluate.outcome import Outcome
from cbir.report import job_files
from cbir.tracking import dashboard


def wanted(cfg) -> bool:
    return "retrieval" in tasks.evaluations(cfg)


def check(cfg) -> None:
    per_query.check_config(cfg)  # interval settings (eval.ci)


def setup(job, size):
    """The index and query rows of the job at index size `size` (per class; None: all)."""
    return cbir_retrieval.rows_of_job(job.cfg, job.table, job.valid, size)


def search(job, size, return_search: bool = False):
    """Metrics (and with return_search, the SearchOutput) of the job's search at index size `size`."""
    cfg = job.cfg
    return cbir_retrieval.run_retrieval(
        job.table,
        job.embeddings,
        setup(job, size),
        cfg.index,
        cfg.eval.n,
        cfg.eval.curve_k,
        cfg.eval.levels,
        cfg.eval.search_batch_size,
        return_search=return_search,
        patients=job.excluded_patients,
    )


def evaluate(job) -> Outcome:
    cfg = job.cfg
    result, found = search(job, job.per_class, return_search=True)
    records = per_query.retrieval_records(job.table, found, result)
    per_query.add_retrieval_intervals(result, records, cfg)
    job.search, job.result = found, result
    job.records.append(records)
    files = job_files.write_job_files(result, job.out)
    per_query.add_shown(files["metrics"])
    return Outcome(
        "retrieval",
        metrics=dict(result.metrics),
        steps=[(int(row.N), {"curve/micro": row.micro, "curve/macro": row.macro}) for row in result.curve.itertuples()],
        files=files,
        description="Modified P@N (all queries)\n\n" + dashboard.headline(result.metrics, cfg.eval.n),
    )
