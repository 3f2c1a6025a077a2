"""timm models (ResNet, ViT, DINOv2, SAM, Swin, ...) as encoders.

Default embedding: timm's pooled pre-logits feature (`num_classes=0`): global average pool for
CNNs, CLS after the final norm for ViTs. `pool=cls|mean|gem` pools `forward_features` instead.
Weights: the timm hub tag (`pretrained=true`), a local file (`weights=`, read without
unpickling and remapped by the model family's own checkpoint filter, e.g. segment-anything or
original-Swin layouts), or random (`pretrained=false`, no network).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from cbir.encoders.base import EncoderError, PretrainedEncoder
from cbir.encoders.hub import (
    cached_commit,
    load_into,
    missing_weights_error,
    no_hub_error,
    prepare_hub_access,
    read_state_dict,
)
from cbir.encoders.pooling import normalise_pool, pool_map, pool_tokens


class TimmEncoder(PretrainedEncoder):
    def __init__(
        self,
        model_name: str,
        name: str | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        pool: str | None = None,
        dim: int | None = None,
        preprocess: Any = None,
        model_kwargs: Any = None,
        input_size: int | None = None,
        source: str | None = None,
        license: str | None = None,
        weights_from: str | None = None,
        revision: str | None = None,
    ) -> None:
        name = name or model_name
        super().__init__(
            name,
            pretrained,
            weights,
            dim,
            preprocess,
            input_size,
            normalise_pool(pool, name),
            source or f"timm {model_name}",
            license,
        )
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.weights_from = weights_from
        self.revision = revision
        self.model = self.build_model()
        self.model.eval()
        self.check_dim(self.embedding_dim())

    # ------------------------------------------------------------------ building
    def build_model(self) -> torch.nn.Module:
        import timm

        if not timm.is_model(self.model_name):
            raise EncoderError(f"encoder {self.name}: timm has no model '{self.model_name}'")
        kwargs = dict(num_classes=0, **self.model_kwargs)
        if self.weights:
            model = timm.create_model(self.model_name, pretrained=False, **kwargs)
            self.load_weights(model, read_state_dict(self.weights, self.name))
            return model
        if not self.pretrained:
            return timm.create_model(self.model_name, pretrained=False, **kwargs)
        if self.weights_from:
            raise no_hub_error(self.name, self.weights_from)
        prepare_hub_access()
        hub_id = timm.models.get_pretrained_cfg(self.model_name).hf_hub_id
        if self.revision:
            if not hub_id:
                raise EncoderError(
                    f"encoder {self.name}: encoder.revision needs weights on the Hugging Face hub; "
                    f"timm has no hub repo for '{self.model_name}'"
                )
            kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": f"{hub_id}@{self.revision}"}
        try:
            model = timm.create_model(self.model_name, pretrained=True, **kwargs)
        except Exception as e:  # hub, network and file errors come in many types
            raise missing_weights_error(self.name, f"'{hub_id or self.model_name}' (timm {self.model_name})", e) from e
        # timm reads hub weights through the hub cache: its refs name the commit it used
        self.record_hub_weights(hub_id, cached_commit(hub_id, self.revision) if hub_id else None)
        return model

    def load_weights(self, model: torch.nn.Module, state_dict: dict) -> None:
        """Remap with the timm family's checkpoint filter (original layouts), then load."""
        family = sys.modules[type(model).__module__]
        remap = getattr(family, "checkpoint_filter_fn", None)
        if remap is not None:
            state_dict = remap(state_dict, model)
        load_into(model, state_dict, self.name, str(self.weights))

    def embedding_dim(self) -> int:
        if self.pool is None:
            return int(self.model.num_features)
        with torch.no_grad():
            size = self.input_size
            return int(self.forward(torch.zeros(1, 3, size, size)).shape[1])

    # ------------------------------------------------------------------ embedding
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return self.model(images)
        features = self.model.forward_features(images)
        if features.ndim == 3:
            prefix = getattr(self.model, "num_prefix_tokens", 0)
            return pool_tokens(features, self.pool, prefix, self.name)
        return pool_map(features, self.pool, self.name)

    def model_identity(self) -> dict:
        return {"model_name": self.model_name, "model_kwargs": self.model_kwargs, "revision": self.revision}
