"""Image towers of open_clip models (CLIP, BiomedCLIP, BMC-CLIP) as encoders.

Only the image tower is built: retrieval never uses the text tower, it is as large again for
ViT-L, and for BiomedCLIP it cannot even be built offline (its text config lives on the hub).
The tower comes from an open_clip architecture name (`model_name`) and/or an explicit
`vision_cfg`; weights come from a hub file holding an open_clip state dict, whose `visual.*`
keys are kept. Embedding: the projected image embedding (`encode_image`, before L2-normalising).
"""

from __future__ import annotations

from typing import Any

import torch

from cbir.encoders.base import EncoderError, PretrainedEncoder
from cbir.encoders.hub import cached_commit, commit_of_file, hub_file, load_into, read_state_dict, strip_prefix


class OpenClipEncoder(PretrainedEncoder):
    def __init__(
        self,
        name: str,
        model_name: str | None = None,
        vision_cfg: Any = None,
        embed_dim: int | None = None,
        quick_gelu: bool | None = None,
        hub_id: str | None = None,
        hub_files: Any = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        revision: str | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        pool: str | None = None,
        dim: int | None = None,
        preprocess: Any = None,
        input_size: int | None = None,
        source: str | None = None,
        license: str | None = None,
        text: Any = None,  # the text tower's config: built apart, by cbir.encoders.text, for text tasks only
    ) -> None:
        if pool is not None:
            raise EncoderError(
                f"encoder {name}: encoder.pool is not supported; the embedding is the model's projected image embedding"
            )
        super().__init__(name, pretrained, weights, dim, preprocess, input_size, None, source, license)
        import open_clip

        arch = open_clip.get_model_config(model_name) if model_name else {}
        if model_name and arch is None:
            raise EncoderError(f"encoder {name}: open_clip has no architecture '{model_name}'")
        self.model_name = model_name
        self.embed_dim = int(embed_dim or arch.get("embed_dim", 0))
        self.vision_cfg = {**arch.get("vision_cfg", {}), **dict(vision_cfg or {})}
        # QuickGELU is part of the architecture: OpenAI weights run wrongly under nn.GELU
        self.quick_gelu = bool(arch.get("quick_gelu", False) if quick_gelu is None else quick_gelu)
        self.hub_id, self.revision = hub_id, revision
        self.hub_files = [hub_files] if isinstance(hub_files, str) else list(hub_files)
        # private open_clip helper: builds the image tower alone, exactly as create_model does
        self.model = open_clip.model._build_vision_tower(self.embed_dim, self.vision_cfg, quick_gelu=self.quick_gelu)
        self._load_weights()
        self.model.eval()
        self.check_dim(self.embed_dim)

    def _load_weights(self) -> None:
        if self.weights:
            path = self.weights
        elif not self.pretrained:
            return
        elif self.hub_id:
            path = hub_file(self.name, self.hub_id, self.hub_files, self.revision)
            self.record_hub_weights(self.hub_id, commit_of_file(path) or cached_commit(self.hub_id, self.revision))
        else:
            raise EncoderError(f"encoder {self.name}: no hub_id configured; pass encoder.weights=<file>")
        state_dict = read_state_dict(path, self.name)
        if any(k.startswith("visual.") for k in state_dict):  # full CLIP checkpoint: keep the image tower
            state_dict = strip_prefix(state_dict, "visual.", keep_others=False)
        load_into(self.model, state_dict, self.name, str(path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def model_identity(self) -> dict:
        return {
            "model_name": self.model_name,
            "embed_dim": self.embed_dim,
            "vision_cfg": self.vision_cfg,
            "quick_gelu": self.quick_gelu,
            "hub_id": self.hub_id,
            "revision": self.revision,
        }
