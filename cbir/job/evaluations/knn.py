"""k-NN classification (`task=knn_classification`, in `task=all`; SPEC section 9): on retrieval's
neighbours when it ran (else on the same index), k chosen on val; `knn/...` metrics with intervals."""

from __future__ import annotations

from cbir.evaluate import tasks
from cbir.evaluate.outcome import Outcome


def wanted(cfg) -> bool:
    return "knn_classification" in tasks.evaluations(cfg)


def evaluate(job) -> Outcome:
    output = tasks.add_intervals(tasks.run_knn(job.cfg, job.table, job.embeddings, job.valid, job.search), job.cfg)
    job.records.append(output.records)
    return tasks.outcome(output, job.out, f"{job.run_name}  (knn_classification)")
