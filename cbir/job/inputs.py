"""A job's inputs, built the same way by every entry point (run, search, the sweep's shared
extraction, export, parity, the experiment scripts): the config's objects, the manifest and the
seeded encoder, and which errors are the user's to fix."""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from cbir.data.manifest import Manifest
from cbir.job import checks


def build(node: DictConfig):
    """instantiate(), but a cbir error raised by the constructor reaches the user as itself,
    not wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, user_errors()):
            raise e.__cause__ from None
        raise


def load_job_manifest(cfg: DictConfig) -> tuple[Manifest, int]:
    """The job's manifest (duplicate paths dropped) and the number of rows dropped."""
    manifest = build(cfg.dataset).load_manifest()
    table, n_duplicates = checks.drop_duplicate_paths(manifest.table)
    if n_duplicates:
        manifest = manifest.with_table(table)
    return manifest, n_duplicates


def build_encoder(cfg: DictConfig):
    torch.manual_seed(int(cfg.seed))  # random-init encoders (pretrained=false) get the same weights every run
    return build(cfg.encoder)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input or config, whose message already names the key/file and fix."""
    from cbir.data.images import ImageLoadError
    from cbir.data.manifest import ManifestError
    from cbir.encoders.base import EncoderError
    from cbir.extract.store import CacheSpaceError
    from cbir.tracking.store import TrackingUnavailable

    return (
        checks.ConfigError,
        checks.DataError,
        ManifestError,
        EncoderError,
        ImageLoadError,
        CacheSpaceError,
        TrackingUnavailable,
    )
