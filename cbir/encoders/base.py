"""The encoder interface every library wrapper implements.

An encoder is a torch module mapping a preprocessed batch (B, C, H, W) to embeddings (B, dim),
plus what the pipeline needs around it: the per-image transform (PIL image -> tensor), the
facts that determine its output (for the embedding cache key) and facts to log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image


class EncoderError(RuntimeError):
    """An encoder that cannot be built or loaded; the message says how to fix it."""


class Encoder(torch.nn.Module):
    name: str = "encoder"
    dim: int = 0

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Everything that determines the embedding values (model, weights, preprocessing,
        head). Two encoders with equal identity must produce equal embeddings."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Facts worth logging: parameter count, dim, input size, source, licence."""
        return {
            "name": self.name,
            "dim": self.dim,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    def cache_key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_identity(weights: str | None, pretrained: bool) -> dict[str, Any]:
    """What identifies a set of weights without hashing gigabytes: a local file by its
    resolved path, size and modification time; hub weights by their tag."""
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise EncoderError(
                f"encoder.weights={weights}: no such file; give the path of a local "
                ".safetensors or .pth file"
            )
        st = p.stat()
        return {"weights": str(p.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}
    return {"weights": "pretrained" if pretrained else "random-init"}
