"""Ark / Ark+ chest X-ray Swin transformers (jlianglab/Ark) on timm's Swin.

Ark's model is timm's SwinTransformer plus a linear `projector` (and task heads not used for
embeddings); its embedding is the projector applied to the pooled backbone feature. The
weights are released by request only, so they come from a local file (`encoder.weights=`).
Ark was written for timm 0.5.4, whose Swin keeps `downsample` at the end of a stage; timm's
Swin checkpoint filter moves those keys to the current layout.
"""

from __future__ import annotations

import sys

import torch

from cbir.encoders.base import EncoderError
from cbir.encoders.hub import load_into, no_hub_error, read_state_dict
from cbir.encoders.timm_encoder import TimmEncoder


class ArkModel(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, projector_dim: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        width = int(backbone.num_features)
        self.projector = torch.nn.Linear(width, projector_dim) if projector_dim else torch.nn.Identity()
        self.num_features = int(projector_dim or width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))  # backbone(x): pooled pre-logits (num_classes=0)


class ArkEncoder(TimmEncoder):
    def __init__(self, projector_dim: int | None = 1376, **kwargs) -> None:
        self.projector_dim = int(projector_dim) if projector_dim else None
        if kwargs.get("pool") is not None:
            raise EncoderError("encoder ark: encoder.pool is not supported; the embedding is Ark's projector output")
        super().__init__(**kwargs)

    def build_model(self) -> torch.nn.Module:
        import timm

        if self.pretrained and not self.weights:
            raise no_hub_error(self.name, self.weights_from or "Request them from the model authors.")
        backbone = timm.create_model(self.model_name, pretrained=False, num_classes=0, **self.model_kwargs)
        model = ArkModel(backbone, self.projector_dim)
        if self.weights:
            state_dict = read_state_dict(self.weights, self.name)
            projector = {k[len("projector.") :]: v for k, v in state_dict.items() if k.startswith("projector.")}
            trunk = {k: v for k, v in state_dict.items() if not k.startswith(("projector.", "omni_heads."))}
            remap = sys.modules[type(backbone).__module__].checkpoint_filter_fn
            load_into(backbone, remap(trunk, backbone), self.name, str(self.weights))
            if self.projector_dim:
                load_into(model.projector, projector, self.name, f"{self.weights} (projector)")
        return model

    def model_identity(self) -> dict:
        return {**super().model_identity(), "projector_dim": self.projector_dim}
