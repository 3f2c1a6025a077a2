"""The encoder interface every library wrapper implements.

An encoder is a torch module mapping a preprocessed batch (B, C, H, W) to embeddings (B, dim),
plus what the pipeline needs around it: the per-image transform (PIL image -> tensor), the
facts that determine its output (for the embedding cache key) and facts to log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)


class EncoderError(RuntimeError):
    """An encoder that cannot be built or loaded; the message says how to fix it."""


class Encoder(torch.nn.Module):
    name: str = "encoder"
    dim: int = 0
    # True for encoders that read stored embeddings (`fill(manifest, partial, rows, on_error)`)
    # instead of embedding images: extraction then opens no image and runs no model
    precomputed: bool = False

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
                f"encoder.weights={weights}: no such file; give the path of a local .safetensors or .pth file"
            )
        st = p.stat()
        return {"weights": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if pretrained:
        return {"weights": "pretrained"}
    # random weights depend on the torch seed at construction (cbir.run seeds it from `seed`)
    return {"weights": "random-init", "seed": torch.initial_seed()}


class PretrainedEncoder(Encoder):
    """Shared plumbing of the neural encoders: config facts, weights identity, preprocessing,
    the dim check, and what `info()` logs. Subclasses build `self.model` and `forward`."""

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        weights: str | None = None,
        dim: int | None = None,
        preprocess: Any = None,
        input_size: int | None = None,
        pool: str | None = None,
        source: str | None = None,
        license: str | None = None,
    ) -> None:
        super().__init__()
        from cbir.encoders.preprocess import Preprocess

        self.name = name
        self.pretrained = bool(pretrained)
        self.weights = str(weights) if weights else None
        self.expected_dim = None if dim is None else int(dim)
        self.preprocess = Preprocess.from_config(preprocess)
        self.input_size = int(input_size) if input_size else self.preprocess.crop
        self.pool = pool
        self.source = source
        self.license = license
        self._weights_id = weights_identity(self.weights, self.pretrained)

    def record_hub_weights(self, repo_id: str | None, commit: str | None) -> None:
        """Identify pretrained hub weights by the commit they were loaded from (the tag alone
        would let a new upload reuse embeddings of the old weights)."""
        self._weights_id = {"weights": "pretrained", "hub_id": repo_id, "commit": commit}
        if commit:
            log.info("encoder %s: weights %s at commit %s", self.name, repo_id, commit)
        else:
            log.warning(
                "encoder %s: cannot tell which revision of %s was loaded; its embedding cache key "
                "names the model only (pin one with encoder.revision=<commit>)",
                self.name,
                repo_id,
            )

    def check_dim(self, actual: int) -> None:
        self.dim = int(actual)
        if self.expected_dim is not None and self.expected_dim != self.dim:
            raise EncoderError(f"encoder {self.name}: config says dim={self.expected_dim}, model gives {self.dim}")

    def transform(self):
        return self.preprocess.build()

    def model_identity(self) -> dict[str, Any]:
        """What, besides weights, pooling and preprocessing, fixes the embedding."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        identity = {
            "class": type(self).__name__,
            **self.model_identity(),
            **self._weights_id,
            "pool": self.pool,
            "preprocess": self.preprocess.as_dict(),
        }
        if identity.get("commit"):  # the resolved commit says it all: a pin to it is the same weights
            identity.pop("revision", None)
        return identity

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "input_size": self.input_size,
            "source": self.source or "unknown",
            "license": self.license or "unknown",
            "weights": self._weights_id["weights"],
            "weights_commit": self._weights_id.get("commit") or "n/a",
            "pool": self.pool or "default",
        }
