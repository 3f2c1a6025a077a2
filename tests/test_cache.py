"""The embedding cache: a hit means same inputs (files, generator parameters, weights revision),
every row is checked, failed rows are retried when fixed, and a full disk is a message."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cbir.data.images import ImageLoadError
from cbir.data.manifest import ManifestError
from cbir.data.synthetic import SyntheticDataset
from cbir.encoders.classical import ClassicalEncoder
from cbir.extract.shared import extract_shared
from cbir.extract.single import cache_key, extract_embeddings
from cbir.extract.store import EmbeddingStore

EXTRACT = OmegaConf.create(
    dict(
        batch_size=8, num_workers=0, accelerator="cpu", devices=1, strategy="auto", precision="32-true", progress=False
    )
)
TINY = dict(
    modalities=["CT", "MR"],
    anatomies=["head"],
    pathologies=["normal", "lesion"],
    max_per_class=3,
    min_per_class=3,
    image_size=32,
)


@pytest.fixture()
def tiny(tmp_path):
    """12 generated images, a classical encoder and a fresh store."""
    manifest = SyntheticDataset(root=tmp_path / "data", **TINY).load_manifest()
    return manifest, ClassicalEncoder(), EmbeddingStore(tmp_path / "cache")


# ---------------------------------------------------------------------------- what a hit means
def test_a_changed_image_is_extracted_again_not_served_from_the_cache(tiny):
    manifest, encoder, store = tiny
    first = extract_embeddings(encoder, manifest, store, EXTRACT)
    before = np.array(first.embeddings)
    assert extract_embeddings(encoder, manifest, store, EXTRACT).cache_hit
    paths = manifest.paths()
    shutil.copyfile(paths[7], paths[0])  # row 0 now holds row 7's pixels
    again = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert not again.cache_hit and again.rows_extracted == 1  # only the changed row
    after = np.asarray(again.embeddings)
    assert np.allclose(after[0], before[7], atol=1e-5) and not np.allclose(after[0], before[0], atol=1e-3)
    assert np.array_equal(after[1:], before[1:])
    assert extract_embeddings(encoder, manifest, store, EXTRACT).cache_hit


def test_generator_parameters_decide_the_folder_and_the_key(tmp_path):
    """`dataset.difficulty=0.9` after a default run must not be a cache hit, nor overwrite the
    images earlier runs point to."""
    normal = SyntheticDataset(root=tmp_path, **TINY).load_manifest()
    image = normal.paths()[4].read_bytes()
    hard = SyntheticDataset(root=tmp_path, **{**TINY, "difficulty": 0.9}).load_manifest()
    assert hard.root != normal.root and hard.digest() != normal.digest()
    assert cache_key(ClassicalEncoder(), hard) != cache_key(ClassicalEncoder(), normal)
    assert normal.paths()[4].read_bytes() == image  # the first set is untouched
    assert hard.paths()[4].read_bytes() != image
    # the presets get folders of their own under the same data dir, and difficulty moves it
    folders = {
        instantiate(compose(*o, f"paths.data_dir={tmp_path}").dataset).folder
        for o in (
            ["dataset=synthetic"],
            ["dataset=synthetic_small"],
            ["dataset=synthetic_small", "dataset.difficulty=0.9"],
        )
    }
    assert len(folders) == 3


# ---------------------------------------------------------------------------- reading an entry once
class CountingStore(EmbeddingStore):
    """A real store that counts how often each entry is read; `before_lock(key)` runs when an
    extraction asks for a key's lock, before it has it (what another job may do meanwhile)."""

    def __init__(self, cache_dir, before_lock=None) -> None:
        super().__init__(cache_dir)
        self.reads: Counter = Counter()
        self.before_lock = before_lock

    def load(self, key):
        self.reads[key] += 1
        return super().load(key)

    def lock(self, key):
        if self.before_lock is not None:
            self.before_lock(key)
        return super().lock(key)


def test_a_shared_pass_reads_each_entry_once(tiny):
    """Absent, out of date (a file changed) or fresh: one read of each entry per pass."""
    manifest, encoder, store = tiny
    store = CountingStore(store.cache_dir)
    encoders = [encoder, ClassicalEncoder(name="coarse", grids=(1, 2))]
    keys = [cache_key(e, manifest) for e in encoders]
    first = extract_shared(encoders, manifest, store, EXTRACT)
    assert first.extracted == keys and store.reads == dict.fromkeys(keys, 1)
    paths = manifest.paths()
    shutil.copyfile(paths[7], paths[0])
    store.reads.clear()
    stale = extract_shared(encoders, manifest, store, EXTRACT)
    assert [stale.extractions[k].rows_extracted for k in keys] == [1, 1]  # the older entry was the base
    assert store.reads == dict.fromkeys(keys, 1)
    store.reads.clear()
    hit = extract_shared(encoders, manifest, store, EXTRACT)
    assert hit.decodes == 0 and hit.extracted == [] and store.reads == dict.fromkeys(keys, 1)
    store.reads.clear()
    assert extract_embeddings(encoder, manifest, store, EXTRACT).cache_hit and store.reads == {keys[0]: 1}


@pytest.mark.parametrize("extraction", ["single", "shared"])
def test_an_entry_another_job_finished_while_we_waited_is_read_again_and_used(tiny, extraction):
    manifest, encoder, store = tiny
    key = cache_key(encoder, manifest)

    def other_job(locked_key):
        if locked_key == key and not store.folder(key).exists():
            extract_embeddings(ClassicalEncoder(), manifest, EmbeddingStore(store.cache_dir), EXTRACT)

    counting = CountingStore(store.cache_dir, before_lock=other_job)
    if extraction == "single":
        got = extract_embeddings(encoder, manifest, counting, EXTRACT)
    else:
        coarse = ClassicalEncoder(name="coarse", grids=(1, 2))
        shared = extract_shared([encoder, coarse], manifest, counting, EXTRACT)
        assert shared.extracted == [cache_key(coarse, manifest)]
        got = shared.extractions[key]
    assert got.cache_hit and got.rows_extracted == 0  # the other job's entry, not extracted a second time
    assert counting.reads[key] == 2  # absent before the lock, changed once we had it


# ---------------------------------------------------------------------------- failed rows
def test_failed_rows_are_retried_once_their_file_is_fixed(tiny):
    manifest, encoder, store = tiny
    paths = manifest.paths()
    originals = {i: paths[i].read_bytes() for i in (2, 5)}
    paths[2].write_bytes(originals[2][:40])  # truncated
    paths[5].unlink()  # missing
    broken = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert np.flatnonzero(~broken.valid).tolist() == [2, 5]
    for i, data in originals.items():
        paths[i].write_bytes(data)
    fixed = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert not fixed.cache_hit and fixed.rows_extracted == 2 and fixed.valid.all()
    assert fixed.cached.skipped() == []
    clean = extract_embeddings(encoder, manifest, EmbeddingStore(store.cache_dir / "clean"), EXTRACT)
    assert np.allclose(np.asarray(fixed.embeddings), np.asarray(clean.embeddings), atol=1e-5)


def test_retry_failed_retries_rows_whose_file_looks_unchanged(tiny):
    """A file restored with its old size and mtime (a backup restored with times kept)."""
    manifest, encoder, store = tiny
    path = manifest.paths()[3]
    original, stat = path.read_bytes(), path.stat()
    path.write_bytes(b"\0" * len(original))  # same size, not an image
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not extract_embeddings(encoder, manifest, store, EXTRACT).valid[3]
    path.write_bytes(original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    kept = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert kept.cache_hit and not kept.valid[3]  # nothing says the file changed
    retried = extract_embeddings(encoder, manifest, store, EXTRACT, retry_failed=True)
    assert retried.rows_extracted == 1 and retried.valid.all()


def test_on_error_raise_stops_on_failed_rows_from_an_earlier_run(tiny):
    manifest, encoder, store = tiny
    path = manifest.paths()[6]
    path.write_text("not an image")
    extract_embeddings(encoder, manifest, store, EXTRACT, on_error="skip")
    with pytest.raises(ImageLoadError, match=rf"{path.name}.*data\.on_error=raise.*data\.retry_failed=true"):
        extract_embeddings(encoder, manifest, store, EXTRACT, on_error="raise")


class UnstableEncoder(ClassicalEncoder):
    """Divides by the image's spread, as a careless normalisation would: a uniform image gives NaN."""

    def forward(self, images):
        spread = images.flatten(1).std(1, keepdim=True)
        return super().forward(images) * (spread / spread)


def test_nan_embeddings_are_failed_rows_counted_listed_and_left_out(tiny):
    from PIL import Image

    from cbir.evaluate.retrieval import choose_rows

    manifest, _, store = tiny
    path = manifest.paths()[4]
    Image.new("L", (32, 32), 128).save(path)  # uniform: the encoder returns NaN for it
    with pytest.raises(ImageLoadError, match=rf"{path.name}: the encoder's embedding holds NaN or inf.*on_error=raise"):
        extract_embeddings(
            UnstableEncoder(), manifest, EmbeddingStore(store.cache_dir / "raise"), EXTRACT, on_error="raise"
        )
    skipped = extract_embeddings(UnstableEncoder(), manifest, store, EXTRACT, on_error="skip")
    assert np.flatnonzero(~skipped.valid).tolist() == [4]
    assert np.isfinite(skipped.embeddings).all()
    assert [(row, reason) for row, _, reason in skipped.cached.skipped()] == [
        (4, f"{path}: the encoder's embedding holds NaN or inf values")
    ]
    setup = choose_rows(manifest.table, skipped.valid, "train", "test", None, 0)
    assert 4 not in set(setup.index_rows) | set(setup.query_rows)
    with pytest.raises(ImageLoadError, match=rf"{path.name}: the encoder's embedding holds NaN.*\(row 4, failed in an"):
        extract_embeddings(UnstableEncoder(), manifest, store, EXTRACT, on_error="raise")  # a cache hit


# ---------------------------------------------------------------------------- cached manifests
def edit_keeping_size_and_mtime(path: Path, old: str, new: str) -> None:
    """An edit no size/mtime check sees (a copy with times kept, a coarse-clock file system)."""
    text, stat = path.read_text(), path.stat()
    assert len(old) == len(new) and text.count(old) == 1
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_an_edited_csv_manifest_is_read_again_even_with_the_same_size_and_mtime(tmp_path):
    from cbir.data.csv_manifest import CSVManifestDataset

    csv = tmp_path / "manifest.csv"
    csv.write_text(
        "path,split,modality,anatomy,label\na.png,train,CT,head,CT/head/normal\nb.png,test,CT,head,CT/head/lesion\n"
    )
    data = CSVManifestDataset(file=csv, cache_dir=tmp_path / "cache", missing="keep")
    assert data.load_manifest().table["label"].tolist() == ["CT/head/normal", "CT/head/lesion"]
    edit_keeping_size_and_mtime(csv, "a.png,train,CT,head,CT/head/normal", "a.png,train,CT,head,CT/head/lesion")
    assert data.load_manifest().table["label"].tolist() == ["CT/head/lesion", "CT/head/lesion"]
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 2  # a new entry, the old one untouched


@pytest.mark.parametrize("side", ["split_file", "findings_file"])
def test_an_edited_side_file_of_a_folder_dataset_is_read_again(tmp_path, side):
    from cbir.data.folder import FolderDataset

    root = tmp_path / "images"
    for rel in ("CT/head/normal/a.png", "CT/head/lesion/b.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"png")
    split_file, findings_file = tmp_path / "splits.csv", tmp_path / "findings.csv"
    split_file.write_text("path,split\nCT/head/normal/a.png,train\nCT/head/lesion/b.png,val\n")
    findings_file.write_text("path,findings\nCT/head/normal/a.png,Edema\nCT/head/lesion/b.png,Mass\n")
    data = FolderDataset(
        root, cache_dir=tmp_path / "cache", split_file=str(split_file), labels="multi", findings_file=str(findings_file)
    )
    before = data.load_manifest().table
    if side == "split_file":
        edit_keeping_size_and_mtime(split_file, "b.png,val", "b.png,tes")  # same size: any edit must be seen
        with pytest.raises(ManifestError, match=r"unknown split value\(s\) \['tes'\]"):
            data.load_manifest()
        return
    edit_keeping_size_and_mtime(findings_file, "a.png,Edema", "a.png,Other")
    after = data.load_manifest().table
    a = "CT/head/normal/a.png"
    assert dict(zip(before["path"], before["findings"]))[a] == "Edema"
    assert dict(zip(after["path"], after["findings"]))[a] == "Other"


# ---------------------------------------------------------------------------- integrity
def test_the_integrity_check_covers_every_row(tmp_path):
    """6,000 rows: more than the 4,096 rows a sampled check would read."""
    store, n, dim = EmbeddingStore(tmp_path), 6000, 8
    values = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    partial = store.open_partial("k", n, dim)
    partial.write(np.arange(n), values, np.ones(n, bool))
    entry = store.commit("k", partial, {})
    path = entry.path / "embeddings.npy"
    del entry, partial
    # change 300 rows that evenly spaced sampling of 4,096 rows skips; same file size
    sampled = np.unique(np.linspace(0, n - 1, num=4096).astype(np.int64))
    altered = np.setdiff1d(np.arange(n), sampled)[:300]
    array = np.load(path, mmap_mode="r+")
    array[altered] += 1.0
    array.flush()
    del array
    assert store.load("k") is None  # damaged: recomputed by the caller, never used
    # the commit writes the checksum of what it stored: an intact entry loads
    partial = store.open_partial("k2", n, dim)
    partial.write(np.arange(n), values, np.ones(n, bool))
    store.commit("k2", partial, {})
    assert np.array_equal(store.load("k2").embeddings, values)


# ---------------------------------------------------------------------------- disk space
def test_a_full_disk_is_a_message_before_any_row_is_written(tiny, monkeypatch):
    from cbir.job.inputs import user_errors

    manifest, encoder, store = tiny
    usage = shutil.disk_usage(store.cache_dir.parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(Exception, match=rf"not enough space in {store.cache_dir}: need .*KB, have 100 B") as caught:
        extract_embeddings(encoder, manifest, store, EXTRACT)
    assert isinstance(caught.value, user_errors())  # one line and exit code 2, no traceback
    assert not list(store.root.glob("*.partial"))


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_new_entry_has_its_disk_blocks_reserved(tmp_path):
    """Not a sparse file: rows written later cannot hit a full disk (SIGBUS in a memory map)."""
    partial = EmbeddingStore(tmp_path).open_partial("k", 20_000, 64)
    stat = (partial.path / "embeddings.npy").stat()
    assert stat.st_size >= 20_000 * 64 * 4 and stat.st_blocks * 512 >= stat.st_size


@pytest.fixture()
def small_disk(tmp_path):
    """A real 512 KB file system (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(done.stderr or done.stdout).strip()[:120]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the file system: the next write fails with ENOSPC."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_disk_filling_up_before_the_commit_loses_no_computed_row(small_disk):
    from cbir.extract.store import CacheSpaceError
    from cbir.job.inputs import user_errors

    store, n, dim = EmbeddingStore(small_disk / "cache"), 300, 256  # 300 KB of embeddings
    values = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    partial = store.open_partial("k", n, dim)
    partial.write(np.arange(n), values, np.ones(n, bool))
    partial.record_skips([])
    filler = fill(small_disk)  # another program takes the rest of the disk
    with pytest.raises(
        CacheSpaceError,
        match=rf"disk full in {store.cache_dir} .*300 rows are kept: free some "
        "space there and run again",
    ) as caught:
        store.commit("k", partial, {})
    assert isinstance(caught.value, user_errors())  # one line and exit code 2, no traceback
    assert store.load("k") is None and (store.root / "k.partial" / "done.npy").exists()
    del partial
    filler.unlink()  # space freed: the next run resumes with nothing left to compute
    resumed = store.open_partial("k", n, dim)
    assert len(resumed.remaining()) == 0
    assert np.array_equal(store.commit("k", resumed, {}).embeddings, values)


def test_the_space_check_counts_what_the_commit_writes(small_disk):
    """An entry whose arrays fit but whose commit files would not is refused before any row."""
    from cbir.extract.store import CacheSpaceError, entry_bytes

    store = EmbeddingStore(small_disk / "cache")
    free = shutil.disk_usage(small_disk).free
    # the most rows whose bytes fit (embeddings, done and files arrays, a page), leaving no room to commit
    n = max(n for n in range(100, 2000) if n * 256 * 4 + n + n * 16 + 4096 <= free)
    assert entry_bytes(small_disk, n, 256) > free
    with pytest.raises(CacheSpaceError, match=rf"not enough space in {store.cache_dir}: need .*KB, have .*KB"):
        store.open_partial("k", n, 256)
    assert not list(store.root.glob("*.partial"))
    fits = n - 80  # 80 KB less: what fits is committed
    partial = store.open_partial("k", fits, 256)
    partial.write(np.arange(fits), np.ones((fits, 256), np.float32), np.ones(fits, bool))
    assert store.commit("k", partial, {"note": "x" * 2000}).valid.all()


# ---------------------------------------------------------------------------- hub revisions
def _fake_hub(cache: Path, repo: str, commits: list[str], save) -> Path:
    """A local hub cache as huggingface_hub lays it out: refs/main -> snapshots/<commit>/."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    for i, commit in enumerate(commits):
        save(folder / "snapshots" / commit, seed=i)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    return folder


def _point(folder: Path, ref: str, commit: str) -> None:
    (folder / "refs" / ref).write_text(commit)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time
    return cache


A, B = "a" * 40, "b" * 40


def test_transformers_weights_are_keyed_by_their_hub_commit(hub_cache):
    import torch
    from transformers import ViTConfig, ViTModel

    from cbir.encoders.transformers_encoder import TransformersEncoder

    def save(snapshot, seed):
        torch.manual_seed(seed)
        ViTModel(
            ViTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=32,
                patch_size=16,
            )
        ).save_pretrained(snapshot)

    repo = _fake_hub(hub_cache, "test-org/tiny-vit", [A, B], save)

    def encoder(**kw):
        return TransformersEncoder(
            name="tiny", model_class="ViTModel", hub_id="test-org/tiny-vit", preprocess={"crop": 32, "resize": 32}, **kw
        )

    _point(repo, "main", A)
    at_a = encoder()
    _point(repo, "main", B)  # a new upload
    at_b = encoder()
    assert at_a.identity()["commit"] == A and at_b.identity()["commit"] == B
    assert at_a.cache_key() != at_b.cache_key()
    assert at_b.info()["weights_commit"] == B
    assert encoder(revision=A).cache_key() == at_a.cache_key()  # a pin still works
    _point(repo, "v1", A)
    assert encoder(revision="v1").identity()["commit"] == A


def test_timm_and_open_clip_weights_are_keyed_by_their_hub_commit(hub_cache):
    import timm
    import torch
    from safetensors.torch import save_file

    from cbir.encoders.timm_encoder import TimmEncoder

    def save(snapshot, seed):
        torch.manual_seed(seed)
        snapshot.mkdir(parents=True)
        model = timm.create_model("test_vit.r160_in1k", pretrained=False)
        save_file(model.state_dict(), str(snapshot / "model.safetensors"))

    repo = _fake_hub(hub_cache, "timm/test_vit.r160_in1k", [A, B], save)
    _point(repo, "main", A)
    at_a = TimmEncoder("test_vit.r160_in1k", input_size=160)
    _point(repo, "main", B)
    at_b = TimmEncoder("test_vit.r160_in1k", input_size=160)
    assert (at_a.identity()["commit"], at_b.identity()["commit"]) == (A, B)
    assert at_a.cache_key() != at_b.cache_key()
    assert not torch.equal(next(at_a.model.parameters()), next(at_b.model.parameters()))
    assert TimmEncoder("test_vit.r160_in1k", input_size=160, revision=A).cache_key() == at_a.cache_key()
    # open_clip loads one file through hf_hub_download: its snapshot folder names the commit
    from cbir.encoders.hub import commit_of_file

    assert commit_of_file(repo / "snapshots" / B / "model.safetensors") == B
    assert commit_of_file(hub_cache / "elsewhere" / "model.safetensors") is None


def test_an_image_edited_to_the_same_size_is_extracted_again(tiny):
    """Only the modification time tells this edit apart: the cache must compare it, not only the size."""
    from PIL import Image

    manifest, encoder, store = tiny
    path = manifest.paths()[0]
    pixels = np.asarray(Image.open(path))
    # uncompressed PNGs of the same shape have the same byte count whatever the pixels
    Image.fromarray(pixels).save(path, compress_level=0)
    before = np.array(extract_embeddings(encoder, manifest, store, EXTRACT).embeddings)
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.fromarray(255 - pixels).save(path, compress_level=0)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a clock that ticked between the two writes
    assert path.stat().st_size == size
    again = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert not again.cache_hit and again.rows_extracted == 1
    fresh = ClassicalEncoder()
    expected = extract_embeddings(fresh, manifest, EmbeddingStore(store.cache_dir.parent / "fresh_cache"), EXTRACT)
    assert np.allclose(again.embeddings[0], expected.embeddings[0], atol=1e-6)
    assert not np.allclose(again.embeddings[0], before[0], atol=1e-3)
    assert np.array_equal(np.asarray(again.embeddings)[1:], before[1:])
