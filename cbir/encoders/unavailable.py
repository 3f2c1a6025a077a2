"""Encoders that no library in cbir's stack can load: the config says where the weights come
from and which loader they need, and building it fails at once with that message (no hub
request is made, online or offline)."""

from __future__ import annotations

from cbir.encoders.base import EncoderError


class UnavailableEncoder:
    def __init__(self, name: str, weights_from: str, loader: str, **facts) -> None:
        raise EncoderError(
            f"encoder {name}: no library in cbir's stack (timm, open_clip, transformers) can load it. "
            f"Weights: {weights_from.strip()} Loader needed: {loader.strip()} "
            "Export its image embeddings and use encoder=precomputed, or add a wrapper for that loader"
        )
