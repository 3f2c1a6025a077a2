"""Chance-level control: embeddings that carry no information about the image class.

Each image maps to Gaussian noise seeded by a hash of its pixels, so the embedding is
deterministic (same image, same vector) yet unrelated to content. A benchmark row for it
shows what P@N chance looks like on the dataset at hand (it depends on class frequencies).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cbir.encoders.base import Encoder
from cbir.encoders.preprocess import Preprocess


class RandomEncoder(Encoder):
    def __init__(self, name: str = "random", dim: int = 64, image_size: int = 32) -> None:
        super().__init__()
        self.name, self.dim, self.image_size = name, int(dim), int(image_size)
        self.preprocess = Preprocess(
            mode="squash",
            resize=self.image_size,
            crop=self.image_size,
            interpolation="bilinear",
            mean=(0.0,),
            std=(1.0,),
            channels=1,
        )

    def transform(self):
        return self.preprocess.build()

    def identity(self) -> dict:
        return {"class": "RandomEncoder", "dim": self.dim, "preprocess": self.preprocess.as_dict()}

    def info(self) -> dict:
        return {
            **super().info(),
            "input_size": self.image_size,
            "source": "random control (no weights)",
            "license": "n/a",
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for image in images.detach().cpu().numpy():
            seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
            out.append(np.random.default_rng(seed).standard_normal(self.dim))
        return torch.as_tensor(np.stack(out), dtype=torch.float32, device=images.device)
