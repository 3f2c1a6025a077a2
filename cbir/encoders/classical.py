"""Weights-free classical baseline: a multi-scale intensity / gradient descriptor.

Blocks, each centred and L2-normalised on its own so no block dominates the cosine:
- intensity layout: mean intensity on 1x1, 2x2, 4x4 and 8x8 grids (anatomy, modality);
- gradient orientation histograms (HOG-like, magnitude weighted) on 1x1, 2x2, 4x4 grids (shape);
- an intensity histogram (modality contrast);
- local contrast (absolute Laplacian) on a 4x4 grid (small findings, texture, noise).
Runs as plain torch ops, so it goes through the same Lightning path as the neural encoders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cbir.encoders.base import Encoder
from cbir.encoders.preprocess import Preprocess


class ClassicalEncoder(Encoder):
    def __init__(
        self,
        name: str = "baseline",
        image_size: int = 64,
        grids=(1, 2, 4, 8),
        orientation_bins: int = 8,
        histogram_bins: int = 16,
    ) -> None:
        super().__init__()
        self.name = name
        self.image_size = int(image_size)
        self.grids = tuple(int(g) for g in grids)
        self.orientation_bins = int(orientation_bins)
        self.histogram_bins = int(histogram_bins)
        self.preprocess = Preprocess(
            mode="squash",
            resize=self.image_size,
            crop=self.image_size,
            interpolation="bilinear",
            mean=(0.0,),
            std=(1.0,),
            channels=1,
        )
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("kernels", torch.stack([sobel, sobel.T, laplace])[:, None])
        grad_grids = [g for g in self.grids if g <= 4]
        self.dim = (
            sum(g * g for g in self.grids)
            + self.orientation_bins * sum(g * g for g in grad_grids)
            + self.histogram_bins
            + 16
        )

    def transform(self):
        return self.preprocess.build()

    def identity(self) -> dict:
        return {
            "class": "ClassicalEncoder",
            "image_size": self.image_size,
            "grids": self.grids,
            "orientation_bins": self.orientation_bins,
            "histogram_bins": self.histogram_bins,
            "preprocess": self.preprocess.as_dict(),
        }

    def info(self) -> dict:
        return {
            **super().info(),
            "input_size": self.image_size,
            "source": "classical descriptor (no weights)",
            "license": "n/a",
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        filtered = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernels)
        gx, gy, lap = filtered[:, 0:1], filtered[:, 1:2], filtered[:, 2:3]
        magnitude = torch.sqrt(gx**2 + gy**2 + 1e-12)
        # unsigned orientation in [0, pi), soft-assigned to two neighbouring bins
        angle = torch.atan2(gy, gx) % math.pi
        pos = angle / math.pi * self.orientation_bins - 0.5
        lo = torch.floor(pos)
        w_hi = pos - lo
        bins = torch.zeros(x.shape[0], self.orientation_bins, *x.shape[2:], device=x.device)
        bins.scatter_add_(1, (lo.long() % self.orientation_bins), magnitude * (1 - w_hi))
        bins.scatter_add_(1, ((lo.long() + 1) % self.orientation_bins), magnitude * w_hi)

        blocks = [torch.cat([F.adaptive_avg_pool2d(x, g).flatten(1) for g in self.grids], 1)]
        blocks.append(torch.cat([F.adaptive_avg_pool2d(bins, g).flatten(1) for g in self.grids if g <= 4], 1).sqrt())
        centres = (torch.arange(self.histogram_bins, device=x.device) + 0.5) / self.histogram_bins
        soft = torch.relu(1 - (x.flatten(1)[:, :, None] - centres).abs() * self.histogram_bins)
        blocks.append(soft.mean(1).sqrt())
        blocks.append(F.adaptive_avg_pool2d(lap.abs(), 4).flatten(1))
        return torch.cat([_centre_normalise(b) for b in blocks], 1)


def _centre_normalise(block: torch.Tensor) -> torch.Tensor:
    block = block - block.mean(1, keepdim=True)
    return block / (block.norm(dim=1, keepdim=True) + 1e-8)
