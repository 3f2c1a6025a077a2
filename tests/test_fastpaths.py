"""Extraction and index fast paths: DDP on CPU equals one process, index presets apply their
parameters, the torch.compile path works, channels_last does not change results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose
from hydra.utils import instantiate

from cbir.extract.single import extract_embeddings
from cbir.extract.store import EmbeddingStore

TINY_TIMM = {
    "_target_": "cbir.encoders.timm_encoder.TimmEncoder",
    "name": "tiny",
    "model_name": "resnet18",
    "pretrained": False,
    "preprocess": {"mode": "squash", "crop": 32, "interpolation": "bilinear"},
}


def _extract(cache, data_dir, *overrides, encoder=None):
    cfg = compose("debug=smoke", "encoder=random", f"paths.data_dir={data_dir}", f"paths.cache_dir={cache}", *overrides)
    manifest = instantiate(cfg.dataset).load_manifest()
    torch.manual_seed(0)
    enc = instantiate(encoder or cfg.encoder)
    extraction = extract_embeddings(enc, manifest, EmbeddingStore(cache), cfg.extract)
    return extraction, cache


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one(tmp_path, shared_data_dir):
    """A real CNN (it runs OpenMP in the launching process before the ranks start), 2 ranks."""
    one, _ = _extract(tmp_path / "one", shared_data_dir, encoder=TINY_TIMM)
    two, cache = _extract(
        tmp_path / "two",
        shared_data_dir,
        "extract.accelerator=cpu",
        "extract.devices=2",
        "extract.strategy=ddp",
        "extract.num_workers=1",
        encoder=TINY_TIMM,
    )
    assert two.rows_extracted == len(one.valid) and not two.cache_hit
    np.testing.assert_allclose(np.asarray(two.embeddings), np.asarray(one.embeddings), rtol=1e-5, atol=1e-6)
    assert np.array_equal(two.valid, one.valid) and two.valid.all()
    # one committed entry, no partial left behind, and it loads again as a cache hit
    entries = sorted(p.name for p in (cache / "embeddings").iterdir() if p.is_dir())
    assert len(entries) == 1 and not entries[0].endswith(".partial")
    again, _ = _extract(cache, shared_data_dir, "extract.devices=2", "extract.strategy=ddp", encoder=TINY_TIMM)
    assert again.cache_hit


def _ddp_rank(rank: int, shipped: bytes, paths: list, rows, shape) -> None:
    """One rank: the writer as a spawned rank receives it, its share of the rows, cbir's module."""
    import pickle

    from lightning.pytorch.overrides.distributed import (
        UnrepeatedDistributedSamplerWrapper,
    )
    from torch.utils.data import DataLoader, SequentialSampler

    from cbir.encoders.classical import ClassicalEncoder
    from cbir.extract.single import EmbeddingModule, ImageRows

    writer, encoder = pickle.loads(shipped), ClassicalEncoder()
    module = EmbeddingModule(encoder)
    dataset = ImageRows(paths, rows, encoder.transform(), shape)
    sampler = UnrepeatedDistributedSamplerWrapper(SequentialSampler(dataset), num_replicas=2, rank=rank, shuffle=False)
    for i, batch in enumerate(DataLoader(dataset, batch_size=2, sampler=sampler)):
        with torch.inference_mode():
            writer.write_on_batch_end(None, module, module.predict_step(batch, i), None, batch, i, 0)
    writer.partial.flush()


@pytest.mark.slow  # two spawned processes importing torch and Lightning
def test_ddp_ranks_write_their_rows_at_the_manifest_rows(tmp_path):
    """What each DDP rank does with cbir's writer: it receives the writer pickled (the on-disk
    arrays reopened, not copied), predicts its share of the rows to extract (here a refresh's
    scattered stale rows, one image broken) and writes each row at its manifest position. Two
    spawned processes (as on GPU; a fork would inherit this process's OpenMP threads): every row
    written once, at its place, the failure recorded."""
    import multiprocessing
    import pickle

    from cbir.data.images import load_image
    from cbir.data.synthetic import SyntheticDataset
    from cbir.encoders.classical import ClassicalEncoder
    from cbir.extract.single import ArrayWriter, _probe_shape
    from cbir.extract.store import PartialEntry, read_skipped

    manifest = SyntheticDataset(
        root=tmp_path / "data",
        modalities=["CT", "MR"],
        anatomies=["head"],
        pathologies=["normal", "lesion"],
        max_per_class=3,
        min_per_class=3,
        image_size=32,
    ).load_manifest()
    paths = manifest.paths()
    paths[8].write_text("not an image")
    rows = np.array([1, 4, 5, 8, 10])  # 5 rows over 2 ranks: 3 + 2, nothing padded
    encoder = ClassicalEncoder()
    transform = encoder.transform()
    (tmp_path / "entry").mkdir()
    partial = PartialEntry.create(tmp_path / "entry", len(paths), encoder.dim, tmp_path)
    shipped = pickle.dumps(ArrayWriter(partial, paths))

    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(target=_ddp_rank, args=(r, shipped, paths, rows, _probe_shape(transform))) for r in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(300)
    assert [p.exitcode for p in ranks] == [0, 0]

    done = np.load(tmp_path / "entry" / "done.npy")
    assert np.flatnonzero(done == 1).tolist() == [1, 4, 5, 10] and np.flatnonzero(done == 2).tolist() == [8]
    written = np.load(tmp_path / "entry" / "embeddings.npy")
    with torch.inference_mode():
        expected = encoder(torch.stack([transform(load_image(paths[r])) for r in (1, 4, 5, 10)])).numpy()
    np.testing.assert_allclose(written[[1, 4, 5, 10]], expected, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(len(paths)), rows)
    assert not written[untouched].any()
    assert [(row, path) for row, path, _ in read_skipped(tmp_path / "entry" / "skipped.csv")] == [(8, str(paths[8]))]


@pytest.mark.slow
def test_compile_and_channels_last_match_eager(tmp_path, shared_data_dir):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    eager, _ = _extract(tmp_path / "eager", shared_data_dir, "extract.channels_last=false", encoder=TINY_TIMM)
    fast, _ = _extract(
        tmp_path / "fast", shared_data_dir, "extract.compile=true", "extract.channels_last=true", encoder=TINY_TIMM
    )
    np.testing.assert_allclose(np.asarray(fast.embeddings), np.asarray(eager.embeddings), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "preset, attribute, value", [("ivf", "nprobe", 7), ("hnsw", "efSearch", 48), ("ivfpq", "nprobe", 5)]
)
def test_index_presets_apply_params(preset, attribute, value):
    import faiss

    from cbir.evaluate.index import build_index, l2_normalise, search

    small = ["++index.params.m=8", "++index.params.nbits=4"] if preset == "ivfpq" else []  # quick PQ training
    cfg = compose(f"index={preset}", f"index.params.{attribute}={value}", "++index.params.nlist=16", *small)
    vectors = l2_normalise(np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32))
    index = build_index(vectors, cfg.index.type, use_gpu=False, params=dict(cfg.index.params))
    inner = faiss.downcast_index(index)
    found = inner.hnsw.efSearch if preset == "hnsw" else inner.nprobe
    assert found == value
    if preset == "hnsw":
        assert inner.hnsw.efConstruction == cfg.index.params.efConstruction
    else:
        assert inner.nlist == 16
    _, ids = search(index, vectors[:50], 5)
    if preset != "ivfpq":  # compressed codes may rank a neighbour above the vector itself
        assert (ids[:, 0] == np.arange(50)).mean() > 0.9


def test_index_params_reject_unknown_keys():
    from cbir.evaluate.index import build_index

    with pytest.raises(ValueError, match="nprobes"):
        build_index(np.eye(4, dtype=np.float32), "ivf", use_gpu=False, params={"nprobes": 3})


def test_ivf_preset_end_to_end(tmp_path, shared_data_dir):
    """The preset's nlist is larger than the small index: it is reduced, and the run works. Its
    nprobe is tuned until sampled recall@10 reaches 0.995, so IVF finds what exact search finds:
    the same metrics as index=flat on the same embeddings, the same neighbours."""
    import faiss

    from cbir.evaluate import retrieval
    from cbir.run import run

    common = (
        "debug=smoke",
        f"paths.data_dir={shared_data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "tracking.enabled=false",
    )
    ivf_cfg, flat_cfg = compose(*common, "index=ivf"), compose(*common, "index=flat")
    ivf, flat = run(ivf_cfg), run(flat_cfg)
    p_at = sorted(k for k in flat.metrics if "P_at_" in k)
    assert len(p_at) > 20 and flat.metrics["micro/P_at_1"] > 0
    assert {k: ivf.metrics[k] for k in p_at} == pytest.approx({k: flat.metrics[k] for k in p_at}, abs=1e-9)

    manifest = instantiate(flat_cfg.dataset).load_manifest()
    torch.manual_seed(int(flat_cfg.seed))
    embeddings = extract_embeddings(
        instantiate(flat_cfg.encoder), manifest, EmbeddingStore(tmp_path / "cache"), flat_cfg.extract
    )
    assert embeddings.cache_hit  # the very vectors both runs searched
    setup = retrieval.choose_rows(manifest.table, embeddings.valid, "train", "test", None, 0)
    found = {}
    for name, cfg in (("ivf", ivf_cfg), ("flat", flat_cfg)):
        _, found[name] = retrieval.run_retrieval(
            manifest.table, embeddings.embeddings, setup, cfg.index, [10], return_search=True
        )
    inner = faiss.downcast_index(found["ivf"].index)
    assert inner.nlist < 1024 and 1 <= inner.nprobe <= inner.nlist  # reduced to the index's size
    agree = (found["ivf"].neighbours == found["flat"].neighbours).mean()
    assert agree >= 0.99, agree
