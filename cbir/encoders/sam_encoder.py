"""SAM-family image encoders (SAM, MedSAM) through timm's `samvit_*` models.

Embedding: the 256-channel neck map of the image encoder, averaged over the image area only.
SAM's input is the image resized to the longest side and zero-padded to a square; averaging the
padded cells too (as the study's code did) mixes a constant border into every embedding, more
so the less square the image. The preprocessing appends a validity channel
(`preprocess.valid_mask=true`); without it (MedSAM squashes to a square) every cell counts.
timm remaps segment-anything checkpoints (`image_encoder.*`, e.g. `medsam_vit_b.pth`) itself.
"""

from __future__ import annotations

import torch

from cbir.encoders.pooling import cell_mask, normalise_pool, pool_map
from cbir.encoders.timm_encoder import TimmEncoder


class SamEncoder(TimmEncoder):
    def __init__(self, model_name: str = "samvit_base_patch16", pool: str | None = None, **kwargs) -> None:
        normalise_pool(pool, kwargs.get("name") or model_name, allowed=("mean", "gem"))
        super().__init__(model_name=model_name, pool=pool, **kwargs)

    def embedding_dim(self) -> int:
        return int(self.model.num_features)  # neck channels (256)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        valid = None
        if images.shape[1] == 4:  # image + validity channel from the longest_pad preprocessing
            images, valid = images[:, :3], images[:, 3:]
        features = self.model.forward_features(images)  # (B, 256, H/16, W/16)
        mask = None if valid is None else cell_mask(valid, tuple(features.shape[-2:]))
        return pool_map(features, self.pool or "mean", self.name, mask)
