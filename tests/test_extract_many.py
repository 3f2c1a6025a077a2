"""Shared extraction: one decode per image for several encoders, bit-identical to single-encoder
extraction, same cache keys, resume per encoder, device-side preprocessing within tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose
from hydra.utils import instantiate
from PIL import Image

from cbir.data.manifest import Manifest
from cbir.extract.shared import extract_shared, plan_inputs, prepare_on_device
from cbir.extract.single import cache_key, extract_embeddings
from cbir.extract.store import EmbeddingStore

TIMM = "cbir.encoders.timm_encoder.TimmEncoder"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# random-weight encoders of different input sizes and preprocessing; two share one preprocessing
ENCODERS = {
    "baseline": {"_target_": "cbir.encoders.classical.ClassicalEncoder", "name": "baseline"},
    "resnet224": {
        "_target_": TIMM,
        "name": "resnet224",
        "model_name": "test_resnet",
        "pretrained": False,
        "preprocess": {"mode": "shortest", "resize": 256, "crop": 224, "interpolation": "bicubic", **IMAGENET},
    },
    "effnet224": {
        "_target_": TIMM,
        "name": "effnet224",
        "model_name": "test_efficientnet",
        "pretrained": False,
        "preprocess": {"mode": "shortest", "resize": 256, "crop": 224, "interpolation": "bicubic", **IMAGENET},
    },
    "vit160": {
        "_target_": TIMM,
        "name": "vit160",
        "model_name": "test_vit",
        "pretrained": False,
        "preprocess": {"mode": "squash", "crop": 160, "interpolation": "bilinear", **IMAGENET},
    },
    "convnext96": {
        "_target_": TIMM,
        "name": "convnext96",
        "model_name": "test_convnext",
        "pretrained": False,
        "preprocess": {"mode": "longest_pad", "crop": 96, "rescale": "minmax", **IMAGENET},
    },
}


def build(name: str):
    torch.manual_seed(0)
    return instantiate(ENCODERS[name])


@pytest.fixture(scope="module")
def setup(shared_data_dir):
    cfg = compose("debug=smoke", f"paths.data_dir={shared_data_dir}")
    full = instantiate(cfg.dataset).load_manifest()
    manifest = Manifest(table=full.table.iloc[:40].reset_index(drop=True), root=full.root, source="first 40 rows")
    return cfg, manifest


@pytest.fixture(scope="module")
def singles(setup, tmp_path_factory):
    """Each encoder extracted on its own: the reference."""
    cfg, manifest = setup
    store = EmbeddingStore(tmp_path_factory.mktemp("single"))
    return {name: extract_embeddings(build(name), manifest, store, cfg.extract) for name in ENCODERS}


@pytest.mark.slow  # five encoders at up to 224 px, each extracted twice
def test_shared_pass_equals_single_extractions_bit_for_bit(setup, singles, tmp_path, caplog):
    cfg, manifest = setup
    encoders = [build(name) for name in ENCODERS]
    store = EmbeddingStore(tmp_path)
    with caplog.at_level("INFO", logger="cbir.extract.shared"):
        shared = extract_shared(encoders, manifest, store, cfg.extract)
    assert shared.decodes == len(manifest)  # each image decoded once for five encoders
    assert f"decoded {len(manifest)} images once for 5 encoders" in caplog.text
    for name, encoder in zip(ENCODERS, encoders):
        key = cache_key(encoder, manifest)
        assert key == singles[name].cached.key  # the single-encoder key, so single runs hit it
        got = shared.extractions[key]
        assert not got.cache_hit and got.rows_extracted == len(manifest)
        assert np.array_equal(np.asarray(got.embeddings), np.asarray(singles[name].embeddings)), name
        assert np.array_equal(got.valid, singles[name].valid) and got.valid.all()
        assert set(shared.timings[name]) == {"decode", "preprocess", "forward", "write"}
        # a later single-encoder extraction is a cache hit on the entry the pass wrote
        again = extract_embeddings(build(name), manifest, store, cfg.extract)
        assert again.cache_hit and again.cached.path == got.cached.path
    # a second pass finds everything cached: nothing decoded
    assert extract_shared(encoders, manifest, store, cfg.extract).decodes == 0


def test_killed_pass_resumes_per_encoder(setup, singles, tmp_path, caplog):
    """A pass stopped by an unreadable file (data.on_error=raise) keeps every row it computed,
    for every encoder; the next pass decodes only what is left and equals the reference."""
    cfg, manifest = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    table = manifest.table.copy()
    table.loc[35, "path"] = str(broken)  # second batch (batch_size 32)
    damaged = Manifest(table=table, root=manifest.root, source="one unreadable file")
    names = ["baseline", "vit160"]
    store = EmbeddingStore(tmp_path / "cache")
    from cbir.data.images import ImageLoadError

    with pytest.raises(ImageLoadError, match="broken.png"):
        extract_shared([build(n) for n in names], damaged, store, cfg.extract, on_error="raise")
    with caplog.at_level("INFO", logger="cbir.extract.shared"):
        resumed = extract_shared([build(n) for n in names], damaged, store, cfg.extract, on_error="skip")
    assert caplog.text.count("resuming extraction") == 2
    assert resumed.decodes == 1  # only the unreadable row was left
    for name in names:
        got = resumed.extractions[cache_key(build(name), damaged)]
        assert got.rows_extracted == 1 and not got.valid[35] and got.valid.sum() == len(manifest) - 1
        keep = np.arange(len(manifest)) != 35
        assert np.array_equal(np.asarray(got.embeddings)[keep], np.asarray(singles[name].embeddings)[keep])


# Device-side preprocessing: on a GPU the uint8 resize runs in float and is rounded back, where
# the CPU has an exact uint8 kernel, so a pixel may differ by one grey level: 1/255 before
# normalisation, 1/(255*std) after. That is the tolerance stated and tested here.
TOLERANCE = 1 / (255 * min(IMAGENET["std"])) + 1e-5


def test_device_preprocessing_matches_pil_path():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)) for h, w in ((40, 52), (40, 52), (64, 30))]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)))  # RGB among grey
    encoders = [build(name) for name in ENCODERS]
    device_plan = plan_inputs(encoders, on_device=True)
    cpu_plan = plan_inputs(encoders, on_device=False)
    assert len(device_plan.worker_transforms) == 2  # workers only decode: one grey, one RGB tensor
    assert len(cpu_plan.worker_transforms) == 4  # the two 224 encoders share one input
    worst = 0.0
    for (src, steps), transform in zip(device_plan.device_steps, cpu_plan.worker_transforms):
        decoded = [device_plan.worker_transforms[src](im) for im in images]
        assert all(d.dtype == torch.uint8 for d in decoded)
        on_device = prepare_on_device(decoded, steps)
        on_cpu = torch.stack([transform(im) for im in images])
        assert on_device.shape == on_cpu.shape
        worst = max(worst, float((on_device - on_cpu).abs().max()))
    assert worst <= TOLERANCE


def test_device_preprocessing_pass_equals_pil_pass(setup, singles, tmp_path):
    cfg, manifest = setup
    names = ["baseline", "resnet224", "convnext96"]
    cfg = compose("debug=smoke", "extract.device_preprocess=true", "extract.num_workers=1").extract
    shared = extract_shared([build(n) for n in names], manifest, EmbeddingStore(tmp_path), cfg)
    assert shared.decodes == len(manifest)
    for name in names:
        got = shared.extractions[singles[name].cached.key]
        np.testing.assert_allclose(
            np.asarray(got.embeddings), np.asarray(singles[name].embeddings), rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow  # two DDP ranks started on CPU
def test_ddp_ranks_write_every_encoders_rows(setup, singles, tmp_path):
    _, manifest = setup
    names = ["baseline", "vit160"]
    ddp = compose(
        "debug=smoke", "extract.accelerator=cpu", "extract.devices=2", "extract.strategy=ddp", "extract.num_workers=1"
    ).extract
    shared = extract_shared([build(n) for n in names], manifest, EmbeddingStore(tmp_path), ddp)
    assert shared.decodes is None  # counted in the ranks, which log their own counts
    for name in names:
        got = shared.extractions[singles[name].cached.key]
        assert got.valid.all() and not got.cache_hit
        np.testing.assert_allclose(
            np.asarray(got.embeddings), np.asarray(singles[name].embeddings), rtol=1e-5, atol=1e-6
        )


def test_a_transform_failing_on_an_image_fails_only_its_own_input(tmp_path):
    """As in single-encoder extraction: an image one preprocessing cannot handle is a failed row
    for the encoders fed by that preprocessing only, not for every encoder of the pass."""
    from PIL import Image

    from cbir.extract.shared import SharedImageRows

    def fails_on_small(image):
        if min(image.size) < 16:
            raise ValueError("too small for this preprocessing")
        return torch.zeros(1, 4, 4)

    def always_works(image):
        return torch.ones(1, 4, 4)

    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    Image.new("L", (32, 32)).save(tmp_path / "large.png")
    dataset = SharedImageRows(
        [tmp_path / "small.png", tmp_path / "large.png", tmp_path / "absent.png"],
        np.arange(3),
        [always_works, fails_on_small],
    )
    (_, _, ok_small, error, _), (_, _, ok_large, _, _), (_, _, ok_absent, _, _) = (dataset[i] for i in range(3))
    assert ok_small.tolist() == [True, False] and "too small" in error
    assert ok_large.tolist() == [True, True]
    assert ok_absent.tolist() == [False, False]  # not decoded: no input can be made
