"""Embed: the job's manifest rows as embeddings, from the cache or extracted into it (one Lightning
pass; the rows a sweep's shared pass made are cache hits). Hands the record step what it did."""

from __future__ import annotations

import logging

from cbir.evaluate import comparisons
from cbir.evaluate.outcome import Outcome
from cbir.extract.store import EmbeddingStore
from cbir.job import checks

log = logging.getLogger("cbir")


def embed(plan, record):
    """The job's Extraction (embeddings memory-mapped from the cache, the usable rows). Rows that could
    not be embedded are left out and listed; too many of them stop the job (data.max_skipped)."""
    from cbir.common import console
    from cbir.extract.single import extract_embeddings  # Lightning takes seconds to import: not before the plan

    console.quiet()  # again, now that Lightning is imported
    cfg, manifest = plan.cfg, plan.manifest
    extraction = extract_embeddings(
        plan.encoder,
        manifest,
        EmbeddingStore(cfg.paths.cache_dir),
        cfg.extract,
        on_error=cfg.data.on_error,
        retry_failed=bool(cfg.data.retry_failed),
    )
    log.info(
        "embeddings %s: %s (%d rows extracted, %.1f s)",
        extraction.cached.key,
        "cache hit" if extraction.cache_hit else "extracted",
        extraction.rows_extracted,
        extraction.seconds,
    )
    n_skipped = int((~extraction.valid).sum())
    outcome = Outcome(
        "embed",
        params={f"encoder_info.{k}": v for k, v in plan.encoder.info().items()},
        dataset=manifest,
        tags={
            comparisons.TAG: comparisons.query_set(cfg, manifest.digest()),  # runs answering the same queries
            "cache": "hit" if extraction.cache_hit else "miss",
        },
        metrics={
            "extract/seconds": extraction.seconds,
            "extract/rows": extraction.rows_extracted,
            "data/skipped": n_skipped,
            "data/duplicate_paths": plan.n_duplicates,
        },
    )
    record.add(outcome)
    if n_skipped:
        skipped_csv = extraction.cached.path / "skipped.csv"
        log.warning(
            "%d images could not be loaded (or had no embedding, or a NaN/inf one) and are left out; list: %s",
            n_skipped,
            skipped_csv,
        )
        outcome.files["skipped"] = skipped_csv
        checks.check_skipped(n_skipped, len(manifest), cfg, skipped_csv)
    return extraction
