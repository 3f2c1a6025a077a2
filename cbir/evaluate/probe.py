"""Linear probe on frozen, cached embeddings (SPEC section 9, the study's `linear_probing.py`).

One `Linear(dim, classes)` (weights N(0, init_std), bias 0) trained with Lightning's
`Trainer.fit`: AdamW, cross-entropy, after each epoch the validation accuracy (arg-max); the
weights of the best epoch by validation accuracy are kept (a later epoch must beat it strictly)
and training stops after `patience` epochs without improvement. Test predictions are softmax
probabilities. Embeddings are read batch by batch from the memory-mapped cache, L2-normalised as
for retrieval (`normalise`).
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn
from torch.nn import functional as F
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)

log = logging.getLogger(__name__)


class EmbeddingRows(Dataset):
    """Rows of the memory-mapped embedding array with their class codes; indexed by a whole
    batch of positions at once (one fancy-indexed read per batch)."""

    def __init__(self, embeddings: np.ndarray, rows: np.ndarray, codes: np.ndarray, normalise: bool = True):
        self.embeddings, self.rows, self.codes, self.normalise = (
            embeddings,
            np.asarray(rows),
            np.asarray(codes),
            normalise,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions):
        positions = np.asarray(positions)
        x = np.asarray(self.embeddings[self.rows[positions]], dtype=np.float32)
        if self.normalise:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return torch.from_numpy(x), torch.from_numpy(self.codes[positions].astype(np.int64))


def loader(data: EmbeddingRows, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    order = RandomSampler(data, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(data)
    return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


class LinearProbe(L.LightningModule):
    def __init__(self, dim: int, n_classes: int, lr: float = 1e-3, weight_decay: float = 0.01, init_std: float = 0.01):
        super().__init__()
        self.linear = nn.Linear(dim, n_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.linear.bias)
        self.lr, self.weight_decay = lr, weight_decay
        self.history: list[dict] = []  # one row per epoch: epoch, train_loss, train_acc, val_loss, val_acc
        self._sums: dict[str, list[float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def _step(self, stage: str, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)  # = cross-entropy on the one-hot targets
        sums = self._sums.setdefault(stage, [0.0, 0.0, 0.0])  # loss * rows, correct, rows
        sums[0] += float(loss.detach()) * len(y)
        sums[1] += float((logits.detach().argmax(1) == y).sum())
        sums[2] += len(y)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._step("val", batch)

    def _epoch_values(self, stage: str) -> dict[str, float]:
        loss_sum, correct, rows = self._sums.pop(stage, [0.0, 0.0, 0.0])
        return {f"{stage}_loss": loss_sum / rows, f"{stage}_acc": correct / rows} if rows else {}

    def on_validation_epoch_end(self):
        values = self._epoch_values("val")
        self._val = values
        if values:
            self.log("val_acc", values["val_acc"])  # read by EarlyStopping and KeepBest

    def on_train_epoch_end(self):  # runs after the epoch's validation
        self.history.append({"epoch": self.current_epoch, **self._epoch_values("train"), **getattr(self, "_val", {})})
        self._val = {}


class KeepBest(Callback):
    """The weights of the epoch with the highest validation accuracy (strictly better wins),
    kept in memory: nothing is written or unpickled."""

    def __init__(self) -> None:
        self.best, self.epoch, self.state = -np.inf, None, None

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or "val_acc" not in trainer.callback_metrics:
            return
        accuracy = float(trainer.callback_metrics["val_acc"])
        if accuracy > self.best:
            self.best, self.epoch = accuracy, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(
    embeddings: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    n_classes: int,
    cfg,
    seed: int,
) -> tuple[LinearProbe, pd.DataFrame, int]:
    """Train on (rows, codes) of `train`, select on `val` (None: keep the last epoch).
    Returns the module with the selected weights, the per-epoch history and the selected epoch."""
    L.seed_everything(seed, verbose=False)
    normalise = bool(cfg.get("normalise", True))
    module = LinearProbe(
        int(embeddings.shape[1]), n_classes, float(cfg.lr), float(cfg.weight_decay), float(cfg.init_std)
    )
    batch = int(cfg.batch_size)
    train_loader = loader(EmbeddingRows(embeddings, *train, normalise), batch, shuffle=True, seed=seed)
    val_loader = loader(EmbeddingRows(embeddings, *val, normalise), batch, shuffle=False) if val else None
    keep = KeepBest()
    callbacks = [keep, EarlyStopping("val_acc", mode="max", patience=int(cfg.patience))] if val else []
    # process-wide torch settings, restored so later jobs of a multirun (extraction) keep theirs
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    trainer = L.Trainer(
        max_epochs=int(cfg.max_epochs),
        accelerator=str(cfg.accelerator),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        deterministic="warn",
    )  # deterministic kernels; only warn where CUDA has none
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    epoch = module.history[-1]["epoch"]
    if keep.state is not None:
        module.load_state_dict(keep.state)
        epoch = keep.epoch
    return module.cpu(), pd.DataFrame(module.history), int(epoch)


@torch.no_grad()
def predict(
    module: LinearProbe, embeddings: np.ndarray, rows: np.ndarray, batch_size: int = 4096, normalise: bool = True
) -> np.ndarray:
    """Softmax probabilities (len(rows), classes)."""
    module.eval()
    data = EmbeddingRows(embeddings, rows, np.zeros(len(rows), dtype=np.int64), normalise)
    out = [torch.softmax(module(x), dim=1).numpy() for x, _ in loader(data, batch_size, shuffle=False)]
    return np.concatenate(out) if out else np.zeros((0, module.linear.out_features))
