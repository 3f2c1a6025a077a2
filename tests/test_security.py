"""Files cbir reads back are data, never code, and damaged ones are one-line errors naming the file:
the saved index folder of `cbir.search`, job overrides read back from MLflow by the experiments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cbir.checks import ConfigError
from cbir.safe_config import check_trusted
from cbir.search import INDEX_FILE, MANIFEST_FILE, META_FILE, SavedIndex, SearchError
from conftest import compose, run_cbir

BASELINE = {"_target_": "cbir.encoders.classical.ClassicalEncoder", "name": "baseline", "image_size": 64,
            "grids": [1, 2, 4, 8], "orientation_bins": 8, "histogram_bins": 16}


@pytest.fixture()
def index_folder(tmp_path) -> Path:
    """A saved index as `index.save=true` writes it: 6 images embedded by the baseline encoder."""
    import faiss
    import torch

    from cbir.encoders.classical import ClassicalEncoder
    from cbir.index import l2_normalise

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(images / f"{i}.png")
    encoder = ClassicalEncoder()
    transform = encoder.transform()
    from cbir.data.images import load_image

    with torch.inference_mode():
        vectors = encoder(torch.stack([transform(load_image(images / f"{i}.png")) for i in range(6)])).numpy()
    index = faiss.IndexFlatIP(encoder.dim)
    index.add(l2_normalise(vectors))
    folder = tmp_path / "index"
    folder.mkdir()
    faiss.write_index(index, str(folder / INDEX_FILE))
    pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "split": "train",
                  "label": ["A", "A", "A", "B", "B", "B"]}).to_csv(folder / MANIFEST_FILE, index=False)
    meta = {"encoder": BASELINE, "seed": 0, "root": str(images), "rows": 6, "dim": encoder.dim,
            "index": {"type": "flat", "params": {}}, "run_name": "test"}
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(changes)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_an_intact_folder_loads_and_finds_its_own_images(index_folder):
    saved = SavedIndex.load(index_folder)
    scores, positions = saved.search([saved.root / "4.png"], k=2)
    assert positions[0, 0] == 4 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("encoder_block", [
    {"_target_": "builtins.open", "_args_": ["VICTIM", "w"]},
    {"_target_": "os.system", "_args_": ["touch VICTIM"]},
    {"_target_": "cbir.encoders.base.weights_identity", "weights": "VICTIM", "pretrained": False},  # not a class
    {"_target_": "cbir.encoders.base.Path", "_args_": ["VICTIM"]},  # a class, but not an encoder
    # cbir's encoder interfaces: defined in cbir, but they leave the work to subclasses
    {"_target_": "cbir.encoders.base.Encoder"},
    {**BASELINE, "_target_": "cbir.encoders.base.Encoder"},
    {"_target_": "cbir.encoders.base.PretrainedEncoder", "name": "VICTIM"},
    {**BASELINE, "_args_": ["VICTIM"]},
    {**BASELINE, "grids": {"_target_": "builtins.open", "_args_": ["VICTIM", "w"]}},  # nested
    {**BASELINE, "name": "${oc.env:HOME}"},
    # a shipped encoder class, but options that make its library run hub code or unpickle a file
    {"_target_": "cbir.encoders.transformers_encoder.TransformersEncoder", "name": "x", "model_class": "AutoModel",
     "hub_id": "VICTIM/repo", "model_config": {"trust_remote_code": True}},
    {"_target_": "cbir.encoders.timm_encoder.TimmEncoder", "name": "x", "model_name": "resnet18",
     "model_kwargs": {"checkpoint_path": "VICTIM"}},
])
def test_a_crafted_encoder_block_is_refused_before_anything_is_called(index_folder, tmp_path, encoder_block):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    block = json.loads(json.dumps(encoder_block).replace("VICTIM", str(victim)))
    edit_meta(index_folder, encoder=block)
    with pytest.raises(ConfigError, match=f"{META_FILE} encoder"):
        SavedIndex.load(index_folder).build_encoder()
    assert victim.read_text() == "precious"


def test_the_search_command_refuses_a_crafted_index_in_one_line(index_folder, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    edit_meta(index_folder, encoder={"_target_": "builtins.open", "_args_": [str(victim), "w"]})
    proc = run_cbir(tmp_path, f"search.index_dir={index_folder}", f"search.images=[{index_folder.parent}/images/0.png]",
                    module="cbir.search", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text
    assert "_target_='builtins.open' is not a cbir.encoders class shipped with cbir" in text
    assert victim.read_text() == "precious"


def damage(folder: Path, how: str) -> str:
    """Damage the folder one way; returns the file the error must name."""
    if how == "garbage index":
        (folder / INDEX_FILE).write_bytes(b"\x00garbage" * 100)
    elif how == "truncated index":
        data = (folder / INDEX_FILE).read_bytes()
        (folder / INDEX_FILE).write_bytes(data[: len(data) // 2])
    elif how == "empty index":
        (folder / INDEX_FILE).write_bytes(b"")
    elif how == "bad json":
        (folder / META_FILE).write_text('{"encoder": {')
    elif how == "json not an object":
        (folder / META_FILE).write_text("[1, 2]")
    elif how == "json without rows":
        meta = json.loads((folder / META_FILE).read_text())
        del meta["rows"]
        (folder / META_FILE).write_text(json.dumps(meta))
    elif how == "manifest without label":
        pd.read_csv(folder / MANIFEST_FILE).drop(columns="label").to_csv(folder / MANIFEST_FILE, index=False)
    elif how == "binary manifest":
        (folder / MANIFEST_FILE).write_bytes(bytes(range(256)) * 8)
    elif how == "manifest rows differ":
        pd.read_csv(folder / MANIFEST_FILE).iloc[:4].to_csv(folder / MANIFEST_FILE, index=False)
    return {"index": INDEX_FILE, "json": META_FILE, "manifest": MANIFEST_FILE}[
        next(word for word in ("index", "json", "manifest") if word in how)]


@pytest.mark.parametrize("how", ["garbage index", "truncated index", "empty index", "bad json", "json not an object",
                                 "json without rows", "manifest without label", "binary manifest",
                                 "manifest rows differ"])
def test_a_damaged_folder_is_a_one_line_error_naming_the_file(index_folder, how):
    name = damage(index_folder, how)
    with pytest.raises(SearchError) as caught:
        SavedIndex.load(index_folder)
    message = str(caught.value)
    assert "\n" not in message and "save the index again" in message
    assert name in message or how == "manifest rows differ"


def test_the_search_command_reports_a_truncated_index_in_one_line(index_folder, tmp_path):
    damage(index_folder, "truncated index")
    proc = run_cbir(tmp_path, f"search.index_dir={index_folder}", f"search.images=[{index_folder.parent}/images/0.png]",
                    module="cbir.search", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text
    assert f"{index_folder / INDEX_FILE}: not a readable FAISS index" in text


@pytest.mark.parametrize("k", [0, -2, "ten"])
def test_search_k_must_be_positive(index_folder, k):
    from cbir.search import search_command

    cfg = compose(f"search.index_dir={index_folder}", f"search.images=[{index_folder.parent}/images/0.png]",
                  f"search.k={k}", config_name="search")
    with pytest.raises(ConfigError, match=f"search.k={k}: give an integer >= 1"):
        search_command(cfg)


def test_one_image_may_be_given_without_brackets(index_folder, tmp_path):
    from cbir.search import search_command

    out = tmp_path / "hits.csv"
    cfg = compose(f"search.index_dir={index_folder}", f"search.images={index_folder.parent}/images/0.png",
                  "search.k=3", f"search.output={out}", config_name="search")
    results = search_command(cfg)
    assert len(results) == 3 and results["index_row"].iloc[0] == 0


# ------------------------------------------------------------------ configs read back from MLflow
def test_dataset_and_encoder_configs_of_cbir_are_trusted():
    cfg = compose("dataset=combined", "encoder=dinov2")
    check_trusted(cfg.dataset, "cbir.data", "dataset")  # nested parts are cbir classes too
    check_trusted(cfg.encoder, "cbir.encoders", "encoder")
    for name in ("csv", "folder", "synthetic"):
        check_trusted(compose(f"dataset={name}").dataset, "cbir.data", "dataset")


@pytest.mark.parametrize("overrides", [
    ["encoder._target_=builtins.exec"],
    ["dataset._target_=cbir.encoders.classical.ClassicalEncoder"],  # a cbir class, but of the wrong kind
    ["dataset._target_=cbir.data.base.DatasetReader"],  # the readers' interface: cannot be built
    ["+dataset.extra._target_=os.system"],
    ["dataset=combined", "dataset.parts.nih14._target_=subprocess.call"],
])
def test_job_overrides_read_back_cannot_name_other_callables(overrides, tmp_path):
    """The experiments rebuild a job from its overrides logged to MLflow (config/overrides.yaml)."""
    from experiments.common import Context, run_embeddings

    from omegaconf import OmegaConf

    ctx = Context(OmegaConf.create({"workdir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="is not a cbir"):
        run_embeddings(ctx, ["tracking.enabled=false", *overrides])
