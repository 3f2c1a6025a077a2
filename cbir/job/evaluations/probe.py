"""Linear probe (`task=linear_probe`, in `task=all`; SPEC section 9): a linear layer trained on the
frozen embeddings through Lightning; `probe/...` metrics with intervals, its epochs as step series."""

from __future__ import annotations

from cbir.evaluate import tasks
from cbir.evaluate.outcome import Outcome


def wanted(cfg) -> bool:
    return "linear_probe" in tasks.evaluations(cfg)


def evaluate(job) -> Outcome:
    output = tasks.add_intervals(tasks.run_probe(job.cfg, job.table, job.embeddings, job.valid), job.cfg)
    job.records.append(output.records)
    return tasks.outcome(output, job.out, f"{job.run_name}  (linear_probe)")
