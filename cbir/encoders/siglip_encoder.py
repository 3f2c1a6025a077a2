"""SigLIP image towers (MedSigLIP) through transformers `SiglipVisionModel`.

SigLIP has no class token: its image embedding is the attention-pooling head's output
(`pooler_output`), which is what `SiglipModel.get_image_features` returns. `pool=mean` takes the
mean of the last hidden states instead. Weights: the hub repo's full SiglipModel checkpoint (the
vision tower's `vision_model.*` keys are used) or a local file with the same layout.
The text tower (text queries, zero-shot) is built separately from the config's `text` block
(cbir.encoders.text), only when a text evaluation asks for it.
"""

from __future__ import annotations

from typing import Any

import torch

from cbir.encoders.base import EncoderError
from cbir.encoders.transformers_encoder import TransformersEncoder


class SiglipEncoder(TransformersEncoder):
    def __init__(
        self, name: str, model_class: str = "SiglipVisionModel", pool: str | None = None, text: Any = None, **kwargs
    ) -> None:
        if pool not in (None, "mean"):
            raise EncoderError(
                f"encoder {name}: encoder.pool={pool}: SigLIP has no class token; use null (the "
                "attention-pooling head, as get_image_features) or mean"
            )
        self._siglip_pool = pool
        super().__init__(name, model_class, pool=pool, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        if self._siglip_pool == "mean":
            return out.last_hidden_state.mean(1)
        return out.pooler_output
