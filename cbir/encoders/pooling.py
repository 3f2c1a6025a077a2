"""Embedding heads over backbone outputs, for the `encoder.pool` override.

- token sequences (B, N, D) of ViT-family models: `cls` (first token) or `mean` (mean of the
  patch tokens, prefix tokens excluded);
- feature maps (B, C, H, W) of CNNs and SAM's neck: `mean` (global average, optionally over a
  validity mask) or `gem` (generalised mean, p=3). GeM needs non-negative features, so it is
  refused for token sequences, whose values are signed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cbir.encoders.base import EncoderError

POOLS = ("cls", "mean", "gem")
_ALIASES = {"token": "cls", "avg": "mean"}  # timm's names for the same heads


def normalise_pool(pool: str | None, encoder: str, allowed=POOLS) -> str | None:
    if pool is None:
        return None
    name = _ALIASES.get(str(pool), str(pool))
    if name not in allowed:
        raise EncoderError(
            f"encoder {encoder}: encoder.pool={pool}: use one of {', '.join(allowed)} "
            "or null for the model's standard head"
        )
    return name


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int, encoder: str) -> torch.Tensor:
    if pool == "cls":
        if num_prefix_tokens < 1:
            raise EncoderError(f"encoder {encoder}: encoder.pool=cls but the model has no class token")
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, num_prefix_tokens:].mean(1)
    raise EncoderError(
        f"encoder {encoder}: encoder.pool={pool} needs a CNN feature map; ViT tokens are signed, use cls or mean"
    )


def pool_map(fmap: torch.Tensor, pool: str, encoder: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool a (B, C, H, W) map; `mask` (B, 1, H, W) in {0, 1} restricts the average."""
    if pool == "cls":
        raise EncoderError(f"encoder {encoder}: encoder.pool=cls needs a class token; use mean or gem")
    if pool == "gem":
        fmap = fmap.clamp(min=1e-6).pow(3)
    if mask is None:
        pooled = fmap.mean((2, 3))
    else:
        pooled = (fmap * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)
    return pooled.pow(1 / 3) if pool == "gem" else pooled


def cell_mask(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Validity of each feature cell: a cell counts when any input pixel under it is image
    (with an input of S px and a grid of S/16 cells: the top-left ceil(h/16) x ceil(w/16))."""
    return F.adaptive_max_pool2d(valid, grid)
