"""The leakage audit, in every job (SPEC section 11): query images that share a patient, a file or
a near-identical embedding with an index row; `audit/...` metrics, audit.csv, one warning."""

from __future__ import annotations

import logging

from cbir.evaluate import audit as leakage
from cbir.evaluate.outcome import Outcome
from cbir.job.evaluations import retrieval

log = logging.getLogger("cbir.evaluate.audit")


def wanted(cfg) -> bool:
    return True


def evaluate(job) -> Outcome:
    cfg, search = job.cfg, job.search
    setup = search.setup if search is not None else retrieval.setup(job, job.per_class)
    first = cosine = None
    if search is not None and search.neighbours.shape[1]:  # positions into index_rows, as the other pairs
        first, cosine = search.neighbours[:, 0], search.scores[:, 0]
    threshold = float((cfg.eval.get("audit") or {}).get("near_duplicate", 0.999))
    sizes = job.manifest.file_stats()[:, 0]  # one stat per file, in threads
    cases, metrics = leakage.audit(
        job.table, job.manifest.root, setup.query_rows, setup.index_rows, first, cosine, threshold, sizes
    )
    job.out.mkdir(parents=True, exist_ok=True)
    path = job.out / "audit.csv"
    cases.to_csv(path, index=False)
    line = leakage.warning_line(metrics, len(setup.query_rows), path)
    if line:
        log.warning("%s", line)
    if not metrics["audit/patient/checked"]:
        log.info(
            "leakage audit: the manifest has no patient ids; shared patients are not checked "
            "(CSV and folder datasets: add a 'patient' column)"
        )
    return Outcome("audit", metrics=metrics, files={"audit": path})
