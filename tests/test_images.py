"""Image loading: PNG 8/16 bit, JPEG, RGBA/palette, DICOM (rescale, window, MONOCHROME1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.data.images import ImageLoadError, apply_window, load_image

pydicom = pytest.importorskip("pydicom")


def ramp16(lo: int = 1000, hi: int = 4000, size: int = 16) -> np.ndarray:
    return np.linspace(lo, hi, size * size).reshape(size, size).astype(np.uint16)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    bits_stored: int = 16,
    no_extension_magic: bool = False,
    **tags,
) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------- raster formats
def test_8bit_grey_png_and_jpeg_load_unchanged(tmp_path):
    array = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(array).save(tmp_path / "a.png")
    Image.fromarray(array).save(tmp_path / "a.jpg", quality=95)
    png = load_image(tmp_path / "a.png")
    assert png.mode == "L" and np.array_equal(np.asarray(png), array)
    jpg = load_image(tmp_path / "a.jpg")
    assert jpg.mode == "L" and jpg.size == (16, 16)


def test_16bit_png_keeps_contrast_not_clipped_to_white(tmp_path):
    array = ramp16(1000, 4000)  # a 12-bit range: a plain 8-bit conversion saturates it to 255
    Image.fromarray(array).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "a16.png"))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # the ramp survives
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotone: scaled, not wrapped


def test_rgba_palette_and_bilevel_images_load(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == [200, 0, 0]

    palette = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").mode == "RGB"
    palette.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").mode in ("L", "RGB")  # a grey GIF may open as L

    Image.fromarray(np.eye(16, dtype=bool)).save(tmp_path / "bw.png")
    bw = load_image(tmp_path / "bw.png")
    assert bw.mode == "L" and set(np.unique(np.asarray(bw))) == {0, 255}

    la = Image.fromarray(np.full((16, 16, 2), 90, np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").mode == "L"


def test_missing_and_corrupt_files_raise_naming_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="bad.png: cannot decode"):
        load_image(tmp_path / "bad.png")


# ---------------------------------------------------------------------- DICOM
def test_dicom_16bit_without_window_uses_the_full_range(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp16(1000, 4000), bits_stored=12)
    out = np.asarray(load_image(path))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200


def test_dicom_rescale_slope_intercept_then_window(tmp_path):
    # stored 0..2000 -> HU = 2 * stored - 1000 = -1000..3000; window 40/400 spans HU -160..240
    stored = np.linspace(0, 2000, 256).reshape(16, 16).astype(np.int16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        signed=True,
        RescaleSlope="2",
        RescaleIntercept="-1000",
        WindowCenter="40",
        WindowWidth="400",
    )
    out = np.asarray(load_image(path)).astype(int)
    hu = 2.0 * stored - 1000
    assert np.all(out[hu < -161] == 0) and np.all(out[hu > 241] == 255)
    inside = (hu > -150) & (hu < 230)
    assert inside.any() and np.all((out[inside] > 0) & (out[inside] < 255))
    expected = np.round(np.clip((hu - 39.5) / 399 + 0.5, 0, 1) * 255)
    assert np.abs(out - expected).max() <= 1  # the DICOM LINEAR window, on rescaled values


def test_dicom_multi_valued_window_uses_the_first(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", ramp16(0, 1000), WindowCenter=["500", "100"], WindowWidth=["1000", "50"])
    out = np.asarray(load_image(path))
    assert out.min() <= 1 and out.max() >= 254 and len(np.unique(out)) > 200


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = ramp16(0, 4095)
    m2 = np.asarray(load_image(write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=12)))
    m1 = np.asarray(load_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", bits_stored=12)))
    assert np.array_equal(m1, 255 - m2) and m1[0, 0] == 255


def test_dicom_without_extension_is_recognised(tmp_path):
    path = write_dicom(tmp_path / "IM0001", ramp16())
    assert load_image(path).mode == "L"


def test_window_functions():
    values = np.array([-1000.0, 0.0, 40.0, 1000.0])
    assert apply_window(values, 40, 400).tolist()[::3] == [0, 255]
    assert apply_window(values, 40, 400, "LINEAR_EXACT")[2] == 128
    assert apply_window(values, 40, 400, "SIGMOID")[2] == 128


# ---------------------------------------------------------------------- format by content
def test_the_format_is_read_from_the_content_not_the_name(tmp_path):
    """A PNG or JPEG named .dcm is that image (it used to be skipped as "DICOM without pixel
    data"); a DICOM named .png is DICOM; a .dcm without the 128-byte preamble is still DICOM."""
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "png.png")
    (tmp_path / "really_png.dcm").write_bytes((tmp_path / "png.png").read_bytes())
    assert np.array_equal(np.asarray(load_image(tmp_path / "really_png.dcm")), grey)
    Image.fromarray(grey).convert("RGB").save(tmp_path / "jpeg.jpg", quality=95)
    (tmp_path / "really_jpeg.DICOM").write_bytes((tmp_path / "jpeg.jpg").read_bytes())
    assert load_image(tmp_path / "really_jpeg.DICOM").size == (8, 8)

    dicom = write_dicom(tmp_path / "scan.dcm", ramp16(0, 4095), bits_stored=12)
    (tmp_path / "really_dicom.png").write_bytes(dicom.read_bytes())
    assert np.array_equal(np.asarray(load_image(tmp_path / "really_dicom.png")), np.asarray(load_image(dicom)))
    (tmp_path / "no_preamble.dcm").write_bytes(dicom.read_bytes()[132:])  # bare data set, no 'DICM'
    assert np.array_equal(np.asarray(load_image(tmp_path / "no_preamble.dcm")), np.asarray(load_image(dicom)))
