"""Shared extraction: one pass over the manifest feeds several encoders. (One module past 300
lines on purpose: the dataset, the Lightning module and the writer of the shared pass only make
sense together.)

Each image is read and decoded once; every distinct preprocessing of the group (resize, crop,
normalisation, size) is applied to that one decoded image, and every encoder writes its rows
into its own cache entry, under the key and through the store calls a single-encoder
extraction uses (`cache_key`, `EmbeddingStore.load_fresh` / `open_partial` / `commit`,
`entry_meta`), so a later single run is a cache hit and an interrupted pass resumes per encoder.

With `extract.device_preprocess=true` the loader workers only decode (uint8 tensors); resize,
crop and normalisation run on the encoders' device, on stacks of equally sized images.

Every decode is counted (one per dataset item) and the time of each part is measured:
decode and preprocess in the loader workers, forward and write per encoder.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from cbir.data.images import ImageLoadError, load_image
from cbir.data.manifest import Manifest
from cbir.encoders.base import Encoder
from cbir.extract.single import (
    ArrayWriter,
    Extraction,
    cache_key,
    entry_meta,
    make_loader,
    make_trainer,
    prepare_encoder,
)
from cbir.extract.store import CacheLookup, EmbeddingStore

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- inputs
@dataclass
class InputPlan:
    """How the decoded image becomes each encoder's input.

    `worker_transforms` run in the loader workers on the decoded PIL image (full transforms,
    or only mode conversion + uint8 tensor when preprocessing runs on the device);
    `device_steps[i] = (worker input, tensor steps or None)` build prepared input i on the
    device; `encoder_input[e]` is the prepared input encoder e reads."""

    worker_transforms: list
    device_steps: list[tuple[int, object]] | None
    encoder_input: list[int]


def plan_inputs(encoders: list[Encoder], on_device: bool) -> InputPlan:
    """Encoders with equal preprocessing share one input tensor."""
    worker: list = []
    worker_ids: dict[str, int] = {}
    steps: list = []
    prepared_ids: dict[str, int] = {}
    encoder_input = []
    for encoder in encoders:
        pre = getattr(encoder, "preprocess", None)
        signature = json.dumps(pre.as_dict(), sort_keys=True, default=str) if pre is not None else f"id{id(encoder)}"
        if signature not in prepared_ids:
            if on_device and pre is not None:
                mode_key = f"mode:{pre.image_mode}"
                if mode_key not in worker_ids:
                    worker_ids[mode_key] = len(worker)
                    worker.append(decode_only(pre.image_mode))
                steps.append((worker_ids[mode_key], T.Compose(pre.tensor_steps())))
            else:  # whole transform in the workers (on the device only stacked)
                worker.append(encoder.transform())
                steps.append((len(worker) - 1, None))
            prepared_ids[signature] = len(steps) - 1
        encoder_input.append(prepared_ids[signature])
    if on_device:
        return InputPlan(worker, steps, encoder_input)
    return InputPlan(worker, None, encoder_input)  # worker input i is prepared input i


def decode_only(mode: str):
    from cbir.encoders.preprocess import _ToMode

    return T.Compose([_ToMode(mode), T.PILToTensor()])


class SharedImageRows(Dataset):
    """Yields (row, inputs, ok, error, seconds): one decode, then each worker transform; `ok[k]`
    says whether worker input k was made (a failed decode fails them all).
    `seconds` = [decode, transform 0, transform 1, ...] for the timing split."""

    def __init__(self, paths: list[Path], rows: np.ndarray, transforms: list) -> None:
        self.paths, self.rows, self.transforms = paths, rows, transforms
        probe = Image.new("L", (32, 32))
        self.placeholders = tuple(torch.zeros_like(t(probe)) for t in transforms)  # inputs of a failed image

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        seconds = torch.zeros(1 + len(self.transforms), dtype=torch.float64)
        start = time.perf_counter()
        ok = torch.ones(len(self.transforms), dtype=torch.bool)  # per worker input: its encoders' rows
        try:
            image = load_image(self.paths[row])  # the one decode of this image
        except ImageLoadError as e:
            return row, self.placeholders, ~ok, str(e), seconds
        seconds[0] = time.perf_counter() - start
        inputs, error = [], ""
        for k, transform in enumerate(self.transforms):
            start = time.perf_counter()
            try:
                inputs.append(transform(image))
            except Exception as e:  # a transform failing on an odd image fails only its own encoders,
                ok[k] = False  # as in a single-encoder extraction
                inputs.append(self.placeholders[k])
                error = error or f"{self.paths[row]}: {type(e).__name__}: {e}"
            seconds[1 + k] = time.perf_counter() - start
        return row, tuple(inputs), ok, error, seconds


def collate_unstacked(items):
    """Rows, ok, errors and timings stacked; images kept as lists (sizes differ)."""
    rows, inputs, ok, errors, seconds = zip(*items)
    per_input = tuple(list(images) for images in zip(*inputs))
    return torch.tensor(rows), per_input, torch.stack(ok), list(errors), torch.stack(seconds)


def prepare_on_device(images: list[torch.Tensor], steps) -> torch.Tensor:
    """Run the tensor steps on stacks of equally sized images, then stack in batch order."""
    out: list = [None] * len(images)
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[tuple(image.shape)].append(i)
    for members in by_shape.values():
        prepared = steps(torch.stack([images[i] for i in members]))
        for j, i in enumerate(members):
            out[i] = prepared[j]
    return torch.stack(out)


# ----------------------------------------------------------------------------- model + writer
class SharedEmbeddingModule(L.LightningModule):
    def __init__(self, encoders: list[Encoder], plan: InputPlan, channels_last: bool, compile: bool) -> None:
        super().__init__()
        self.encoders = torch.nn.ModuleList(encoders)
        self.plan, self.channels_last = plan, channels_last
        # torch.compile wraps each module; the wrappers share the encoders' parameters
        self.forward_fns = [torch.compile(e) if compile else e for e in encoders]
        self.forward_seconds = np.zeros(len(encoders))
        self.preprocess_seconds = 0.0

    def predict_step(self, batch, batch_idx):
        rows, inputs, ok, errors, seconds = batch
        if self.plan.device_steps is not None:
            start = time.perf_counter()
            with torch.autocast(self.device.type, enabled=False):
                inputs = [
                    prepare_on_device(inputs[src], steps) if steps is not None else torch.stack(inputs[src])
                    for src, steps in self.plan.device_steps
                ]
            self._sync()
            self.preprocess_seconds += time.perf_counter() - start
        embeddings = []
        for e, (forward, k) in enumerate(zip(self.forward_fns, self.plan.encoder_input)):
            start = time.perf_counter()
            images = inputs[k]
            if self.channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            embeddings.append(forward(images).float())
            self._sync()
            self.forward_seconds[e] += time.perf_counter() - start
        return {"rows": rows, "embeddings": embeddings, "ok": ok, "errors": errors, "seconds": seconds}

    def _sync(self) -> None:
        if self.device.type == "cuda":  # honest per-encoder times (the writer syncs each batch anyway)
            torch.cuda.synchronize(self.device)


class SharedArrayWriter(BasePredictionWriter):
    """Writes each batch into every encoder's partial entry, only rows that entry still needs.
    Under DDP each rank writes its own rows into every array (the writers reopen the on-disk
    arrays in spawned ranks, as the single-encoder writer does)."""

    def __init__(self, writers: list[ArrayWriter], needed: list[np.ndarray], columns: list[int]) -> None:
        super().__init__(write_interval="batch")
        self.writers, self.needed = writers, needed
        self.columns = columns  # encoder e's rows loaded when worker input columns[e] was made
        self.decodes = 0
        self.worker_seconds: np.ndarray | None = None
        self.write_seconds = np.zeros(len(writers))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = prediction["rows"].cpu().numpy()
        ok = prediction["ok"].cpu().numpy().astype(bool)
        errors = list(prediction["errors"])
        seconds = prediction["seconds"].cpu().numpy().sum(0)
        self.worker_seconds = seconds if self.worker_seconds is None else self.worker_seconds + seconds
        self.decodes += len(rows)
        failure = None
        for e, (writer, needed, values) in enumerate(zip(self.writers, self.needed, prediction["embeddings"])):
            start = time.perf_counter()
            keep = needed[rows]
            if keep.any():
                picked = np.flatnonzero(keep)
                try:
                    writer.write(
                        rows[picked],
                        values.detach().cpu().numpy()[picked],
                        ok[picked, self.columns[e]],
                        [errors[i] for i in picked],
                    )
                except ImageLoadError as err:  # every encoder keeps this batch's good rows first
                    failure = failure or err
            self.write_seconds[e] += time.perf_counter() - start
        if failure is not None:
            raise failure

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            log.info("rank %d decoded %d images for %d encoders", trainer.global_rank, self.decodes, len(self.writers))


# ----------------------------------------------------------------------------- the pass
@dataclass
class SharedPass:
    extractions: dict[str, Extraction]  # by cache key, for every encoder given
    decodes: int | None  # images decoded in this pass (None: counted in DDP ranks, see their logs)
    seconds: float
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # per encoder: decode/preprocess/forward/write

    @property
    def extracted(self) -> list[str]:
        return [k for k, x in self.extractions.items() if not x.cache_hit]


def extract_shared(
    encoders: list[Encoder],
    manifest: Manifest,
    store: EmbeddingStore,
    cfg,
    on_error: str = "skip",
    retry_failed: bool = False,
    files: np.ndarray | None = None,
    looked_up: dict[str, CacheLookup] | None = None,
) -> SharedPass:
    """Embeddings of every manifest row for every encoder, from the cache or extracted now in
    one shared pass (holding the lock of each key extracted, so parallel jobs wait for it). As in
    `extract_embeddings`, an entry is fresh when no row's file changed since it was written (and,
    under `retry_failed`, no row failed); `files` = `manifest.file_stats()` when already taken,
    `looked_up` = the caller's own `EmbeddingStore.load_fresh` of some keys: each entry is read
    once, and again only if another job changed it meanwhile."""
    start = time.perf_counter()
    files = manifest.file_stats() if files is None else files
    keys = [cache_key(encoder, manifest) for encoder in encoders]
    by_key = dict(zip(keys, encoders))  # an encoder listed twice is extracted once
    result = SharedPass({}, 0, 0.0)
    found = dict(looked_up or {})

    with ExitStack() as locks:
        for key in sorted(by_key):  # one lock order for every process: no deadlock
            found[key] = store.load_fresh(key, files, retry_failed, known=found.get(key))
            if not found[key].fresh:
                locks.enter_context(store.lock(key))
                # another job may have finished it while we waited
                found[key] = store.load_fresh(key, files, retry_failed, known=found[key])
        for key in by_key:
            if found[key].fresh:
                result.extractions[key] = Extraction(found[key].entry, True, 0.0, 0)
        todo = [key for key in sorted(by_key) if not found[key].fresh]
        if todo:
            partials = [
                store.open_partial(
                    key, len(manifest), by_key[key].dim, files, base=found[key].entry, retry_failed=retry_failed
                )
                for key in todo
            ]
            needed = [np.asarray(p.done) == 0 for p in partials]  # per encoder: resume where it stopped
            for key, need in zip(todo, needed):
                if 0 < need.sum() < len(manifest):
                    log.info("resuming extraction %s: %d of %d rows left", key, int(need.sum()), len(manifest))
            result.decodes, result.timings = _run_pass(
                [by_key[k] for k in todo], partials, needed, manifest, cfg, on_error
            )
            for key, partial, need in zip(todo, partials, needed):
                cached = store.commit(key, partial, entry_meta(key, by_key[key], manifest))
                result.extractions[key] = Extraction(cached, False, time.perf_counter() - start, int(need.sum()))
    result.seconds = time.perf_counter() - start
    if todo:
        names = ", ".join(by_key[k].name for k in todo)
        decoded = "in the DDP ranks (see their lines)" if result.decodes is None else f"{result.decodes} images"
        log.info(
            "shared extraction: decoded %s once for %d encoders (%s) in %.1f s",
            decoded,
            len(todo),
            names,
            result.seconds,
        )
    return result


def _run_pass(encoders, partials, needed, manifest, cfg, on_error):
    paths = manifest.paths()
    rows = np.flatnonzero(np.logical_or.reduce(needed))
    if not len(rows):
        return 0, {}
    plan = plan_inputs(encoders, bool(cfg.get("device_preprocess", False)))
    dataset = SharedImageRows(paths, rows, plan.worker_transforms)
    columns = [plan.device_steps[k][0] if plan.device_steps is not None else k for k in plan.encoder_input]
    writer = SharedArrayWriter([ArrayWriter(p, paths, on_error) for p in partials], needed, columns)
    trainer = make_trainer(cfg, [writer])
    channels_last = False
    for encoder in encoders:
        channels_last = prepare_encoder(encoder, cfg)
    module = SharedEmbeddingModule(encoders, plan, channels_last, bool(cfg.get("compile", False)))
    collate = collate_unstacked if plan.device_steps is not None else None
    trainer.predict(module, dataloaders=make_loader(dataset, cfg, collate), return_predictions=False)
    if trainer.world_size > 1:
        return None, {}
    return writer.decodes, _timings(encoders, plan, writer, module)


def _timings(encoders, plan: InputPlan, writer: SharedArrayWriter, module: SharedEmbeddingModule) -> dict:
    """Seconds per encoder; a shared decode or preprocessing is split evenly among its users."""
    worker = writer.worker_seconds if writer.worker_seconds is not None else np.zeros(1 + len(plan.worker_transforms))
    users = np.bincount(plan.encoder_input, minlength=len(plan.encoder_input))
    out = {}
    for e, encoder in enumerate(encoders):
        k = plan.encoder_input[e]
        if plan.device_steps is None:
            preprocess = worker[1 + k] / users[k]
        else:  # workers converted the mode; the device did the rest (its time split by input)
            src = plan.device_steps[k][0]
            sharing = sum(1 for s, _ in plan.device_steps if s == src)
            preprocess = worker[1 + src] / sharing / users[k] + module.preprocess_seconds / len(encoders)
        out[encoder.name] = {
            "decode": float(worker[0]) / len(encoders),
            "preprocess": float(preprocess),
            "forward": float(module.forward_seconds[e]),
            "write": float(writer.write_seconds[e]),
        }
    return out
