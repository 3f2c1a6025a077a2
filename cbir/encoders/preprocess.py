"""Per-image preprocessing built from an encoder config's `preprocess` block.

Geometry (`mode`):
- `shortest`: resize the shorter side to `resize`, centre-crop `crop` (timm/open_clip default);
- `squash`: resize to crop x crop, aspect ratio not kept (HF ViT/MAE processors, MedSAM, Ark);
- `longest_pad`: resize the longer side to `crop`, then zero-pad bottom/right to crop x crop
  after normalisation (SAM: padded pixels are exactly 0 in the normalised input);
- `pad_square`: pad to a centred black square of side max(`resize`, width, height), resize to
  `resize`, centre-crop `crop` (MedCLIP's processor, including its minimum side).
`crop_offset`: where a centre crop starts when the margin is odd: `round` (torchvision, hence
timm and open_clip: round half to even) or `floor` (the transformers image processors).
Intensity (`rescale`): `fixed` maps 0..255 to 0..1; `minmax` maps each image's own min..max to
0..1 (MedSAM). Then `(x - mean) / std`. Grey images are expanded to 3 channels (`channels=3`)
after loading already scaled their range. `valid_mask=true` (with `longest_pad`) appends one
channel that is 1 on the image and 0 on the padding, so the encoder can pool over the image
area only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}
MODES = ("shortest", "squash", "longest_pad", "pad_square")
RESCALES = ("fixed", "minmax")
CROP_OFFSETS = ("round", "floor")


@dataclass(frozen=True)
class Preprocess:
    mode: str = "shortest"
    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    rescale: str = "fixed"
    valid_mask: bool = False
    crop_offset: str = "round"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> Preprocess:
        d = dict(cfg or {})
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"encoder.preprocess: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        if d.get("mode", "shortest") not in MODES:
            raise ValueError(f"encoder.preprocess.mode={d['mode']}: use one of {', '.join(MODES)}")
        if d.get("interpolation", "bicubic") not in _INTERPOLATION:
            raise ValueError(
                f"encoder.preprocess.interpolation={d['interpolation']}: use one of {sorted(_INTERPOLATION)}"
            )
        if d.get("rescale", "fixed") not in RESCALES:
            raise ValueError(f"encoder.preprocess.rescale={d['rescale']}: use one of {', '.join(RESCALES)}")
        if d.get("crop_offset", "round") not in CROP_OFFSETS:
            raise ValueError(f"encoder.preprocess.crop_offset={d['crop_offset']}: use one of {', '.join(CROP_OFFSETS)}")
        if d.get("valid_mask") and d.get("mode") != "longest_pad":
            raise ValueError("encoder.preprocess.valid_mask=true needs mode=longest_pad (other modes do not pad)")
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def image_mode(self) -> str:
        """The PIL mode the decoded image is converted to before it becomes a tensor."""
        return "L" if self.channels == 1 else "RGB"

    def build(self):
        return T.Compose([_ToMode(self.image_mode), T.PILToTensor(), *self.tensor_steps()])

    def tensor_steps(self) -> list:
        """Everything after decoding: uint8 (C, H, W) -> float input. The steps also take a
        stack (B, C, H, W) of equally sized images, which is how they run on the device."""
        interp = _INTERPOLATION[self.interpolation]
        crop = T.CenterCrop(self.crop) if self.crop_offset == "round" else _CenterCropFloor(self.crop)
        before, after = [], []
        if self.mode == "shortest":
            before = [T.Resize(self.resize, interpolation=interp, antialias=True), crop]
        elif self.mode == "squash":
            before = [T.Resize((self.crop, self.crop), interpolation=interp, antialias=True)]
        elif self.mode == "pad_square":
            before = [_PadToSquare(self.resize), T.Resize(self.resize, interpolation=interp, antialias=True), crop]
        else:  # longest_pad
            before = [_ResizeLongest(self.crop, interp)]
            after = [_PadBottomRight(self.crop, self.valid_mask)]
        scale = [T.ToDtype(torch.float32, scale=True)]
        if self.rescale == "minmax":
            scale.append(_MinMax())
        return [*before, *scale, T.Normalize(self.mean, self.std), *after]


class _ToMode:
    """PIL mode conversion as a picklable transform (DataLoader workers pickle it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


class _ResizeLongest:
    """Longer side to `size`, aspect kept, rounding as segment-anything's ResizeLongestSide."""

    def __init__(self, size: int, interpolation) -> None:
        self.size, self.interpolation = int(size), interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = self.size / max(h, w)
        new = [max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))]
        return TF.resize(image, new, interpolation=self.interpolation, antialias=True)


class _PadBottomRight:
    """Zero-pad to size x size at the bottom/right; optionally append the validity mask."""

    def __init__(self, size: int, valid_mask: bool) -> None:
        self.size, self.valid_mask = int(size), bool(valid_mask)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        padding = (0, self.size - w, 0, self.size - h)
        out = F.pad(image, padding)
        if self.valid_mask:
            ones = torch.ones(*image.shape[:-3], 1, h, w, dtype=image.dtype, device=image.device)
            out = torch.cat([out, F.pad(ones, padding)], dim=-3)
        return out


class _CenterCropFloor:
    """Centre crop starting at floor(margin / 2), as transformers' image processors crop."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if h < self.size or w < self.size:  # smaller than the crop: torchvision pads it, centred
            return T.CenterCrop(self.size)(image)
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return image[..., top : top + self.size, left : left + self.size]


class _PadToSquare:
    """Centre the image on a black square of side max(min_size, height, width)."""

    def __init__(self, min_size: int) -> None:
        self.min_size = int(min_size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = max(self.min_size, h, w)
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(image, (left, size - w - left, top, size - h - top))


class _MinMax:
    """Each image's own range to [0, 1] (MedSAM); a constant image maps to 0."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        dims = (-3, -2, -1)  # per image, also in a stack
        lo, hi = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
        return (image - lo) / torch.clamp(hi - lo, min=1e-8)
