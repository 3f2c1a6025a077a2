"""Config values that cannot work are one-line errors naming the key, before any data, model or
extraction (checked in-process on the composed config; the CLI path is in test_reliability)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose

from cbir.job.checks import ConfigError, check_index_type, validate_config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eval.n=[a,5]"], "eval.n=['a', 5]: give positive integers"),
        (["eval.n=[1.5]"], "eval.n=[1.5]: give positive integers"),
        (["eval.n=5"], "eval.n=5: give a list, e.g. eval.n=[1,3,5,10] (or [5] for one N)"),
        (["data.max_skip_fraction=abc"], "data.max_skip_fraction=abc: give a fraction between 0 and 1"),
        (["data.max_skip_fraction=2"], "data.max_skip_fraction=2: give a fraction between 0 and 1"),
        (["extract.batch_size=0"], "extract.batch_size=0: give an integer >= 1"),
        (["extract.num_workers=-1"], "extract.num_workers=-1: give an integer >= 0"),
        (["eval.saturation=[0,5]"], "eval.saturation=[0, 5]: 0 is not an index size"),
        (["eval.saturation=[10,abc]"], "eval.saturation=[10, 'abc']: abc is not an index size"),
        (["eval.curve_k=many"], "eval.curve_k=many: give an integer >= 0"),
        (["eval.levels=[modality,organ]"], "eval.levels=['modality', 'organ']: unknown level(s) ['organ']"),
        (["seed=abc"], "seed=abc: give an integer"),
        (["seed=-1"], "seed=-1: give an integer >= 0"),  # numpy refuses it in the gallery
        (["index.seed=-1"], "index.seed=-1: give an integer >= 0"),  # and in the index sampling
        (["extract.accelerator=tpux"], "extract.accelerator=tpux: use one of ['auto', 'cpu', 'gpu', 'cuda', 'mps']"),
        (["index=hnsw", "index.params.M=0"], "index.params.M=0: give an integer >= 2"),
        (["index=hnsw", "index.params.M=1"], "index.params.M=1: give an integer >= 2"),
        (["index=ivf", "index.params.nlist=0"], "index.params.nlist=0: give an integer >= 1"),
        (["index=ivf", "index.params.nprobe=0"], "index.params.nprobe=0: give an integer >= 1"),
        (["index=ivfpq", "index.params.nbits=0"], "index.params.nbits=0: give an integer >= 1"),
        (["index=ivfpq", "index.params.nbits=40"], "index.params.nbits=40: give at most 16"),
        (["index=ivf", "+index.params.nprobes=3"], "index.params: unknown key(s) ['nprobes']"),
        (["index=hnsw", "index.params.efSearch=ten"], "index.params.efSearch=ten: give an integer >= 1"),
        # dinov2's config states its dimension: the PQ size is checked against it, not against a guess
        (
            ["encoder=dinov2", "index=ivfpq", "index.params.m=7"],
            "index.params.m=7: must divide the embedding dimension 768",
        ),
        (
            ["encoder=resnet50", "index=ivfpq", "index.params.m=48"],
            "index.params.m=48: must divide the embedding dimension 2048",
        ),
        (["encoder=dinov2", "index.type='IVF64,PQ7'"], "index.type=IVF64,PQ7: not a known index for 768-d embeddings"),
        (["index.type=NoSuchIndex"], "index.type=NoSuchIndex: not a known index"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(overrides, message):
    cfg = compose("tracking.enabled=false", *overrides)
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["eval.n=[5]"],
        ["eval.saturation=[10,null,all]"],
        ["data.max_skip_fraction=1"],
        ["encoder=dinov2", "index=ivfpq"],
        ["encoder=dinov2", "index=hnsw", "index.params.M=2"],
        ["index.type='IVF16,Flat'"],
        ["encoder=dinov2", "index.type='IVF64,PQ8'"],
    ],
)
def test_good_values_pass(overrides):
    validate_config(compose("tracking.enabled=false", *overrides))


def test_dimension_dependent_checks_run_once_the_encoder_is_built():
    """The baseline's config does not state its dimension (it follows from its grids): PQ sizes
    are checked against the built encoder's, which is cheap and comes before extraction."""
    from cbir.encoders.classical import ClassicalEncoder

    dim = ClassicalEncoder().dim
    assert dim == 285  # 16 does not divide it
    cfg = compose("tracking.enabled=false", "encoder=baseline", "index=ivfpq", "index.params.m=16")
    validate_config(cfg)  # nothing to say yet
    with pytest.raises(ConfigError) as caught:
        check_index_type(cfg, dim)
    # the real divisors, not a guess among powers of two
    assert str(caught.value) == (
        "index.params.m=16: must divide the embedding dimension 285; use one of "
        "[1, 3, 5, 15, 19, 57, 95, 285], or leave it unset (null) to take 15"
    )
    check_index_type(compose("encoder=baseline", "index=ivfpq", "index.params.m=19"), dim)
    check_index_type(compose("encoder=baseline", "index=ivfpq"), dim)  # the preset's m is chosen from the dimension


def test_build_index_refuses_what_would_crash_faiss():
    """HNSW with M=0 aborts the process inside FAISS; PQ with too few rows fails mid-training."""
    from cbir.evaluate.index import build_index

    vectors = np.eye(16, dtype=np.float32)
    with pytest.raises(ConfigError, match="index.params.M=0"):
        build_index(vectors, "hnsw", use_gpu=False, params={"M": 0})
    with pytest.raises(ConfigError, match="index.params.nbits=8: product quantisation needs at least 256 index rows"):
        build_index(vectors, "ivfpq", use_gpu=False, params={"m": 4, "nbits": 8, "nlist": 1})


def test_every_shipped_encoder_and_index_preset_passes():
    """No false alarms: the presets' defaults fit every encoder whose config states its dimension
    (the baseline's 285-d descriptor, whose ivfpq size comes from its dimension, is checked above)."""
    from conftest import CONF_DIR
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    encoders = sorted(p.stem for p in (CONF_DIR / "encoder").glob("*.yaml"))
    indexes = sorted(p.stem for p in (CONF_DIR / "index").glob("*.yaml"))
    checked = 0
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        presets = {index: hydra_compose("config", [f"index={index}"]).index for index in indexes}
        for encoder in encoders:
            cfg = hydra_compose("config", ["tracking.enabled=false", f"encoder={encoder}"])
            if cfg.encoder.get("dim") is None:
                continue
            for preset in presets.values():
                cfg.index = preset
                validate_config(cfg)
                checked += 1
    assert checked >= 4 * 14


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_a_gpu_accelerator_without_a_gpu_is_a_config_error(accelerator):
    with pytest.raises(ConfigError, match=f"extract.accelerator={accelerator}: PyTorch sees no such device"):
        validate_config(compose("tracking.enabled=false", f"extract.accelerator={accelerator}"))


@pytest.mark.parametrize("key", ["paths.cache_dir", "paths.data_dir"])
@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_a_folder_that_is_a_file_or_lies_beneath_one_is_a_config_error(tmp_path, key, below):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    path = file / below if below else file
    with pytest.raises(ConfigError) as caught:
        validate_config(compose("tracking.enabled=false", "dataset=synthetic_small", f"{key}={path}"))
    message = str(caught.value)
    assert f"{file} is a file, not a folder" in message and "\n" not in message
    assert key in message  # paths.data_dir is named through the dataset's root inside it
    assert list(tmp_path.iterdir()) == [file]  # nothing created


def test_a_folder_on_a_read_only_file_system_is_a_config_error(tmp_path):
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], check=False, capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        for key, shown in (("paths.cache_dir", "paths.cache_dir="), ("paths.data_dir", "dataset.root=")):
            with pytest.raises(ConfigError, match=f"{shown}{mount}.*: {mount} is on a read-only file system"):
                validate_config(compose("tracking.enabled=false", "dataset=synthetic_small", f"{key}={mount}/x"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_dataset_that_only_reads_its_folder_does_not_need_it_writable(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("")
    validate_config(compose("tracking.enabled=false", "dataset=csv", f"paths.data_dir={file}/sub"))


def _table(per_class: dict[str, int]):
    """A manifest table with these train rows per class and one test row per class."""
    import pandas as pd

    rows = [(f"{label}/{i}.png", "train", label) for label, n in per_class.items() for i in range(n)]
    rows += [(f"{label}/q.png", "test", label) for label in per_class]
    return pd.DataFrame(rows, columns=["path", "split", "label"])


def test_index_params_are_settled_before_extraction_and_written_where_they_are_logged(caplog):
    from cbir.job.checks import settle_index_params

    table = _table({"a": 200, "b": 56})  # 256 index rows
    cfg = compose("tracking.enabled=false", "index=ivf", "index.params.nlist=100000")
    with caplog.at_level("WARNING"):
        settle_index_params(cfg, table, 285)
    assert (
        cfg.index.params.nlist == 256 // 39 and cfg.index.params.nprobe is None
    )  # chosen at search time from sampled recall
    assert [r.getMessage() for r in caplog.records] == ["index.params.nlist=100000 > 256 index rows: using nlist=6"]
    cfg = compose("tracking.enabled=false", "index=ivf", "index.params.nlist=100000", "index.per_class=20")
    settle_index_params(cfg, table, 285)
    assert cfg.index.params.nlist == 1  # 40 rows: per_class counts

    cfg = compose("tracking.enabled=false", "index=ivfpq")
    settle_index_params(cfg, table, 285)
    assert cfg.index.params.m == 15  # the preset works for the baseline's 285-d embeddings
    settle_index_params(cfg, table, 768)
    assert cfg.index.params.m == 15  # settled once: an explicit value is kept
    cfg = compose("tracking.enabled=false", "index=ivfpq")
    settle_index_params(cfg, table, 768)
    assert cfg.index.params.m == 16


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["index.params.m=5", "index.params.nbits=12"],
            "index.params.nbits=12: product quantisation needs at least 4096 index rows to train, the index has 256",
        ),
        (
            ["eval.saturation=[1,null]"],
            "index.params.nbits=8: product quantisation needs at least 256 index rows to train, eval.saturation size 1 gives 2",
        ),
    ],
)
def test_a_product_quantiser_without_enough_rows_is_refused_before_extraction(overrides, message):
    from cbir.job.checks import settle_index_params

    cfg = compose("tracking.enabled=false", "index=ivfpq", *overrides)
    with pytest.raises(ConfigError) as caught:
        settle_index_params(cfg, _table({"a": 200, "b": 56}), 285)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_build_index_chooses_the_pq_size_from_the_dimension():
    from cbir.evaluate.index import build_index, pq_size

    assert [pq_size(d) for d in (285, 768, 2048, 384, 7)] == [15, 16, 16, 16, 7]
    vectors = np.random.default_rng(0).normal(size=(64, 285)).astype(np.float32)
    index = build_index(vectors, "ivfpq", use_gpu=False, params={"nlist": 1, "nbits": 4})
    import faiss

    assert faiss.downcast_index(faiss.extract_index_ivf(index)).pq.M == 15 and index.ntotal == 64
