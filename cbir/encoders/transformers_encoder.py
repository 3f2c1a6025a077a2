"""Hugging Face transformers vision models (MAE, RAD-DINO, DINOv2, ...) and MedCLIP's image
tower as encoders.

`TransformersEncoder` builds `transformers.<model_class>(<config_class>(**model_config))`, or
loads the hub checkpoint with the same config overrides (e.g. `mask_ratio=0.0` for MAE).
Embedding: CLS of the last hidden state (after the final LayerNorm), or `pool=mean` for the
mean of the patch tokens.

`MedClipEncoder` is MedCLIP's `MedCLIPVisionModelViT` rebuilt from transformers parts: the
`medclip` package does not import under transformers 5 and always downloads in its
constructors. Despite its name the model is a Swin-T (`SwinModel`) whose pooled output goes
through `Linear(768, 512, bias=False)`; MedCLIP L2-normalises the result.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cbir.encoders.base import EncoderError, PretrainedEncoder
from cbir.encoders.hub import (
    cached_commit,
    load_into,
    missing_weights_error,
    no_hub_error,
    prepare_hub_access,
    read_state_dict,
    strip_prefix,
)
from cbir.encoders.pooling import normalise_pool, pool_tokens


class TransformersEncoder(PretrainedEncoder):
    def __init__(
        self,
        name: str,
        model_class: str,
        hub_id: str | None = None,
        revision: str | None = None,
        model_config: Any = None,
        pretrained: bool = True,
        weights: str | None = None,
        pool: str | None = None,
        dim: int | None = None,
        preprocess: Any = None,
        input_size: int | None = None,
        source: str | None = None,
        license: str | None = None,
    ) -> None:
        super().__init__(
            name,
            pretrained,
            weights,
            dim,
            preprocess,
            input_size,
            normalise_pool(pool, name, allowed=("cls", "mean")),
            source,
            license,
        )
        import transformers

        self.model_class, self.hub_id, self.revision = model_class, hub_id, revision
        self.model_config = dict(model_config or {})
        cls = getattr(transformers, model_class, None)
        if cls is None:
            raise EncoderError(f"encoder {name}: transformers has no model class '{model_class}'")
        self.model = self._build(cls)
        if getattr(self.model.config, "mask_ratio", 0.0) != 0.0:
            raise EncoderError(
                f"encoder {name}: mask_ratio={self.model.config.mask_ratio} drops random patches, "
                "so embeddings would change from call to call; set model_config.mask_ratio=0.0"
            )
        self.model.eval()
        self.check_dim(self.model.config.hidden_size)

    def _build(self, cls) -> torch.nn.Module:
        if self.pretrained and not self.weights:
            if not self.hub_id:
                raise EncoderError(f"encoder {self.name}: no hub_id configured; pass encoder.weights=<file>")
            prepare_hub_access()
            try:
                model = cls.from_pretrained(self.hub_id, revision=self.revision, **self.model_config)
            except Exception as e:  # OSError offline, HTTP errors online: same two fixes
                raise missing_weights_error(self.name, f"'{self.hub_id}' (transformers {cls.__name__})", e) from e
            # the snapshot transformers read the files from
            commit = getattr(model.config, "_commit_hash", None) or cached_commit(self.hub_id, self.revision)
            self.record_hub_weights(self.hub_id, commit)
            return model
        model = cls(cls.config_class(**self.model_config))
        if self.weights:
            state_dict = read_state_dict(self.weights, self.name)
            # checkpoints of task models (e.g. *ForImageClassification) nest the backbone
            state_dict = strip_prefix(state_dict, f"{model.base_model_prefix}.")
            load_into(model, state_dict, self.name, self.weights)
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.model_class == "ViTMAEModel":
            # with mask_ratio=0 MAE still shuffles the patch order by random noise; fixed noise
            # keeps the identity order, so outputs are bit-identical from call to call
            n = self.model.embeddings.patch_embeddings.num_patches
            kwargs["noise"] = torch.arange(n, dtype=images.dtype, device=images.device).expand(len(images), n)
        tokens = self.model(pixel_values=images, **kwargs).last_hidden_state
        return pool_tokens(tokens, self.pool or "cls", 1, self.name)

    def model_identity(self) -> dict:
        return {
            "model_class": self.model_class,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "model_config": self.model_config,
        }


class MedClipVision(torch.nn.Module):
    """Attribute names match MedCLIP checkpoints (`vision_model.model.*`, `vision_model.projection_head.*`)."""

    def __init__(self, swin_config: dict, projection_dim: int) -> None:
        super().__init__()
        from transformers import SwinConfig, SwinModel

        self.model = SwinModel(SwinConfig(**swin_config))
        self.projection_head = torch.nn.Linear(self.model.config.hidden_size, projection_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:  # MedCLIP feeds one grey channel, repeated to three
            images = images.repeat(1, 3, 1, 1)
        pooled = self.model(pixel_values=images).pooler_output
        return F.normalize(self.projection_head(pooled), dim=-1)


class MedClipEncoder(PretrainedEncoder):
    def __init__(
        self,
        name: str = "medclip",
        swin_config: Any = None,
        projection_dim: int = 512,
        pretrained: bool = True,
        weights: str | None = None,
        weights_from: str | None = None,
        pool: str | None = None,
        dim: int | None = None,
        preprocess: Any = None,
        input_size: int | None = None,
        source: str | None = None,
        license: str | None = None,
    ) -> None:
        if pool is not None:
            raise EncoderError(f"encoder {name}: encoder.pool is not supported; the embedding is MedCLIP's projection")
        super().__init__(name, pretrained, weights, dim, preprocess, input_size, None, source, license)
        self.swin_config = dict(swin_config or {})
        self.projection_dim = int(projection_dim)
        if self.pretrained and not self.weights:
            raise no_hub_error(name, weights_from or "")
        self.model = MedClipVision(self.swin_config, self.projection_dim)
        if self.weights:
            state_dict = read_state_dict(self.weights, name)
            if any(k.startswith("vision_model.") for k in state_dict):  # full MedCLIPModel checkpoint
                state_dict = strip_prefix(state_dict, "vision_model.", keep_others=False)
            load_into(self.model, state_dict, name, self.weights)
        self.model.eval()
        self.check_dim(self.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def model_identity(self) -> dict:
        return {"swin_config": self.swin_config, "projection_dim": self.projection_dim}
