"""Text queries (`task=text_retrieval`, `task=zero_shot`, both in `task=all`) for encoders with a
text tower: class prompts embedded once (cached), then text-to-image retrieval (`text/...`) and
zero-shot classification (`zero_shot/...`) against the job's index; skipped, with a tag saying
so, for an encoder without a text tower."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from cbir.evaluate import tasks, text
from cbir.evaluate.outcome import Outcome
from cbir.report import job_files

log = logging.getLogger("cbir.evaluate.text")


def wanted(cfg) -> bool:
    return bool(text.evaluations(cfg))


def evaluate(job) -> Outcome:
    from cbir.encoders.text import build_text_tower, has_text_tower

    cfg, table, out = job.cfg, job.table, job.out
    names = text.evaluations(cfg)
    if not has_text_tower(cfg.encoder):
        log.warning("encoder %s has no text tower: skipping %s", cfg.encoder.name, ", ".join(names))
        return Outcome("text_queries", tags={"text_tasks": "skipped: no text tower"})
    settings = cfg.task.text
    setup, index = tasks.index_of_job(cfg, table, job.embeddings, job.valid, job.search)
    labels = table["label"].astype(str).to_numpy()
    classes, index_codes = np.unique(labels[setup.index_rows], return_inverse=True)
    query_classes = np.unique(labels[np.asarray(job.valid, dtype=bool)])  # every class is a text query
    wanted_classes = sorted(set(classes) | set(query_classes))
    prompts = text.class_prompts(wanted_classes, list(settings.templates), dict(settings.get("modality_names") or {}))
    tower = build_text_tower(cfg.encoder, int(cfg.seed), cfg.paths.get("tokenizers_dir"))
    vectors, hit = text.cached_class_embeddings(tower, prompts, cfg.paths.cache_dir, int(settings.batch_size))
    log.info(
        "class text embeddings (%d classes x %d prompts): %s",
        len(wanted_classes),
        len(settings.templates),
        "cache hit" if hit else "computed",
    )
    out.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(
        "text_queries",
        tags={"text_tasks": ",".join(names), "text_cache": "hit" if hit else "miss"},
        files={"text_prompts": out / "text_prompts.csv"},
    )
    pd.DataFrame([{"class": c, "prompt": p} for c, ps in zip(wanted_classes, prompts) for p in ps]).to_csv(
        outcome.files["text_prompts"], index=False
    )
    position = {c: i for i, c in enumerate(wanted_classes)}
    if "text_retrieval" in names:
        result = text.text_retrieval(
            table,
            wanted_classes,
            vectors,
            index,
            setup.index_rows,
            cfg.eval.n,
            cfg.eval.levels,
            int(cfg.eval.search_batch_size),
        )
        outcome.metrics.update({f"text/{k}": v for k, v in result.metrics.items()})
        outcome.files["text_metrics"] = out / "text_metrics.json"
        outcome.files["text_metrics"].write_text(
            json.dumps(
                {
                    "metrics": result.metrics,
                    "queries": result.n_queries,
                    "excluded_queries": result.n_excluded,
                    "excluded_classes": result.excluded_classes,
                },
                indent=1,
            )
        )
        outcome.files["text_per_class"] = out / "text_per_class.csv"
        result.per_class.to_csv(outcome.files["text_per_class"], index=False)
        title = f"{job.run_name}  (text queries, modified P@N)"
        outcome.tables.append((job_files.summary_table(result, cfg.eval.n, title), 150))
    if "zero_shot" in names:
        class_vectors = vectors[[position[c] for c in classes]]
        result, excluded = text.zero_shot(
            table,
            job.embeddings,
            setup.query_rows,
            classes,
            class_vectors,
            float(settings.temperature),
            np.bincount(index_codes, minlength=len(classes)),
        )
        counts = {
            "queries": len(setup.query_rows) - excluded,
            "excluded_queries": excluded,
            "classes": len(classes),
            "prompts_per_class": len(settings.templates),
            "temperature": float(settings.temperature),
        }
        zero_shot = tasks.outcome(tasks.TaskOutput("zero_shot", result, counts), out, f"{job.run_name}  (zero_shot)")
        outcome.metrics.update(zero_shot.metrics)
        outcome.steps += zero_shot.steps
        outcome.files.update(zero_shot.files)
        outcome.tables += zero_shot.tables
    return outcome
