"""cbir builds each encoder's preprocessing from its YAML; where the library ships the model's own
eval transform, cbir's must give the same tensor, so a drift in either is caught.

Compared (no hub access needed): timm's `resolve_data_config` + `create_transform` (ResNet-50),
open_clip's eval `image_transform` (CLIP, BiomedCLIP, BMC-CLIP), and the transformers image
processors built with the values of each model's hub `preprocessor_config.json` (ViT, MAE,
DINOv2, RAD-DINO, SAM). Not compared, by design: MedSAM (its own min-max inference, no library
transform), MedCLIP (its package is broken; cbir follows its processor's source), Ark (its own
dataloader's squash resize).

Tolerance: resizing goes through PIL in the libraries and through torchvision on uint8 tensors in
cbir; both round to 8 bits, so a pixel may differ by one or two 8-bit levels at a few edges. After
normalisation that is at most 3/255/std; on average below 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cbir.encoders.preprocess import Preprocess
from tests.conftest import CONF_DIR


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Smooth random images: landscape RGB, portrait grey (a radiograph's mode), square, small."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)

    def image(w, h, mode):
        a = gaussian_filter(rng.random((h, w, 3)) * 255, (3, 3, 0))
        return Image.fromarray(a.clip(0, 255).astype(np.uint8)).convert(mode)

    return [image(300, 200, "RGB"), image(480, 640, "L"), image(224, 224, "RGB"), image(90, 120, "L")]


def cbir_transform(encoder: str, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "encoder" / f"{encoder}.yaml")
    return Preprocess.from_config({**OmegaConf.to_container(cfg, resolve=True)["preprocess"], **overrides}).build()


def assert_close(ours: torch.Tensor, theirs, std) -> None:
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float32)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert float(diff.max()) <= 3 / 255 / min(std) + 1e-6
    assert float(diff.mean()) < 1e-3


def test_resnet50_matches_timm_eval_transform(images):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet50.tv_in1k", pretrained=False)
    data_config = resolve_data_config({}, model=model)
    theirs, ours = create_transform(**data_config), cbir_transform("resnet50")
    for image in images:
        assert_close(ours(image), theirs(image.convert("RGB")), data_config["std"])


@pytest.mark.parametrize("encoder", ["clip", "biomedclip", "bmc_clip"])
def test_open_clip_encoders_match_open_clip_eval_transform(images, encoder):
    import open_clip

    theirs, ours = open_clip.image_transform(224, is_train=False), cbir_transform(encoder)
    for image in images:
        assert_close(ours(image), theirs(image), open_clip.OPENAI_DATASET_STD)


# (encoder, processor class, its preprocessor_config.json values as published on the hub)
HF_PROCESSORS = [
    (
        "vit",
        "ViTImageProcessor",
        dict(size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    ),
    (
        "mae",
        "ViTImageProcessor",
        dict(
            size={"height": 224, "width": 224},
            resample=2,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
    ),
    (
        "dinov2",
        "BitImageProcessor",
        dict(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            resample=3,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            do_convert_rgb=True,
        ),
    ),
    (
        "rad_dino",
        "BitImageProcessor",
        dict(
            size={"shortest_edge": 518},
            crop_size={"height": 518, "width": 518},
            resample=3,
            image_mean=[0.5307] * 3,
            image_std=[0.2583] * 3,
            do_convert_rgb=True,
        ),
    ),
]


@pytest.mark.parametrize("encoder,processor,values", HF_PROCESSORS, ids=[p[0] for p in HF_PROCESSORS])
def test_transformers_encoders_match_their_hub_image_processor(images, encoder, processor, values):
    import transformers

    theirs, ours = getattr(transformers, processor)(**values), cbir_transform(encoder)
    for image in images:
        pixels = theirs(image.convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert_close(ours(image), pixels, values["image_std"])


def test_sam_matches_the_sam_image_processor_at_a_smaller_size(images):
    """SAM: longest side to the input size, ImageNet normalisation, zero padding bottom/right
    after normalisation (checked at 256 px to keep the test light; the geometry is the same)."""
    from transformers import SamImageProcessor

    size = 256
    theirs = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    ours = cbir_transform("sam", crop=size, valid_mask=False)
    for image in images:
        pixels = theirs(image.convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert_close(ours(image), pixels, theirs.image_std)
