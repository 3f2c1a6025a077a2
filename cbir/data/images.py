"""Image loading: PNG (8/16 bit), JPEG, DICOM -> 8-bit PIL image ("L" or "RGB").

High bit depths are scaled to the full 0..255 range, never clipped (a plain RGB conversion
of a 16-bit PNG saturates it to white, one of the study code's defects).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageLoadError(RuntimeError):
    """A file that could not be turned into an image; message names the file and the cause."""


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric array to uint8 over its own range."""
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float64)
    lo, hi = np.nanmin(a), np.nanmax(a)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _load_dicom(path)
        return _load_raster(path)
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: file not found") from e
    except Exception as e:  # PIL/pydicom raise many types for corrupt data
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _load_raster(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("L", "RGB"):
            return im.copy()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return Image.fromarray(to_uint8(np.asarray(im)), mode="L")
        if im.mode in ("LA", "La"):
            return im.convert("L")
        # palette, RGBA, CMYK, 1-bit, ...: PIL's conversion keeps the visible content
        return im.convert("RGB")


def _load_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM file has no pixel data")
    pixels = ds.pixel_array
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the middle frame
    if ds.get("SamplesPerPixel", 1) == 3:
        return Image.fromarray(to_uint8(pixels), mode="RGB")
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    image = to_uint8(np.asarray(values))
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        image = 255 - image
    return Image.fromarray(image, mode="L")
