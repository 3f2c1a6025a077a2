"""timm models (ResNet, ViT, DINOv2, MAE, ...) as encoders.

The embedding is timm's pooled pre-logits feature (`num_classes=0`): `pool=avg` for CNNs,
`pool=token` (CLS after the final norm) for ViTs.
"""

from __future__ import annotations

from typing import Any

import torch

from cbir.encoders.base import Encoder, EncoderError, weights_identity
from cbir.encoders.preprocess import Preprocess


class TimmEncoder(Encoder):
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
        source: str | None = None,
        license: str | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.name = name or model_name
        self.model_name = model_name
        self.pretrained = bool(pretrained)
        self.weights = weights
        self.pool = pool
        self.preprocess = Preprocess.from_config(preprocess)
        self.model_kwargs = dict(model_kwargs or {})
        self.source = source or f"timm {model_name}"
        self.license = license
        self._weights_id = weights_identity(weights, pretrained)
        kwargs = dict(num_classes=0, **self.model_kwargs)
        if pool is not None:
            kwargs["global_pool"] = pool
        try:
            if weights:
                self.model = timm.create_model(
                    model_name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs
                )
            else:
                self.model = timm.create_model(model_name, pretrained=self.pretrained, **kwargs)
        except Exception as e:  # hub/network/file errors come in many types
            raise EncoderError(
                f"encoder {self.name}: cannot load timm model '{model_name}' "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Fix: run once "
                "with network access to fill the Hugging Face cache, pass encoder.weights=<local file>, "
                "or use encoder.pretrained=false for random weights"
            ) from e
        self.model.eval()
        self.dim = int(self.model.num_features)
        if dim is not None and int(dim) != self.dim:
            raise EncoderError(f"encoder {self.name}: config says dim={dim}, model gives {self.dim}")

    def transform(self):
        return self.preprocess.build()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def identity(self) -> dict:
        return {
            "class": "TimmEncoder",
            "model_name": self.model_name,
            **self._weights_id,
            "pool": self.pool,
            "model_kwargs": self.model_kwargs,
            "preprocess": self.preprocess.as_dict(),
        }

    def info(self) -> dict:
        return {
            **super().info(),
            "input_size": self.preprocess.crop,
            "source": self.source,
            "license": self.license or "unknown",
            "weights": self._weights_id["weights"],
        }
