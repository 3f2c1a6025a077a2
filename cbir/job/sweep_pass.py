"""A sweep's embeddings in shared passes, before its jobs: each image decoded once per dataset.

`SharedPassCallback` (a Hydra callback, on by default through `extract.shared_pass`) lists the
jobs of a multirun exactly as the basic sweeper does (its `params` plus the command-line
overrides), composes each job's config as the launcher will, builds each distinct encoder the
way a job does (`cbir.job.inputs.build_encoder`, seeded) and keeps those whose cache entry is missing.
Encoders that share a dataset and extraction settings are grouped (`extract.group_size`,
`extract.group_memory_gb`) and each group is extracted in one pass (`cbir.extract.shared`). The
jobs then find their embeddings as cache hits. It runs in the launching process, so it serves
the basic and joblib launchers; under Slurm run it as a job of its own first:

    python -m cbir.sweep_pass encoder=resnet50,dinov2,clip dataset=combined   # same overrides as the sweep
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


def sweep_jobs(config: DictConfig, config_loader) -> list[list[str]] | None:
    """Each job's overrides, in launch order, or None for a sweeper other than the basic one."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_config(config_loader, config: DictConfig, overrides: list[str]) -> DictConfig:
    """A job's config as the launcher composes it and the job receives it (no `hydra` node)."""
    from omegaconf import open_dict

    job = config_loader.load_sweep_config(config, list(overrides))
    with open_dict(job):
        del job["hydra"]
    return job


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def run_shared_passes(job_configs: list[DictConfig]) -> list:
    """Group the jobs' missing embeddings by dataset and extraction settings and extract each
    group in one pass. Returns the passes run (cbir.extract.shared.SharedPass)."""
    from cbir.job import checks
    from cbir.job.inputs import user_errors
    from cbir.tracking import runs as tracking

    buckets: dict[str, list[DictConfig]] = {}
    finished = 0
    for job in job_configs:
        try:
            checks.validate_config(job)
        except user_errors() as e:
            log.info("shared extraction: leaving out a job whose config fails (%s); the job reports it", e)
            continue
        if (
            job.tracking.get("skip_finished", True)
            and tracking.Tracker.from_config(job).finished_run(tracking.config_hash(job)) is not None
        ):
            finished += 1  # the job will skip itself (a resumed sweep): no encoder to build for it
            continue
        settings = {k: OmegaConf.to_container(job[k], resolve=True) for k in ("dataset", "extract", "paths", "data")}
        buckets.setdefault(json.dumps(settings, sort_keys=True, default=str), []).append(job)
    if finished:
        log.info("shared extraction: %d of %d jobs already FINISHED, left out", finished, len(job_configs))
    passes = []
    for jobs in buckets.values():
        passes.extend(_bucket_passes(jobs))
    return passes


def _bucket_passes(jobs: list[DictConfig]) -> list:
    from cbir.common import console
    from cbir.extract.shared import extract_shared
    from cbir.extract.single import cache_key
    from cbir.extract.store import CacheLookup, EmbeddingStore
    from cbir.job.inputs import build_encoder, load_job_manifest, user_errors

    console.quiet()  # Lightning is imported now: its own stderr handler would print each line twice
    first = jobs[0]
    try:
        manifest, _ = load_job_manifest(first)
    except user_errors() as e:
        log.info("shared extraction: dataset %s not loaded (%s); its jobs report it", first.dataset.get("name"), e)
        return []
    store = EmbeddingStore(first.paths.cache_dir)
    files = manifest.file_stats()  # one stat pass for every encoder of this dataset
    retry_failed = bool(first.data.get("retry_failed", False))
    cfg = first.extract
    size_cap = int(cfg.get("group_size") or 0) or len(jobs)
    byte_cap = float(cfg.get("group_memory_gb") or 0) * 1e9 or float("inf")
    passes, group, group_bytes, seen = [], [], 0, set()
    # the load_fresh of each cache key in `group`, handed to its pass (a key hashes every manifest path: computed once)
    group_found: dict[str, CacheLookup] = {}

    def flush() -> None:
        nonlocal group, group_bytes
        if len(group) > 1:  # a lone encoder gains nothing: its job extracts it as usual
            passes.append(
                extract_shared(
                    group,
                    manifest,
                    store,
                    cfg,
                    on_error=str(first.data.on_error),
                    retry_failed=retry_failed,
                    files=files,
                    looked_up=group_found,
                )
            )
        group, group_bytes = [], 0
        group_found.clear()

    for job in jobs:
        identity = json.dumps(
            [OmegaConf.to_container(job.encoder, resolve=True), job.seed], sort_keys=True, default=str
        )
        if identity in seen:  # the same encoder in several jobs (e.g. a sweep over index sizes)
            continue
        seen.add(identity)
        try:
            encoder = build_encoder(job)
        except user_errors() as e:
            log.info("shared extraction: encoder %s not built (%s); its job reports it", job.encoder.get("name"), e)
            continue
        if encoder.precomputed:  # stored embeddings: no images to decode
            continue
        key = cache_key(encoder, manifest)
        if key in group_found:
            continue
        found = store.load_fresh(key, files, retry_failed)
        if found.fresh:
            continue
        size = weight_bytes(encoder)
        if group and (len(group) >= size_cap or group_bytes + size > byte_cap):
            flush()
        group.append(encoder)
        group_found[key] = found
        group_bytes += size
    flush()
    return passes


def log_to_parent(config: DictConfig, passes: list) -> None:
    """Decode count and encoders of the shared passes, as metrics of the sweep's parent run."""
    from cbir.tracking import runs as tracking

    parent = os.environ.get(tracking.PARENT_ENV)
    if not parent or not config.tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.resolve_uri(config.tracking.uri))
    decodes = sum(p.decodes or 0 for p in passes)
    encoders = sum(len(p.extracted) for p in passes)
    for name, value in (
        ("extract/shared_decodes", decodes),
        ("extract/shared_encoders", encoders),
        ("extract/shared_seconds", sum(p.seconds for p in passes)),
    ):
        tracking.retry_locked(client.log_metric, parent, name, float(value))


class SharedPassCallback(_HydraCallback):
    """Runs the sweep's shared extraction passes before the first job starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.extract.get("shared_pass", False):
            return
        if "submitit" in str(config.hydra.launcher.get("_target_", "")).lower():
            log.info(
                "extract.shared_pass: not run on the submitting node; to decode each image once, run "
                "`python -m cbir.sweep_pass <the sweep's overrides>` as a GPU job before the sweep"
            )
            return
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().hydra.config_loader
        jobs = sweep_jobs(config, loader)
        if not jobs or len(jobs) < 2:
            return
        try:
            passes = run_shared_passes([job_config(loader, config, job) for job in jobs])
        except Exception as e:  # the jobs still extract on their own, resuming what the pass wrote
            log.warning(
                "shared extraction pass failed (%s: %s); each job extracts its own embeddings",
                type(e).__name__,
                e,
                exc_info=True,
            )
            return
        if passes:
            log_to_parent(config, passes)


def main(argv: list[str] | None = None) -> int:
    """`python -m cbir.sweep_pass <sweep overrides>`: the shared passes of that sweep, nothing else."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from cbir import CONFIG_DIR

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        hydra_app = GlobalHydra.instance().hydra
        config = hydra_app.compose_config(
            "config", overrides, run_mode=RunMode.MULTIRUN, from_shell=True, with_log_configuration=False
        )
        jobs = sweep_jobs(config, hydra_app.config_loader) or []
        passes = run_shared_passes([job_config(hydra_app.config_loader, config, job) for job in jobs])
    for p in passes:
        for name, parts in p.timings.items():
            log.info("  %s: %s", name, ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
    log.info(
        "%d shared pass(es), %d encoders extracted, %d images decoded",
        len(passes),
        sum(len(p.extracted) for p in passes),
        sum(p.decodes or 0 for p in passes),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
