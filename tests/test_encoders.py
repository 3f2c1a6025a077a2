"""Every encoder config, built with random weights and run through the real extraction path;
embedding heads, preprocessing, local weights and the offline error path.

Large inputs are shrunk where the model allows it (SAM 1024 px, Ark 768 px, RAD-DINO 518 px),
so the whole file stays within a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from cbir.data.images import load_image
from cbir.data.synthetic import SyntheticDataset
from cbir.encoders import hub
from cbir.encoders.base import EncoderError
from cbir.encoders.preprocess import Preprocess
from cbir.extract.single import extract_embeddings
from cbir.extract.store import EmbeddingStore

os.environ["HF_HUB_OFFLINE"] = "1"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXTRACT = OmegaConf.create(
    dict(
        batch_size=4, num_workers=0, accelerator="cpu", devices=1, strategy="auto", precision="32-true", progress=False
    )
)

# overrides that keep each model fast on CPU without changing what is tested
FAST = {
    "baseline": [],
    "random": [],
    "resnet50": [],
    "vit": [],
    "dinov2": [],
    "dinov2_small": [],
    "dinov2_large": ["encoder.input_size=112"],
    "mae": [],
    "clip": [],
    "bmc_clip": [],
    "biomedclip": [],
    "medclip": [],
    "sam": ["encoder.input_size=64"],
    "medsam": ["encoder.input_size=64"],
    "ark": ["encoder.input_size=192", "encoder.model_kwargs.window_size=6"],
    "rad_dino": ["encoder.input_size=112"],
    "dinov3": ["encoder.input_size=64"],
    "dinov3_large": ["encoder.input_size=64"],
    "medsiglip": ["encoder.input_size=56", "encoder.model_config.num_hidden_layers=2"],
}
# configs of models no library in the stack loads: they fail at once (tests/test_encoders_2025.py)
UNAVAILABLE = ["medimageinsight", "unimed_clip"]
# Ark's loading logic on a Swin-T backbone: the same code path as Swin-L at a fraction of the cost
ARK_SMALL = ["encoder.model_name=swin_tiny_patch4_window7_224"]
STUDY = [
    "resnet50",
    "vit",
    "dinov2",
    "mae",
    "sam",
    "medsam",
    "clip",
    "medclip",
    "biomedclip",
    "bmc_clip",
    "ark",
    "rad_dino",
    "baseline",
]


def compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def build(name: str, *overrides: str, pretrained: bool = False):
    cfg = compose(f"encoder={name}", *FAST[name], *overrides)
    if "pretrained" in cfg.encoder:
        cfg.encoder.pretrained = pretrained
    return instantiate(cfg.encoder, _convert_="all"), cfg.encoder


@contextmanager
def no_network():
    """Any attempt to resolve or connect fails loudly (the encoder must not try)."""
    attempts = []  # also recorded: library code may catch the error and go on

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise AssertionError(f"network access attempted: {args[:2]}")

    saved = socket.getaddrinfo, socket.create_connection, socket.socket.connect
    socket.getaddrinfo, socket.create_connection, socket.socket.connect = refuse, refuse, refuse
    try:
        yield attempts
    finally:
        socket.getaddrinfo, socket.create_connection, socket.socket.connect = saved


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return SyntheticDataset(
        root=root,
        modalities=["CT"],
        anatomies=["head"],
        pathologies=["normal", "lesion"],
        max_per_class=2,
        min_per_class=2,
        image_size=32,
    ).load_manifest()


def test_every_config_is_covered_and_the_study_is_complete():
    configs = sorted(p.stem for p in (CONF_DIR / "encoder").glob("*.yaml"))
    configs.remove("precomputed")  # reads stored embeddings, embeds no image: tests/test_published.py
    configs = [c for c in configs if c not in UNAVAILABLE]
    assert sorted(FAST) == configs
    assert set(STUDY) <= set(configs) and {"dinov2_small", "dinov2_large"} <= set(configs)


@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.slow
def test_encoder_config_extracts_through_lightning(name, manifest, tmp_path):
    with no_network():
        encoder, cfg = build(name)
    # the config states what it is, and info() reports it
    assert cfg.name == name
    if name not in ("baseline", "random"):  # weights-free descriptors have nothing to cite
        for key in ("dim", "source", "license", "pretrained", "weights", "input_size", "preprocess"):
            assert key in cfg, key
    if "dim" in cfg:  # the stated length is the one the encoder produces (checked on real rows below)
        assert encoder.dim == cfg.dim, (encoder.dim, cfg.dim)
    info = encoder.info()
    assert {"parameters", "dim", "input_size", "source", "license"} <= set(info)
    assert info["dim"] == encoder.dim and info["parameters"] >= 0

    check_preprocessing(encoder, cfg)

    extraction = extract_embeddings(encoder, manifest, EmbeddingStore(tmp_path), EXTRACT)
    emb = np.asarray(extraction.embeddings)
    assert emb.shape == (len(manifest), encoder.dim) and extraction.valid.all()
    assert np.isfinite(emb).all() and np.abs(emb).sum(1).min() > 0

    # deterministic: the same batch straight through the encoder again gives identical rows
    transform = encoder.transform()
    batch = torch.stack([transform(load_image(p)) for p in manifest.paths()])
    with torch.inference_mode():
        again = encoder(batch).float().numpy()
    np.testing.assert_array_equal(again, emb)


def check_preprocessing(encoder, cfg) -> None:
    """The transform does what the config's preprocess block says: size, channels, scaling."""
    p = encoder.preprocess
    if "preprocess" in cfg:
        assert p == Preprocess.from_config(OmegaConf.to_container(cfg.preprocess, resolve=True))
    transform = encoder.transform()
    size = p.crop
    channels = p.channels + (1 if p.valid_mask else 0)
    rng = np.random.default_rng(0)
    odd = Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8))
    assert tuple(transform(odd).shape) == (channels, size, size)
    mean, std = torch.tensor(p.mean)[:, None, None], torch.tensor(p.std)[:, None, None]
    if p.rescale == "fixed":
        for value in (0, 255):  # large square: no padding in any mode
            out = transform(Image.new("L", (300, 300), value))[: p.channels]
            torch.testing.assert_close(out, ((value / 255 - mean) / std).expand_as(out), atol=1e-5, rtol=0)
    else:  # minmax: each image's own range becomes [0, 1] before mean/std
        out = transform(odd)[: p.channels] * std + mean
        assert out.min().item() == pytest.approx(0, abs=1e-6) and out.max().item() == pytest.approx(1, abs=1e-6)


# ---------------------------------------------------------------------------- embedding heads
def test_resnet_embedding_is_the_pooled_2048_feature_not_logits():
    encoder, _ = build("resnet50")
    assert isinstance(encoder.model.get_classifier(), torch.nn.Identity)  # no 1000-class fc
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), encoder.model.forward_features(x).mean((2, 3)))
        assert encoder(x).shape == (2, 2048)
    gem, _ = build("resnet50", "encoder.pool=gem")
    gem.load_state_dict(encoder.state_dict())
    with torch.inference_mode():
        expected = encoder.model.forward_features(x).clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        torch.testing.assert_close(gem(x), expected)


@pytest.mark.slow
def test_mae_runs_with_masking_off_and_a_fixed_patch_order():
    encoder, _ = build("mae")
    assert encoder.model.config.mask_ratio == 0.0
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = encoder.model(pixel_values=x, noise=torch.arange(196.0).expand(2, 196))
        assert out.last_hidden_state.shape[1] == 197  # CLS + all 196 patches
        assert torch.equal(out.ids_restore, torch.arange(196).expand(2, 196))
        assert torch.equal(encoder(x), encoder(x))
        torch.testing.assert_close(encoder(x), out.last_hidden_state[:, 0])
    with pytest.raises(Exception, match="mask_ratio"):
        build("mae", "encoder.model_config.mask_ratio=0.75")


@pytest.mark.slow
def test_vit_pool_override_cls_and_mean():
    encoder, _ = build("dinov2_small")
    mean, _ = build("dinov2_small", "encoder.pool=mean")
    mean.load_state_dict(encoder.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = encoder.model.forward_features(x)
        torch.testing.assert_close(encoder(x), tokens[:, 0])
        torch.testing.assert_close(mean(x), tokens[:, 1:].mean(1))
    assert mean.cache_key() != encoder.cache_key()
    with pytest.raises(Exception, match="signed"):
        build("dinov2_small", "encoder.pool=gem")


def test_sam_averages_the_neck_over_the_image_area_only():
    encoder, _ = build("sam")  # input 64 px -> 4x4 neck grid of 256 channels
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 64), dtype=np.uint8))
    x = encoder.transform()(wide)
    assert x.shape == (4, 64, 64)
    assert torch.all(x[:3, 32:] == 0) and torch.all(x[3, :32] == 1) and torch.all(x[3, 32:] == 0)
    with torch.inference_mode():
        neck = encoder.model.forward_features(x[None, :3])
        assert neck.shape == (1, 256, 4, 4)
        embedding = encoder(x[None])
        torch.testing.assert_close(embedding, neck[:, :, :2, :].mean((2, 3)))  # top 2 rows = image
        assert not torch.allclose(embedding, neck.mean((2, 3)))  # the study's mean over padding
        square = encoder.transform()(wide.resize((64, 64)))
        assert torch.all(square[3] == 1)
        torch.testing.assert_close(encoder(square[None]), encoder.model.forward_features(square[None, :3]).mean((2, 3)))


def test_medsam_preprocessing_is_squash_and_minmax_without_imagenet_stats():
    encoder, _ = build("medsam")
    dark = Image.fromarray(np.random.default_rng(2).integers(20, 60, (30, 50), dtype=np.uint8))
    x = encoder.transform()(dark)
    assert x.shape == (3, 64, 64) and x.min().item() == pytest.approx(0) and x.max().item() == pytest.approx(1)


def test_medclip_pads_to_a_centred_square_and_keeps_one_channel():
    p = Preprocess.from_config(
        dict(mode="pad_square", resize=8, crop=8, interpolation="nearest", mean=[0.0], std=[1.0], channels=1)
    )
    x = p.build()(Image.new("L", (8, 4), 255))  # wide white image -> black bands top and bottom
    assert x.shape == (1, 8, 8)
    assert torch.all(x[0, 2:6] == 1) and torch.all(x[0, :2] == 0) and torch.all(x[0, 6:] == 0)
    small = p.build()(Image.new("L", (4, 4), 255))  # MedCLIP pads small images up to its size
    assert small[0, 2:6, 2:6].eq(1).all() and small[0, :2].eq(0).all()
    encoder, _ = build("medclip")
    with torch.inference_mode():
        out = encoder(torch.randn(2, 1, 224, 224))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_existing_preprocess_modes_are_unchanged():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 80), dtype=np.uint8))
    shortest = Preprocess.from_config(dict(mode="shortest", resize=40, crop=32)).build()(image)
    squash = Preprocess.from_config(dict(mode="squash", crop=32, channels=1, mean=[0.0], std=[1.0])).build()(image)
    assert shortest.shape == (3, 32, 32) and squash.shape == (1, 32, 32)
    assert 0 <= squash.min() and squash.max() <= 1
    with pytest.raises(ValueError, match="mode=nope"):
        Preprocess.from_config(dict(mode="nope"))


# ---------------------------------------------------------------------------- weights
def save(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


def old_swin_key(key: str) -> str:
    return re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)


def outputs(encoder, x):
    with torch.inference_mode():
        return encoder(x)


@pytest.mark.parametrize(
    "name,layout",
    [
        ("resnet50", "plain"),  # timm
        ("mae", "plain"),  # transformers
        ("biomedclip", "open_clip"),  # open_clip, full-model checkpoint (visual.* kept)
        ("medclip", "medclip"),  # MedCLIPModel checkpoint (vision_model.* kept), torch file
        ("sam", "segment_anything"),  # segment-anything layout remapped by timm
        ("ark", "ark"),  # Ark training checkpoint: teacher, module. prefix, projector
    ],
)
@pytest.mark.slow
def test_local_weights_reproduce_the_saved_model(name, layout, tmp_path):
    small = ARK_SMALL if name == "ark" else []
    source, _ = build(name, *small)
    sd = source.model.state_dict()
    if layout == "open_clip":
        sd = {f"visual.{k}": v for k, v in sd.items()} | {"logit_scale": torch.ones(())}
    elif layout == "medclip":
        sd = {f"vision_model.{k}": v for k, v in sd.items()} | {"text_model.x": torch.zeros(1)}
    elif layout == "segment_anything":
        sd = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in sd.items()}
        sd["mask_decoder.w"] = torch.zeros(1)
    elif layout == "ark":  # timm 0.5.4 layout: downsample at the end of the previous stage
        sd = {f"module.{old_swin_key(k.removeprefix('backbone.'))}": v for k, v in sd.items()}
        sd = {"teacher": sd | {"module.omni_heads.0.weight": torch.zeros(1)}, "epoch": torch.tensor(3)}
    suffix = ".pth" if layout in ("medclip", "ark") else ".safetensors"
    path = save(sd, tmp_path / f"weights{suffix}")
    with no_network():
        loaded, _ = build(name, *small, f"encoder.weights={path}", pretrained=True)
    x = torch.stack([loaded.transform()(Image.new("L", (48, 40), v)) for v in (40, 200)])
    torch.testing.assert_close(outputs(loaded, x), outputs(source, x), rtol=0, atol=0)
    assert loaded.info()["weights"] == str(path.resolve())
    assert loaded.cache_key() != source.cache_key()


def test_weights_of_the_wrong_model_are_refused(tmp_path):
    source, _ = build("dinov2_small")
    path = save(source.model.state_dict(), tmp_path / "dino.safetensors")
    with pytest.raises(Exception, match="missing key"):
        build("resnet50", f"encoder.weights={path}", pretrained=True)


def test_torch_files_are_read_without_unpickling_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Path("x")}, path)
    with pytest.raises(EncoderError, match="weights_only=True"):
        hub.read_state_dict(path)


# ---------------------------------------------------------------------------- offline
@pytest.mark.parametrize(
    "name,hub_id",
    [
        ("vit", "timm/vit_base_patch16_224.orig_in21k"),  # timm
        ("rad_dino", "microsoft/rad-dino"),  # transformers
        ("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),  # open_clip
    ],
)
def test_offline_without_weights_fails_fast_naming_the_fixes(name, hub_id):
    # fast = no network attempt (the hub client's retries are what take minutes)
    with no_network() as attempts, pytest.raises(Exception) as caught:
        build(name, pretrained=True)
    assert attempts == []
    message = str(caught.value)
    for part in (f"encoder {name}", hub_id, "network access", "encoder.weights=<"):
        assert part in message, part


@pytest.mark.parametrize(
    "name,where", [("medsam", "bowang-lab/MedSAM"), ("medclip", "RyanWangZf/MedCLIP"), ("ark", "jlianglab/Ark")]
)
def test_weights_not_on_any_hub_say_where_to_get_them(name, where):
    with no_network(), pytest.raises(Exception) as caught:
        build(name, pretrained=True)
    assert where in str(caught.value) and "encoder.weights=<" in str(caught.value)


def test_unreachable_hub_is_probed_once_and_then_offline(monkeypatch):
    """Without HF_HUB_OFFLINE the hub client would retry for ~23 s per file; the probe
    switches it to offline mode instead."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probe_result", None)
    with pytest.raises(Exception, match="network access"):
        hub.hub_file("rad_dino", "microsoft/rad-dino", "config.json")
    assert constants.HF_HUB_OFFLINE is True and hub._probe_result is False


def test_unknown_encoder_lists_the_available_ones(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cbir.run", "encoder=nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "nope" in output
    for name in STUDY:
        assert name in output, name
