"""Files cbir reads back are data, never code, and damaged ones are one-line errors naming the file:
the saved index folder of `cbir.search`, job overrides read back from MLflow by the experiments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir, run_cbir_hang_guarded
from PIL import Image

from cbir.common.safe_config import check_trusted
from cbir.job.checks import ConfigError
from cbir.report.gallery import figure_size
from cbir.search import INDEX_FILE, MANIFEST_FILE, META_FILE, SavedIndex, SearchError

BASELINE = {
    "_target_": "cbir.encoders.classical.ClassicalEncoder",
    "name": "baseline",
    "image_size": 64,
    "grids": [1, 2, 4, 8],
    "orientation_bins": 8,
    "histogram_bins": 16,
}


@pytest.fixture()
def index_folder(tmp_path) -> Path:
    """A saved index written by the code `index.save=true` runs: 6 images embedded by the baseline encoder."""
    from cbir.evaluate import index as cbir_index
    from cbir.evaluate.retrieval import RetrievalSetup, SearchOutput
    from cbir.job.inputs import build_encoder
    from cbir.search import embed_images, save_index

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(images / f"{i}.png")
    table = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(6)],
            "dataset": "test",
            "split": "train",
            "modality": "XR",
            "anatomy": "chest",
            "label": ["A", "A", "A", "B", "B", "B"],
        }
    )
    cfg = compose("encoder=baseline", "index.save=true")
    encoder = build_encoder(cfg)
    embeddings = embed_images(encoder, [images / p for p in table["path"]])
    rows = np.arange(6)
    index = cbir_index.build_index(cbir_index.l2_normalise(embeddings), "flat", use_gpu=False)
    return save_index(
        tmp_path / "index",
        SearchOutput(RetrievalSetup(rows, rows), index, None, None),
        table,
        images,
        cfg,
        "test",
        encoder,
        embeddings,
    )


def refused_search(index_folder: Path, tmp_path: Path):
    """`python -m cbir.search` on the folder's first image, expected to fail: (process, its output)."""
    proc = run_cbir(
        tmp_path,
        f"search.index_dir={index_folder}",
        f"search.images=[{index_folder.parent}/images/0.png]",
        module="cbir.search",
        check=False,
    )
    return proc, proc.stdout + proc.stderr


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(changes)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_an_intact_folder_loads_and_finds_its_own_images(index_folder):
    saved = SavedIndex.load(index_folder)
    scores, positions = saved.search([saved.root / "4.png"], k=2)
    assert positions[0, 0] == 4 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "encoder_block",
    [
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
        {
            "_target_": "cbir.encoders.transformers_encoder.TransformersEncoder",
            "name": "x",
            "model_class": "AutoModel",
            "hub_id": "VICTIM/repo",
            "model_config": {"trust_remote_code": True},
        },
        {
            "_target_": "cbir.encoders.timm_encoder.TimmEncoder",
            "name": "x",
            "model_name": "resnet18",
            "model_kwargs": {"checkpoint_path": "VICTIM"},
        },
    ],
)
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
    proc, text = refused_search(index_folder, tmp_path)
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
        next(word for word in ("index", "json", "manifest") if word in how)
    ]


@pytest.mark.parametrize(
    "how",
    [
        "garbage index",
        "truncated index",
        "empty index",
        "bad json",
        "json not an object",
        "json without rows",
        "manifest without label",
        "binary manifest",
        "manifest rows differ",
    ],
)
def test_a_damaged_folder_is_a_one_line_error_naming_the_file(index_folder, how):
    name = damage(index_folder, how)
    with pytest.raises(SearchError) as caught:
        SavedIndex.load(index_folder)
    message = str(caught.value)
    assert "\n" not in message and (
        "save the index again" in message or "rebuild the index: python -m cbir.run" in message
    )
    assert name in message


def test_the_search_command_reports_a_truncated_index_in_one_line(index_folder, tmp_path):
    damage(index_folder, "truncated index")
    proc, text = refused_search(index_folder, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in text
    assert f"{index_folder / INDEX_FILE}: not the file saved with {META_FILE}" in text


def reseal(folder: Path) -> None:
    """Record the current index.faiss and manifest.csv in index.json, as an edit made consistently would."""
    from cbir.search import file_digest

    edit_meta(folder, files={name: file_digest(folder / name) for name in (INDEX_FILE, MANIFEST_FILE)})


def test_an_index_file_swapped_for_another_of_the_same_shape_is_refused(index_folder):
    import faiss

    from cbir.evaluate.index import l2_normalise

    other = faiss.IndexFlatIP(SavedIndex.load(index_folder).index.d)  # same rows and dimension, other vectors
    other.add(l2_normalise(np.random.default_rng(1).normal(size=(6, other.d))))
    faiss.write_index(other, str(index_folder / INDEX_FILE))
    with pytest.raises(
        SearchError,
        match=f"{INDEX_FILE}: not the file saved with {META_FILE}.*rebuild the index: "
        "python -m cbir.run dataset=synthetic encoder=baseline index.save=true",
    ):
        SavedIndex.load(index_folder)
    reseal(index_folder)  # checksum edited to match: the vectors still disagree with the recorded rows
    with pytest.raises(SearchError, match=f"{INDEX_FILE}: does not hold the vectors {META_FILE} records"):
        SavedIndex.load(index_folder)


def test_an_encoder_swapped_for_another_of_the_same_dimension_is_refused(index_folder):
    from cbir.encoders.classical import ClassicalEncoder

    other = {**BASELINE, "image_size": 32}  # same 285-d output, other vectors
    assert (
        ClassicalEncoder(**{k: v for k, v in other.items() if k != "_target_"}).dim
        == SavedIndex.load(index_folder).index.d
    )
    edit_meta(index_folder, encoder=other)
    with pytest.raises(SearchError, match="is not the one the index was made with.*rebuild the index"):
        SavedIndex.load(index_folder).build_encoder()
    # the encoder's key edited to match: its vectors for the fingerprint rows still differ
    edit_meta(index_folder, encoder_key=ClassicalEncoder(image_size=32).cache_key())
    with pytest.raises(SearchError, match=r"does not give the index's vectors \(cosine"):
        SavedIndex.load(index_folder).build_encoder()


def test_the_search_command_refuses_a_swapped_encoder_in_one_line(index_folder, tmp_path):
    edit_meta(index_folder, encoder={**BASELINE, "image_size": 32})
    proc, text = refused_search(index_folder, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in text and "similarity" not in text
    assert f"{index_folder / META_FILE}: the encoder it describes" in text and "rebuild the index" in text


def test_changed_fingerprint_images_leave_the_identity_check(index_folder, caplog):
    """Images edited since saving cannot re-check the encoder: a warning, and the search still works."""
    for i in range(6):
        Image.fromarray(np.full((32, 32), 10 * i, np.uint8)).save(index_folder.parent / "images" / f"{i}.png")
    saved = SavedIndex.load(index_folder)
    with caplog.at_level("WARNING", logger="cbir.search"):
        saved.build_encoder()
    assert "checked by its identity only" in caplog.text


def test_a_folder_without_checksums_is_refused(index_folder):
    meta = json.loads((index_folder / META_FILE).read_text())
    for key in ("files", "encoder_key", "fingerprint"):
        del meta[key]
    (index_folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SearchError, match="saved by an older cbir, or edited\\); rebuild the index"):
        SavedIndex.load(index_folder)


@pytest.mark.parametrize("path", ["/etc/passwd", "../../outside.png", "../images/../../outside.png", "OUTSIDE"])
def test_index_paths_outside_the_image_root_are_refused(index_folder, tmp_path, path):
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    manifest = pd.read_csv(index_folder / MANIFEST_FILE)
    manifest.loc[2, "path"] = str(outside) if path == "OUTSIDE" else path
    manifest.to_csv(index_folder / MANIFEST_FILE, index=False)
    with pytest.raises(SearchError, match=f"{MANIFEST_FILE}: not the file saved with"):
        SavedIndex.load(index_folder)
    reseal(index_folder)  # even when the checksum is made to match, no row leaves the root
    with pytest.raises(SearchError, match=f"{MANIFEST_FILE}, row 4: path .* is outside the image root"):
        SavedIndex.load(index_folder)


def test_an_unknown_encoder_option_is_a_one_line_error(index_folder):
    edit_meta(index_folder, encoder={**BASELINE, "no_such_option": 1})
    with pytest.raises(
        SearchError,
        match="index.json encoder: cannot build cbir.encoders.classical.ClassicalEncoder "
        r"\(.*no_such_option.*\); rebuild the index",
    ) as caught:
        SavedIndex.load(index_folder).build_encoder()
    assert "\n" not in str(caught.value)


def test_the_search_command_refuses_an_encoder_interface_in_one_line(index_folder, tmp_path):
    edit_meta(index_folder, encoder={**BASELINE, "_target_": "cbir.encoders.base.Encoder"})
    proc, text = refused_search(index_folder, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in text
    assert "_target_='cbir.encoders.base.Encoder' is not a cbir.encoders class shipped with cbir" in text


def test_a_fifo_among_the_index_images_is_an_unreadable_panel_not_a_hang(index_folder, tmp_path):
    """The FIFO replaces an indexed image (the folder itself is intact); the gallery must still be drawn."""
    (index_folder.parent / "images" / "3.png").unlink()
    os.mkfifo(index_folder.parent / "images" / "3.png")
    proc = run_cbir_hang_guarded(
        tmp_path,
        f"search.index_dir={index_folder}",
        "search.k=6",
        f"search.images=[{index_folder.parent}/images/0.png]",
        "search.gallery=hits.png",
        module="cbir.search",
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in text
    assert "gallery: 1 image(s) shown as 'unreadable', e.g." in text and "3.png: a FIFO (named pipe)" in text
    assert Image.open(tmp_path / "hits.png").size == figure_size(1, 6)


def test_a_fifo_given_as_query_is_refused_before_any_work(index_folder, tmp_path):
    from cbir.search import search_command

    os.mkfifo(tmp_path / "query.png")
    cfg = compose(f"search.index_dir={index_folder}", f"search.images=[{tmp_path / 'query.png'}]", config_name="search")
    with pytest.raises(SearchError, match=r"search.images: not image file\(s\): .*query.png \(a FIFO \(named pipe\)\)"):
        search_command(cfg)


@pytest.mark.parametrize("k", [0, -2, "ten"])
def test_search_k_must_be_positive(index_folder, k):
    from cbir.search import search_command

    cfg = compose(
        f"search.index_dir={index_folder}",
        f"search.images=[{index_folder.parent}/images/0.png]",
        f"search.k={k}",
        config_name="search",
    )
    with pytest.raises(ConfigError, match=f"search.k={k}: give an integer >= 1"):
        search_command(cfg)


def test_one_image_may_be_given_without_brackets(index_folder, tmp_path):
    from cbir.search import search_command

    out = tmp_path / "hits.csv"
    cfg = compose(
        f"search.index_dir={index_folder}",
        f"search.images={index_folder.parent}/images/0.png",
        "search.k=3",
        f"search.output={out}",
        config_name="search",
    )
    results = search_command(cfg)
    assert len(results) == 3 and results["index_row"].iloc[0] == 0


# ------------------------------------------------------------------ configs read back from MLflow
def test_dataset_and_encoder_configs_of_cbir_are_trusted():
    cfg = compose("dataset=combined", "encoder=dinov2")
    check_trusted(cfg.dataset, "cbir.data", "dataset")  # nested parts are cbir classes too
    check_trusted(cfg.encoder, "cbir.encoders", "encoder")
    for name in ("csv", "folder", "synthetic"):
        check_trusted(compose(f"dataset={name}").dataset, "cbir.data", "dataset")


@pytest.mark.parametrize(
    "overrides",
    [
        ["encoder._target_=builtins.exec"],
        ["dataset._target_=cbir.encoders.classical.ClassicalEncoder"],  # a cbir class, but of the wrong kind
        ["dataset._target_=cbir.data.base.DatasetReader"],  # the readers' interface: cannot be built
        ["+dataset.extra._target_=os.system"],
        ["dataset=combined", "dataset.parts.nih14._target_=subprocess.call"],
    ],
)
def test_job_overrides_read_back_cannot_name_other_callables(overrides, tmp_path):
    """The experiments rebuild a job from its overrides logged to MLflow (config/overrides.yaml)."""
    from omegaconf import OmegaConf

    from experiments.common import Context, run_embeddings

    ctx = Context(OmegaConf.create({"workdir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="is not a cbir"):
        run_embeddings(ctx, ["tracking.enabled=false", *overrides])
