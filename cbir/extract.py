"""Embedding extraction: a Lightning predict loop writing rows into the on-disk cache.

The DataLoader decodes and preprocesses images in worker processes; the module runs the
encoder; a batch-interval writer puts each batch's rows at their manifest positions in a
preallocated memory-mapped array (`return_predictions=False`: nothing accumulates in RAM).
Extraction happens once per (encoder identity, manifest rows); everything else reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from torch.utils.data import DataLoader, Dataset

from cbir.data.images import ImageLoadError, load_image
from cbir.data.manifest import Manifest
from cbir.encoders.base import Encoder
from cbir.store import CachedEmbeddings, EmbeddingStore

log = logging.getLogger(__name__)


class ImageRows(Dataset):
    """Yields (row, tensor, ok, error) for the given manifest rows. A file that fails to
    load yields a zero tensor with ok=False and the reason, so one bad image never stops a
    run; `on_error="raise"` stops at once, naming the file."""

    def __init__(self, paths: list[Path], rows: np.ndarray, transform, shape, on_error: str = "skip") -> None:
        self.paths, self.rows, self.transform = paths, rows, transform
        self.shape, self.on_error = tuple(shape), on_error

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            tensor = self.transform(load_image(self.paths[row]))
            return row, tensor, True, ""
        except ImageLoadError as e:
            if self.on_error == "raise":
                raise
            return row, torch.zeros(self.shape), False, str(e)


class EmbeddingModule(L.LightningModule):
    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def predict_step(self, batch, batch_idx):
        rows, images, ok, errors = batch
        embedding = self.encoder(images).float()
        return {"rows": rows, "embedding": embedding, "ok": ok, "errors": errors}


class ArrayWriter(BasePredictionWriter):
    """Writes each predicted batch into the partial cache entry by row index."""

    def __init__(self, partial, paths: list[Path]) -> None:
        super().__init__(write_interval="batch")
        self.partial, self.paths = partial, paths

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = prediction["rows"].cpu().numpy()
        ok = prediction["ok"].cpu().numpy().astype(bool)
        values = prediction["embedding"].detach().cpu().numpy()
        self.partial.write(rows, values, ok)
        self.partial.record_skips(
            [(int(r), str(self.paths[r]), e) for r, good, e in zip(rows, ok, prediction["errors"]) if not good]
        )


@dataclass
class Extraction:
    cached: CachedEmbeddings
    cache_hit: bool
    seconds: float
    rows_extracted: int

    @property
    def embeddings(self) -> np.ndarray:
        return self.cached.embeddings

    @property
    def valid(self) -> np.ndarray:
        return self.cached.valid


def cache_key(encoder: Encoder, manifest: Manifest) -> str:
    h = hashlib.sha256(f"{encoder.cache_key()}:{manifest.digest()}".encode()).hexdigest()[:20]
    return f"{encoder.name}-{h}"


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def extract_embeddings(encoder: Encoder, manifest: Manifest, store: EmbeddingStore, cfg, on_error: str = "skip") -> Extraction:
    """Embeddings of every manifest row, from the cache or extracted now (under a lock, so
    parallel jobs asking for the same key extract it once)."""
    start = time.perf_counter()
    key = cache_key(encoder, manifest)
    cached = store.load(key)
    if cached is not None:
        return Extraction(cached, True, time.perf_counter() - start, 0)
    with store.lock(key):
        cached = store.load(key)  # another job may have finished it while we waited
        if cached is not None:
            return Extraction(cached, True, time.perf_counter() - start, 0)
        partial = store.open_partial(key, len(manifest), encoder.dim)
        rows = partial.remaining()
        if len(rows) < len(manifest):
            log.info("resuming extraction %s: %d of %d rows left", key, len(rows), len(manifest))
        if len(rows):
            _predict(encoder, manifest, partial, rows, cfg, on_error)
        cached = store.commit(
            key, partial,
            {"key": key, "encoder": encoder.identity(), "manifest": manifest.digest()},
        )
    return Extraction(cached, False, time.perf_counter() - start, int(len(rows)))


def _predict(encoder, manifest, partial, rows, cfg, on_error) -> None:
    paths = manifest.paths()
    transform = encoder.transform()
    sample_shape = _probe_shape(transform)
    dataset = ImageRows(paths, rows, transform, sample_shape, on_error)
    workers = int(cfg.num_workers)
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    accelerator = str(cfg.accelerator)
    callbacks = [ArrayWriter(partial, paths)]
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=resolve_precision(str(cfg.precision), accelerator),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.progress),
        callbacks=callbacks,
        inference_mode=True,
    )
    encoder.eval()
    trainer.predict(EmbeddingModule(encoder), dataloaders=loader, return_predictions=False)


def _probe_shape(transform) -> tuple[int, ...]:
    """Output shape of the transform, used for the placeholder tensor of a failed image."""
    from PIL import Image

    return tuple(transform(Image.new("L", (32, 32))).shape)
