"""Image loading: PNG (8/16 bit), JPEG, DICOM -> 8-bit PIL image ("L" or "RGB").

High bit depths are scaled to the full 0..255 range, never clipped (a plain RGB conversion
of a 16-bit PNG saturates it to white, one of the study code's defects). DICOM: rescale
slope/intercept, then the header's VOI LUT or window when present (else the full range),
then MONOCHROME1 inversion.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def open_regular(path: Path):
    """The file opened for reading, only if it is a regular file. Reading a FIFO (or a device)
    named like an image would wait for a writer forever: such a file is an ImageLoadError. It is
    checked before opening, and again on the open handle (opened non-blocking, so a FIFO swapped
    in meanwhile cannot block the open itself)."""
    kind = not_regular(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        kind = not_regular(os.fstat(fd).st_mode)
        if kind is None:
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise ImageLoadError(f"{path}: {kind}, not an image file; only regular files are read")


def load_image(path: str | Path) -> Image.Image:
    """The format is decided by the file's content, not its name: a PNG named .dcm is a PNG.
    DICOM is recognised by 'DICM' at byte 128; anything PIL identifies (PNG, JPEG, ... by their
    magic bytes) is a raster image; a .dcm/.dicom file PIL cannot identify is read as DICOM
    without the 128-byte preamble. Only regular files are opened (see open_regular)."""
    path = Path(path)
    try:
        with open_regular(path) as f:  # one open per image: sniff, then decode from the same handle
            if f.read(132)[128:132] == b"DICM":  # DICOM files often have no (or another) extension
                return _load_dicom(f, path)
            f.seek(0)
            try:
                return _load_raster(f)
            except UnidentifiedImageError:
                if path.suffix.lower() in DICOM_SUFFIXES:
                    return _load_dicom(f, path)
                raise
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: file not found") from e
    except Exception as e:  # PIL/pydicom raise many types for corrupt data
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _load_raster(file) -> Image.Image:
    with Image.open(file) as im:
        im.load()
        if im.mode in ("L", "RGB"):
            return im.copy()
        if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grey
            return Image.fromarray(to_uint8(np.asarray(im)))
        if im.mode in ("1", "LA", "La"):
            return im.convert("L")
        if im.mode == "P" and "transparency" in im.info:
            return im.convert("RGBA").convert("RGB")  # direct P->RGB warns about transparency
        # palette, RGBA (alpha dropped, as a plain RGB conversion does), CMYK, YCbCr, ...
        return im.convert("RGB")


def _load_dicom(file, path: Path) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        file.seek(0)
        ds = pydicom.dcmread(file)
    except InvalidDicomError:
        file.seek(0)
        ds = pydicom.dcmread(file, force=True)  # no 128-byte preamble: still DICOM
    if "PixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM file has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise ImageLoadError(
            f"{path}: cannot decode DICOM pixel data ({e}); compressed transfer syntaxes need a "
            "decoder plugin, e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        ) from e
    samples = int(ds.get("SamplesPerPixel", 1))
    if pixels.ndim == (3 if samples == 1 else 4):
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the middle frame
    if samples == 3:
        return Image.fromarray(to_uint8(pixels))  # pydicom returns YBR data converted to RGB
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)  # rescale slope/intercept
    if "VOILUTSequence" in ds:
        image = to_uint8(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    elif _window(ds) is not None:
        image = apply_window(values, *_window(ds), str(ds.get("VOILUTFunction", "LINEAR")).upper())
    else:
        image = to_uint8(values)  # full range, no clipping
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1: low values are white
    return Image.fromarray(image)


def _window(ds) -> tuple[float, float] | None:
    """(center, width) of the first window in the header, or None when absent/unusable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center, width = _first_value(center), _first_value(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width > 0 else None


def _first_value(value) -> float:
    """Window tags may hold several windows (a MultiValue); the first is the default one."""
    if isinstance(value, (int, float, str)):
        return float(value)
    return float(value[0])


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) mapped onto 0..255: the window spans the full
    8-bit range; values outside it saturate, as any DICOM viewer shows them.

    Not pydicom's `apply_voi_lut`/`apply_windowing`: those map the window onto the stored bit
    range (y_min..y_max derived from BitsStored, PixelRepresentation and the modality LUT), which
    would need that same derivation again to reach 0..255, and they refuse photometric
    interpretations other than MONOCHROME1/2. The formulas here are PS3.3's, tested against it."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:  # LINEAR
        out = (values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
