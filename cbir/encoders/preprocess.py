"""Per-image preprocessing built from an encoder config's `preprocess` block.

Modes: `shortest` (resize the shorter side to `resize`, centre-crop `crop`; timm/open_clip
default), `squash` (resize to crop x crop, aspect ratio not kept; HF ViT/MAE processors).
Grey images are expanded to 3 channels after range scaling (loading already scaled them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from torchvision.transforms import v2 as T

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    mode: str = "shortest"
    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "Preprocess":
        d = dict(cfg or {})
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"encoder.preprocess: unknown key(s) {sorted(unknown)}; "
                f"known: {sorted(cls.__dataclass_fields__)}"
            )
        if d.get("mode", "shortest") not in ("shortest", "squash"):
            raise ValueError(f"encoder.preprocess.mode={d['mode']}: use shortest or squash")
        if d.get("interpolation", "bicubic") not in _INTERPOLATION:
            raise ValueError(
                f"encoder.preprocess.interpolation={d['interpolation']}: use one of {sorted(_INTERPOLATION)}"
            )
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)

    def build(self):
        interp = _INTERPOLATION[self.interpolation]
        if self.mode == "shortest":
            geometry = [T.Resize(self.resize, interpolation=interp, antialias=True), T.CenterCrop(self.crop)]
        else:
            geometry = [T.Resize((self.crop, self.crop), interpolation=interp, antialias=True)]
        mode = "L" if self.channels == 1 else "RGB"
        return T.Compose(
            [
                _ToMode(mode),
                T.PILToTensor(),
                *geometry,
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )


class _ToMode:
    """PIL mode conversion as a picklable transform (DataLoader workers pickle it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)
