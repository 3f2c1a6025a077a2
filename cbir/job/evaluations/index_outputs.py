"""What a person uses of a run beyond its metrics: the retrieval gallery (`eval.gallery=true`), the
saved index (`index.save=true`, logged as the artifact folder `index`) and the served model
(`tracking.log_model=true`: the saved index as the run's MLflow model `retriever`)."""

from __future__ import annotations

import logging

from cbir.evaluate.outcome import Outcome
from cbir.job.evaluations import retrieval

log = logging.getLogger("cbir.search")


def wanted(cfg) -> bool:
    asked = cfg.eval.get("gallery", False) or cfg.index.get("save", False) or cfg.tracking.get("log_model", False)
    return retrieval.wanted(cfg) and bool(asked)


def check(cfg) -> None:
    from cbir import serving  # here: mlflow.pyfunc takes seconds to import

    serving.check_config(cfg)


def evaluate(job) -> Outcome:
    from cbir.search import save_index

    cfg, outcome = job.cfg, Outcome("index_outputs")
    if cfg.eval.get("gallery", False):
        from cbir.report.gallery import gallery_for_run

        outcome.files = gallery_for_run(
            job.table,
            job.manifest.root,
            job.search,
            int(cfg.eval.get("gallery_queries", 8)),
            int(cfg.eval.get("gallery_k", 5)),
            job.out,
            seed=int(cfg.seed),
            title=job.run_name,
        )
    folder = job.out / "index"
    kept = bool(cfg.index.get("save", False))  # the folder, logged as the artifact `index`
    served = bool(cfg.tracking.get("log_model", False) and cfg.tracking.get("enabled", True))
    if kept or served:
        save_index(folder, job.search, job.table, job.manifest.root, cfg, job.run_name, job.encoder, job.embeddings)
    if kept:
        outcome.folders["index"] = folder
        log.info(
            "index saved to %s (search it with: python -m cbir.search search.index_dir=%s 'search.images=[...]')",
            folder,
            folder,
        )
    if served:
        outcome.model, outcome.register_model = folder, cfg.tracking.get("register_model")
    return outcome
