"""Entry point: `python -m cbir.run [overrides]` (add `-m` for a multirun sweep).

Composes the Hydra config and calls the stages in order: manifest, embeddings, index
subset + search, metrics, tracking, summary.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# Offline clusters: without this the hub client retries each missing file for ~23 s.
# cbir only ever reads model files from the local cache or encoder.weights unless the user
# explicitly opts in with HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cbir import (  # noqa: E402,E501  # noqa: E402
    CONFIG_DIR,
    audit,
    checks,
    comparisons,
    console,
    dashboard,
    multilabel,
    per_query,
    process,
    reporting,
    retrieval,
    run_end,
    tasks,
    text_tasks,  # noqa: E402
    tracking,
)
from cbir import search as cbir_search  # noqa: E402
from cbir.jobs import build, build_encoder, load_job_manifest, user_errors  # noqa: E402,F401 (also imported from here)
from cbir.metrics import RetrievalResult  # noqa: E402
from cbir.store import EmbeddingStore  # noqa: E402

log = logging.getLogger("cbir")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # one INFO line per CPU feature probe
console.quiet()


def job_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called without Hydra (a script or test composing the config itself)
        return Path("outputs") / "direct" / time.strftime("%Y-%m-%d_%H-%M-%S")


def run(cfg: DictConfig) -> RetrievalResult | None:
    """One job. Returns None when a sweep re-run finds this config already finished."""
    checks.validate_config(cfg)
    tasks.check_config(cfg)
    per_query.check_config(cfg)
    # imported here, not at the top: mlflow.pyfunc takes seconds to import
    from cbir import serving

    serving.check_config(cfg)
    out = job_dir()
    tracker = tracking.Tracker.from_config(cfg)
    per_class = retrieval.per_class_value(cfg.index.per_class)
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
    skip_finished = bool(cfg.tracking.get("skip_finished", True))
    if tracker.enabled:
        log.info("%s", tracker.describe())
    if skip_finished and skipped(run_name, tracker.finished_run(tags["config_hash"])):  # cheap early look
        return None
    manifest, n_duplicates = load_job_manifest(cfg)
    tasks.check_data(cfg, manifest.table, manifest.source)
    checks.validate_data(manifest.table, cfg, manifest.source)
    encoder = build_encoder(cfg)
    checks.check_index_type(cfg, encoder.dim)  # encoders whose config does not state their dim
    checks.settle_index_params(cfg, manifest.table, encoder.dim)  # nlist, m: logged as used
    from cbir.extract import extract_embeddings  # Lightning takes seconds to import: not before the checks

    console.quiet()  # again, now that Lightning is imported

    if skipped(run_name, tracker.claim(run_name, tags, skip_finished)):  # finished meanwhile by an identical job
        return None
    # params: what a person compares runs by; the full config is the artifact config/resolved.yaml
    with tracker.start(
        run_name, tags, dashboard.curated_params(tracking.flatten(tracking.resolved(cfg))), files_in=out
    ):
        dashboard.annotate_run(tracker, cfg, out)
        tracker.set_tags({comparisons.TAG: comparisons.query_set(cfg, manifest.digest())})  # paired comparisons
        tracker.log_params({f"encoder_info.{k}": v for k, v in encoder.info().items()})
        tracker.log_dataset(manifest, cfg.dataset.name, out / "dataset")
        extraction = extract_embeddings(
            encoder,
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
        tracker.set_tags({"cache": "hit" if extraction.cache_hit else "miss"})
        n_skipped = int((~extraction.valid).sum())
        tracker.log_metrics(
            {
                "extract/seconds": extraction.seconds,
                "extract/rows": extraction.rows_extracted,
                "data/skipped": n_skipped,
                "data/duplicate_paths": n_duplicates,
            }
        )
        if n_skipped:
            skipped_csv = extraction.cached.path / "skipped.csv"
            log.warning(
                "%d images could not be loaded (or had no embedding, or a NaN/inf one) and are left out; list: %s",
                n_skipped,
                skipped_csv,
            )
            tracker.log_artifact(skipped_csv)
            checks.check_skipped(n_skipped, len(manifest), cfg, skipped_csv)

        def evaluate(size, return_search=False):
            setup = retrieval.choose_rows(
                manifest.table, extraction.valid, cfg.index.split, cfg.eval.query_split, size, cfg.index.seed
            )
            return retrieval.run_retrieval(
                manifest.table,
                extraction.embeddings,
                setup,
                cfg.index,
                cfg.eval.n,
                cfg.eval.curve_k,
                cfg.eval.levels,
                cfg.eval.search_batch_size,
                return_search=return_search,
                patients=excluded_patients,
            )

        excluded_patients = audit.patient_ids(manifest.table) if cfg.eval.get("exclude_same_patient") else None
        if cfg.eval.get("exclude_same_patient") and excluded_patients is None:
            log.warning("eval.exclude_same_patient=true, but the manifest has no patient ids: nothing is excluded")

        result, search, files, records = None, None, {}, []
        if "retrieval" in tasks.evaluations(cfg):
            result, search = evaluate(per_class, return_search=True)
            records.append(per_query.retrieval_records(manifest.table, search, result))
            per_query.add_retrieval_intervals(result, records[0], cfg)
            tracker.log_metrics(result.metrics)
            dashboard.describe_run(tracker, result.metrics, cfg.eval.n)
            for row in result.curve.itertuples():
                tracker.log_metrics({"curve/micro": row.micro, "curve/macro": row.macro}, step=int(row.N))
            files.update(reporting.write_job_files(result, out))
            per_query.add_shown(files["metrics"])
            files.update(
                cbir_search.job_outputs(
                    cfg,
                    manifest,
                    search,
                    out,
                    run_name,
                    tracker,
                    encoder,  # gallery, saved index
                    extraction.embeddings,
                )
            )
            serving.job_outputs(
                cfg,
                manifest,
                search,
                out,
                run_name,
                tracker,
                encoder,  # tracking.log_model: the `retriever` model
                extraction.embeddings,
            )
            if multilabel.labels_mode(cfg) == "multi":  # ml/ metrics on the same neighbours
                files.update(
                    multilabel.job_outputs(
                        manifest.table,
                        search,
                        cfg.eval.n,
                        tracker,
                        out,
                        f"{run_name}  (multi-label: shares a finding)",
                        cfg,
                    )
                )
            sizes = [retrieval.per_class_value(v) for v in cfg.eval.get("saturation") or []]
            if sizes:
                curves = reporting.saturation_in_run(sizes, evaluate, cfg.eval.n, cfg.encoder.name)
                for row in curves.to_dict("records"):
                    tracker.log_metrics(
                        {f"saturation/{name}": row[name] for name in reporting.curve_metric_names(cfg.eval.n)},
                        step=int(row["step"]),
                    )
                files["saturation_csv"] = out / "saturation.csv"
                curves.to_csv(files["saturation_csv"], index=False)
                files["saturation_png"] = reporting.plot_saturation(curves, out / "saturation.png", cfg.eval.n)
        files.update(
            tasks.run_classification(
                cfg, manifest.table, extraction.embeddings, extraction.valid, search, out, tracker, run_name, records
            )
        )
        files.update(
            text_tasks.run_text_evaluations(
                cfg, manifest.table, extraction.embeddings, extraction.valid, search, out, tracker, run_name
            )
        )
        audit_setup = (
            search.setup
            if search is not None
            else retrieval.choose_rows(
                manifest.table, extraction.valid, cfg.index.split, cfg.eval.query_split, per_class, cfg.index.seed
            )
        )
        files.update(audit.job_audit(cfg, manifest, audit_setup, search, out, tracker))  # leakage, every job
        if (records_file := per_query.write(records, manifest.table, out)) is not None:
            files["per_query"] = records_file
        for path in files.values():
            tracker.log_artifact(path)
        tracker.log_artifact(out / ".hydra", "config")
    run_end.finish(result, cfg, run_name, out, tracker)  # table or one line, where the files are
    return result


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


def skipped(run_name: str, done) -> bool:
    if done is not None:
        log.info(
            "skipping %s: already FINISHED as run %s (tracking.skip_finished=false forces)", run_name, done.info.run_id
        )
    return done is not None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    process.handle_sigterm()  # Slurm's time limit, `kill`: the run ends KILLED, partial embeddings stay
    try:
        result = run(cfg)
    except BaseException as e:
        if process.terminated():
            log.error(
                "stopped by SIGTERM: the run is marked KILLED and the embeddings computed so far are "
                "kept; the same command resumes"
            )
            sys.exit(143)
        if not isinstance(e, user_errors()) or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # in a sweep, the launcher records the failed job and the sweep goes on
        log.error("%s", e)
        sys.exit(2)
    return None if result is None else result.metrics["micro/P_at_1"]


if __name__ == "__main__":
    main()
