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

from cbir.common.errors import DataError
from cbir.data.images import ImageLoadError, load_image
from cbir.data.manifest import Manifest
from cbir.encoders.base import Encoder
from cbir.extract.store import CachedEmbeddings, EmbeddingStore

log = logging.getLogger(__name__)


class ImageRows(Dataset):
    """Yields (row, tensor, ok, error) for the given manifest rows. A file that fails to
    load yields a zero tensor with ok=False and the reason; the writer then skips or stops
    (`data.on_error`) in the main process, so the error names the file, not a worker."""

    def __init__(self, paths: list[Path], rows: np.ndarray, transform, shape) -> None:
        self.paths, self.rows, self.transform, self.shape = paths, rows, transform, tuple(shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            tensor = self.transform(load_image(self.paths[row]))
            return row, tensor, True, ""
        except ImageLoadError as e:
            return row, torch.zeros(self.shape), False, str(e)
        except Exception as e:  # a transform failing on an odd image (e.g. 1x1) is the image's fault
            return row, torch.zeros(self.shape), False, f"{self.paths[row]}: {type(e).__name__}: {e}"


class EmbeddingModule(L.LightningModule):
    def __init__(self, encoder: Encoder, channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.channels_last = channels_last
        # torch.compile wraps the module; the wrapper shares the encoder's parameters
        self.forward_fn = torch.compile(encoder) if compile else encoder

    def predict_step(self, batch, batch_idx):
        rows, images, ok, errors = batch
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        embedding = self.forward_fn(images).float()
        return {"rows": rows, "embedding": embedding, "ok": ok, "errors": errors}


class ArrayWriter(BasePredictionWriter):
    """Writes each predicted batch into the partial cache entry by row index."""

    def __init__(self, partial, paths: list[Path], on_error: str = "skip") -> None:
        super().__init__(write_interval="batch")
        self.partial, self.paths, self.on_error = partial, paths, on_error

    def __getstate__(self):  # spawned DDP ranks reopen the on-disk arrays instead of copying them
        state = dict(self.__dict__)
        state["partial"] = (self.partial.path, self.partial.n, self.partial.dim)
        return state

    def __setstate__(self, state):
        from cbir.extract.store import PartialEntry

        self.__dict__.update(state)
        self.partial = PartialEntry(*state["partial"])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = prediction["rows"].cpu().numpy()
        ok = prediction["ok"].cpu().numpy().astype(bool)
        self.write(rows, prediction["embedding"].detach().cpu().numpy(), ok, list(prediction["errors"]))

    def write(self, rows: np.ndarray, values: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
        finite = np.isfinite(values).all(axis=1)
        if not finite[ok].all():  # a NaN index row is never retrieved, a NaN query never hits: a failed row
            errors = [
                f"{self.paths[r]}: the encoder's embedding holds NaN or inf values" if good and not fin else e
                for r, good, fin, e in zip(rows, ok, finite, errors)
            ]
            ok = ok & finite
            values = np.where(finite[:, None], values, 0).astype(np.float32)
        if self.on_error == "raise" and not ok.all():
            good = ok.nonzero()[0]
            self.partial.write(rows[good], values[good], ok[good])  # keep what this batch did compute
            first = int((~ok).nonzero()[0][0])
            raise ImageLoadError(
                f"{errors[first]} (data.on_error=raise; "
                "use data.on_error=skip to skip and count unreadable files and failed embeddings)"
            )
        self.partial.write(rows, values, ok)
        self.partial.record_skips([(int(r), str(self.paths[r]), e) for r, good, e in zip(rows, ok, errors) if not good])


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
    """The embedding cache key, the one every extraction uses: the encoder's identity (model,
    weights with their resolved hub revision, pooling, preprocessing) and which images (dataset
    root, paths in order, a generated dataset's parameters). What each file holds is checked
    per row against the entry (size and mtime, see cbir.extract.store), so a hit means same inputs."""
    h = hashlib.sha256(f"{encoder.cache_key()}:{manifest.digest()}".encode()).hexdigest()[:20]
    return f"{encoder.name}-{h}"


def entry_meta(key: str, encoder: Encoder, manifest: Manifest) -> dict:
    """What a committed cache entry records about its inputs."""
    return {"key": key, "encoder": encoder.identity(), "manifest": manifest.digest()}


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def extract_embeddings(
    encoder: Encoder, manifest: Manifest, store: EmbeddingStore, cfg, on_error: str = "skip", retry_failed: bool = False
) -> Extraction:
    """Embeddings of every manifest row, from the cache or extracted now (under a lock, so
    parallel jobs asking for the same key extract it once). Rows whose file changed since they
    were cached are extracted again, and so are failed rows under `retry_failed`."""
    start = time.perf_counter()
    key = cache_key(encoder, manifest)
    # stored embeddings do not depend on the image files (which may be absent): their key names the HDF5 files
    files = manifest.no_file_stats() if encoder.precomputed else manifest.file_stats()
    found = store.load_fresh(key, files, retry_failed)
    if found.fresh:
        return _finish(Extraction(found.entry, True, time.perf_counter() - start, 0), manifest, on_error, encoder)
    with store.lock(key):
        # another job may have finished or refreshed it while we waited
        found = store.load_fresh(key, files, retry_failed, known=found)
        cached = found.entry
        if cached is not None:
            if found.fresh:
                return _finish(Extraction(cached, True, time.perf_counter() - start, 0), manifest, on_error, encoder)
            log.info(
                "embeddings %s: %d of %d rows are out of date (their file changed%s); extracting them again",
                key,
                len(found.stale),
                len(manifest),
                ", or they failed and data.retry_failed=true" if retry_failed else "",
            )
        partial = store.open_partial(key, len(manifest), encoder.dim, files, base=cached, retry_failed=retry_failed)
        rows = partial.remaining()
        if cached is None and len(rows) < len(manifest):
            log.info("resuming extraction %s: %d of %d rows left", key, len(rows), len(manifest))
        if len(rows) and encoder.precomputed:
            encoder.fill(manifest, partial, rows, on_error)  # stored embeddings: no images, no model
        elif len(rows):
            _predict(encoder, manifest, partial, rows, cfg, on_error)
        cached = store.commit(key, partial, entry_meta(key, encoder, manifest))
    return _finish(Extraction(cached, False, time.perf_counter() - start, int(len(rows))), manifest, on_error, encoder)


def _finish(extraction: Extraction, manifest: Manifest, on_error: str, encoder: Encoder | None = None) -> Extraction:
    """`data.on_error=raise` also stops on failed rows kept from an earlier extraction."""
    if on_error == "raise" and not extraction.valid.all():
        skipped = extraction.cached.skipped()
        if skipped:
            row, path, reason = skipped[0]
        else:  # an entry without its list: name the file from the manifest
            row = int(np.flatnonzero(~extraction.valid)[0])
            path, reason = str(manifest.paths()[row]), "could not be loaded"
        if encoder is not None and encoder.precomputed:  # no image involved: the HDF5 key and files
            raise DataError(
                f"key {path!r}: {reason} (row {row}, recorded when these files were read; data.on_error=raise; "
                "add or fix the HDF5 file holding this key in encoder.files (changed or added files are read "
                "again), or use data.on_error=skip to skip and count rows without a usable embedding)"
            )
        if not reason.startswith(path):
            reason = f"{path}: {reason}"
        raise ImageLoadError(
            f"{reason} (row {row}, failed in an earlier extraction and unchanged since; data.on_error=raise; "
            "fix the file (changed files are read again), set data.retry_failed=true to retry it as it is, "
            "or use data.on_error=skip to skip and count unreadable files)"
        )
    return extraction


def _predict(encoder, manifest, partial, rows, cfg, on_error) -> None:
    paths = manifest.paths()
    transform = encoder.transform()
    dataset = ImageRows(paths, rows, transform, _probe_shape(transform))
    trainer = make_trainer(cfg, [ArrayWriter(partial, paths, on_error)])
    channels_last = prepare_encoder(encoder, cfg)
    module = EmbeddingModule(encoder, channels_last, bool(cfg.get("compile", False)))
    trainer.predict(module, dataloaders=make_loader(dataset, cfg), return_predictions=False)


def make_loader(dataset: Dataset, cfg, collate_fn=None) -> DataLoader:
    workers = int(cfg.num_workers)
    return DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=int(cfg.get("prefetch_factor") or 2) if workers > 0 else None,
        collate_fn=collate_fn,
    )


def make_trainer(cfg, callbacks: list) -> L.Trainer:
    """The predict-only Trainer of an extraction (`cfg` = the `extract` config group)."""
    accelerator = str(cfg.accelerator)
    if cfg.progress:
        callbacks = [*callbacks, RichProgressBar(leave=True)]
    return L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        strategy=resolve_strategy(cfg.strategy, accelerator),
        precision=resolve_precision(str(cfg.precision), accelerator),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.progress),
        callbacks=callbacks,
        inference_mode=True,
    )


def prepare_encoder(encoder: Encoder, cfg) -> bool:
    """Eval mode, and NHWC weights when `extract.channels_last` (returned: the input must follow)."""
    encoder.eval()
    channels_last = bool(cfg.get("channels_last", True))
    if channels_last:
        encoder.to(memory_format=torch.channels_last)  # faster convolutions (oneDNN, cuDNN)
    return channels_last


def resolve_strategy(strategy, accelerator: str):
    """`ddp` launched from a single process runs only the predict loop in the rank processes
    (fork on CPU, spawn on GPU), never the whole script again: the caller alone holds the
    cache lock and commits the entry, each rank writes its own rows (Lightning's predict
    sampler does not pad, so no row is written twice). Under torchrun/Slurm, Lightning's
    own environment handling applies."""
    if str(strategy) != "ddp" or _launched_externally():
        return strategy
    from lightning.pytorch.strategies import DDPStrategy

    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return DDPStrategy(start_method="spawn" if gpu else "fork")


def _launched_externally() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _probe_shape(transform) -> tuple[int, ...]:
    """Output shape of the transform, used for the placeholder tensor of a failed image."""
    from PIL import Image

    return tuple(transform(Image.new("L", (32, 32))).shape)
