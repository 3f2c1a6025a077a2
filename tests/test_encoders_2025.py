"""The 2025 encoders: DINOv3 (timm), MedSigLIP (transformers SigLIP), and the configs of models no
library in the stack can load (UniMed-CLIP, MedImageInsight). Random weights, offline; the
preprocessing is compared with each library's own transform / processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cbir.encoders.base import EncoderError
from tests.test_encoders import FAST, compose, no_network
from tests.test_preprocess_parity import assert_close, cbir_transform, images  # noqa: F401 (fixture)


def build(name: str, *overrides: str, pretrained: bool = False):
    """The encoder as cbir.run builds it (cbir's own errors unwrapped), with the fast test sizes."""
    from cbir.job.inputs import build as build_node

    cfg = compose(f"encoder={name}", *FAST.get(name, []), *overrides)
    cfg.encoder.pretrained = pretrained
    return build_node(cfg.encoder), cfg.encoder


@pytest.mark.parametrize("name,dim", [("dinov3", 768), ("dinov3_large", 1024)])
def test_dinov3_embedding_is_the_cls_token_after_the_final_norm(name, dim):
    with no_network():
        encoder, cfg = build(name)
    assert encoder.dim == dim == cfg.dim
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens = encoder.model.forward_features(x)
        np.testing.assert_allclose(encoder(x).numpy(), tokens[:, 0].numpy(), rtol=0, atol=1e-6)
    assert encoder.model.num_prefix_tokens == 5  # CLS + 4 registers: pool=mean leaves all five out


def test_dinov3_preprocessing_matches_timm_eval_transform(images):  # noqa: F811
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_base_patch16_dinov3.lvd1689m", pretrained=False)
    data_config = resolve_data_config({}, model=model)
    theirs, ours = create_transform(**data_config), cbir_transform("dinov3")
    for image in images:
        assert_close(ours(image), theirs(image.convert("RGB")), data_config["std"])


def test_medsiglip_embedding_is_the_attention_pooling_head_as_get_image_features():
    from transformers import SiglipConfig, SiglipModel

    with no_network():
        encoder, cfg = build("medsiglip")
    assert encoder.dim == cfg.dim == 1152
    vision = OmegaConf.to_container(cfg.model_config, resolve=True)
    full = SiglipModel(SiglipConfig(vision_config=vision, text_config={"num_hidden_layers": 1})).eval()
    full.vision_model.load_state_dict(encoder.model.state_dict())
    x = torch.randn(2, 3, cfg.input_size, cfg.input_size)
    with torch.inference_mode():
        theirs = full.get_image_features(pixel_values=x)
        theirs = getattr(theirs, "pooler_output", theirs)
        np.testing.assert_allclose(encoder(x).numpy(), theirs.numpy(), rtol=0, atol=1e-5)
    with pytest.raises(EncoderError, match="no class token"):
        build("medsiglip", "encoder.pool=cls")


def test_medsiglip_preprocessing_matches_its_siglip_image_processor(images):  # noqa: F811
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 448, "width": 448})  # the class's defaults otherwise
    ours = cbir_transform("medsiglip")
    for image in images:
        pixels = processor(image.convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert_close(ours(image), pixels, processor.image_std)


@pytest.mark.parametrize("name", ["dinov3", "medsiglip"])
def test_offline_pretrained_2025_encoders_fail_fast_naming_the_fixes(name):
    with no_network() as attempts, pytest.raises(EncoderError) as caught:
        build(name, pretrained=True)
    assert attempts == [] and "encoder.weights=<" in str(caught.value)


@pytest.mark.parametrize(
    "name,where,loader",
    [
        ("unimed_clip", "mbzuai-oryx/UniMed-CLIP", "open_clip fork"),
        ("medimageinsight", "lion-ai/MedImageInsights", "DaViT"),
    ],
)
@pytest.mark.parametrize("pretrained", [True, False])
def test_models_no_library_here_can_load_fail_at_once_saying_where_and_which_loader(name, where, loader, pretrained):
    with no_network() as attempts, pytest.raises(EncoderError) as caught:
        build(name, pretrained=pretrained)
    message = str(caught.value)
    assert attempts == [] and where in message and loader in message and f"encoder {name}" in message
