"""The embedding store's freshness and integrity checks, on entries written directly (no
extraction): what counts as a cache hit, which rows are out of date, and which damage makes an
entry count as absent. The extraction paths around them are in test_cache.py."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter

import numpy as np
import pytest

from cbir.extract import store as store_module
from cbir.extract.store import EmbeddingStore

N, DIM = 5, 3
FILES = np.array([[100 + r, 1_000_000 + r] for r in range(N)], dtype=np.int64)  # size, mtime_ns per row


class CountingStore(EmbeddingStore):
    """A real store that counts how often each entry is read."""

    def __init__(self, cache_dir) -> None:
        super().__init__(cache_dir)
        self.reads: Counter = Counter()

    def load(self, key):
        self.reads[key] += 1
        return super().load(key)


def write_entry(store: EmbeddingStore, key: str, failed=(), files=FILES):
    values = np.arange(N * DIM, dtype=np.float32).reshape(N, DIM)
    ok = np.ones(N, bool)
    ok[list(failed)] = False
    partial = store.open_partial(key, N, DIM, files)
    partial.write(np.arange(N), values, ok)
    return store.commit(key, partial, {}), values


def test_an_entry_with_unchanged_files_is_a_hit_and_reads_back_what_was_written(tmp_path):
    store = EmbeddingStore(tmp_path)
    _, values = write_entry(store, "k")
    found = store.load_fresh("k", FILES.copy())
    assert found.fresh and found.key == "k" and len(found.stale) == 0
    assert found.entry.key == "k" and found.entry.path == store.folder("k")
    assert (found.entry.meta["n"], found.entry.meta["dim"]) == (N, DIM)
    assert np.array_equal(found.entry.embeddings, values)
    assert isinstance(found.entry.embeddings, np.memmap) and not found.entry.embeddings.flags.writeable
    assert found.entry.valid.all() and np.array_equal(found.entry.files, FILES)


def test_no_entry_is_no_hit(tmp_path):
    found = EmbeddingStore(tmp_path).load_fresh("absent", FILES)
    assert found.entry is None and not found.fresh and found.state is None
    assert found.stale.dtype == np.int64 and len(found.stale) == 0


@pytest.mark.parametrize("column", [0, 1], ids=["size", "mtime"])
def test_a_row_whose_file_changed_size_or_mtime_is_stale_alone(tmp_path, column):
    store = EmbeddingStore(tmp_path)
    write_entry(store, "k")
    now = FILES.copy()
    now[3, column] += 1
    found = store.load_fresh("k", now)
    assert not found.fresh and found.entry is not None and list(found.stale) == [3]


def test_failed_rows_are_stale_only_when_retrying(tmp_path):
    store = EmbeddingStore(tmp_path)
    write_entry(store, "k", failed=[1, 4])
    assert store.load_fresh("k", FILES).fresh
    assert len(store.load("k").stale_rows(FILES)) == 0  # failed rows stay failed by default
    assert list(store.load_fresh("k", FILES, retry_failed=True).stale) == [1, 4]
    now = FILES.copy()
    now[2, 1] += 5
    assert list(store.load_fresh("k", now, retry_failed=True).stale) == [1, 2, 4]


def test_a_known_lookup_is_reused_only_while_the_entry_files_are_the_same(tmp_path):
    store = CountingStore(tmp_path)
    before = store.load_fresh("k", FILES)
    assert before.entry is None and store.reads["k"] == 1
    write_entry(store, "k")  # another job commits meanwhile: the folder changed
    after = store.load_fresh("k", FILES, known=before)
    assert after.fresh and store.reads["k"] == 2
    again = store.load_fresh("k", FILES, known=after)
    assert again.fresh and again.entry is after.entry and store.reads["k"] == 2  # not read a second time
    now = FILES.copy()
    now[0, 0] += 1
    assert list(store.load_fresh("k", now, known=after).stale) == [0]  # staleness is for the files given now
    write_entry(store, "other")
    other = store.load_fresh("other", FILES, known=after)  # another key's lookup is never reused
    assert other.entry.path.name == "other" and store.reads["other"] == 1


def test_entry_state_names_each_file_and_changes_with_a_commit(tmp_path):
    store = EmbeddingStore(tmp_path)
    assert store_module._entry_state(store.folder("k")) is None
    write_entry(store, "k")
    state = store_module._entry_state(store.folder("k"))
    assert len(state) == len(store_module.ENTRY_FILES) and all(s is not None for s in state)
    write_entry(store, "k")
    assert store_module._entry_state(store.folder("k")) != state
    (store.folder("k") / "valid.npy").unlink()
    assert store_module._entry_state(store.folder("k"))[1] is None


def test_checksum_is_the_crc32_of_every_byte_in_order(monkeypatch):
    a = np.arange(1000, dtype=np.float32).reshape(100, 10)
    b = np.array([True, False, True])
    c = np.arange(7, dtype=np.int64)
    expected = f"crc32:{zlib.crc32(a.tobytes() + b.tobytes() + c.tobytes()):08x}"
    assert store_module.checksum(a, b, c) == expected
    assert store_module.checksum(a[:, ::2]) == f"crc32:{zlib.crc32(np.ascontiguousarray(a[:, ::2]).tobytes()):08x}"
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 12)  # several pieces per array, one partial at the end
    assert store_module.checksum(a, b, c) == expected
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 1)  # pieces smaller than one item
    assert store_module.checksum(a, b, c) == expected


def rewrite_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def resave(path, array):
    np.save(path, array)
    os.utime(path, ns=(1, 1))  # a new identity even within one clock tick


OLD = "incomplete entry or one written by an older cbir"
ARRAYS = "valid.npy or files.npy do not match the embeddings"
CHECKSUM = "checksum differs from the one written at commit"
REASONS = {
    "old version": OLD,
    "not complete": OLD,
    "more rows": f"embeddings shape {(N, DIM)} != {(N + 1, DIM)}",
    "other dim": f"embeddings shape {(N, DIM)} != {(N, DIM + 1)}",
    "float64 embeddings": f"embeddings shape {(N, DIM)} != {(N, DIM)}",
    "valid of other length": ARRAYS,
    "valid as integers": ARRAYS,
    "files of other shape": ARRAYS,
    "files as int32": ARRAYS,
    "embeddings transposed, same bytes": f"embeddings shape {(DIM, N)} != {(N, DIM)}",
    "embeddings as int32, same bytes": f"embeddings shape {(N, DIM)} != {(N, DIM)}",
    "valid as a column, same bytes": ARRAYS,
    "valid as uint8, same bytes": ARRAYS,
    "files flattened, same bytes": ARRAYS,
    "files as float64, same bytes": ARRAYS,
    "other byte count": "file size differs from the recorded size",
    "an embedding changed": CHECKSUM,
    "a valid flag changed": CHECKSUM,
    "a file stamp changed": CHECKSUM,
    "other checksum": CHECKSUM,
}


@pytest.mark.parametrize(
    "damage",
    [
        "old version",
        "not complete",
        "more rows",
        "other dim",
        "float64 embeddings",
        "valid of other length",
        "valid as integers",
        "files of other shape",
        "files as int32",
        "embeddings transposed, same bytes",
        "embeddings as int32, same bytes",
        "valid as a column, same bytes",
        "valid as uint8, same bytes",
        "files flattened, same bytes",
        "files as float64, same bytes",
        "other byte count",
        "an embedding changed",
        "a valid flag changed",
        "a file stamp changed",
        "other checksum",
    ],
)
def test_damage_makes_the_entry_absent(tmp_path, damage, caplog):
    store = EmbeddingStore(tmp_path)
    entry, values = write_entry(store, "k", failed=[2])
    folder = entry.path
    del entry
    if damage == "old version":
        rewrite_meta(folder, version=store_module.META_VERSION - 1)
    elif damage == "not complete":
        rewrite_meta(folder, complete=False)
    elif damage == "more rows":
        rewrite_meta(folder, n=N + 1)
    elif damage == "other dim":
        rewrite_meta(folder, dim=DIM + 1)
    elif damage == "float64 embeddings":
        resave(folder / "embeddings.npy", values.astype(np.float64))
    elif damage == "valid of other length":
        resave(folder / "valid.npy", np.ones(N + 1, bool))
    elif damage == "valid as integers":
        resave(folder / "valid.npy", np.ones(N, np.uint8))
    elif damage == "files of other shape":
        resave(folder / "files.npy", np.zeros((N, 3), np.int64))
    elif damage == "files as int32":
        resave(folder / "files.npy", FILES.astype(np.int32))
    elif damage == "embeddings transposed, same bytes":  # each of these only its own check can tell
        resave(folder / "embeddings.npy", values.reshape(DIM, N))
    elif damage == "embeddings as int32, same bytes":
        resave(folder / "embeddings.npy", values.view(np.int32))
    elif damage == "valid as a column, same bytes":
        resave(folder / "valid.npy", np.load(folder / "valid.npy").reshape(N, 1))
    elif damage == "valid as uint8, same bytes":
        resave(folder / "valid.npy", np.load(folder / "valid.npy").view(np.uint8))
    elif damage == "files flattened, same bytes":
        resave(folder / "files.npy", FILES.reshape(-1))
    elif damage == "files as float64, same bytes":
        resave(folder / "files.npy", FILES.view(np.float64))
    elif damage == "other byte count":
        rewrite_meta(folder, bytes=(folder / "embeddings.npy").stat().st_size + 1)
    elif damage == "an embedding changed":
        changed = values.copy()
        changed[4, 2] += 1
        resave(folder / "embeddings.npy", changed)
    elif damage == "a valid flag changed":
        resave(folder / "valid.npy", np.ones(N, bool))
    elif damage == "a file stamp changed":
        changed = FILES.copy()
        changed[0, 1] += 1
        resave(folder / "files.npy", changed)
    elif damage == "other checksum":
        rewrite_meta(folder, checksum="crc32:00000000")
    with caplog.at_level(logging.WARNING, logger="cbir.extract.store"):
        assert store.load("k") is None
    (record,) = caplog.records
    assert record.getMessage() == f"embedding cache {folder} is damaged ({REASONS[damage]}); recomputing it"
    assert store.load_fresh("k", FILES).entry is None
    write_entry(store, "k")  # recomputed: the new entry replaces the damaged one
    assert store.load_fresh("k", FILES).fresh


def test_an_entry_is_checksummed_once_per_process_then_trusted_until_its_files_change(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path)
    write_entry(store, "k")
    sums = Counter()
    real = store_module.checksum

    def counted(*arrays):
        sums["calls"] += 1
        return real(*arrays)

    monkeypatch.setattr(store_module, "checksum", counted)
    monkeypatch.setattr(EmbeddingStore, "_verified", {})  # as a new process
    assert store.load("k") is not None and store.load("k") is not None
    assert sums["calls"] == 1
    os.utime(store.folder("k") / "files.npy", ns=(5, 5))
    assert store.load("k") is not None and sums["calls"] == 2


def test_damage_is_logged_once_per_reason_and_again_for_a_new_entry(tmp_path, caplog):
    store = EmbeddingStore(tmp_path)
    write_entry(store, "k")
    folder = store.folder("k")
    rewrite_meta(folder, complete=False)
    with caplog.at_level(logging.WARNING, logger="cbir.extract.store"):
        assert store.load("k") is None and store.load("k") is None
        rewrite_meta(folder, complete=True, checksum="crc32:00000000")
        assert store.load("k") is None and store.load("k") is None
        write_entry(store, "k")
        rewrite_meta(folder, checksum="crc32:00000000")
        assert store.load("k") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert all(
        m.startswith(f"embedding cache {folder} is damaged (") and m.endswith("); recomputing it") for m in messages
    )
    assert [m[m.index("(") + 1 : m.rindex(")")] for m in messages] == [OLD, CHECKSUM, CHECKSUM]


class MakesFolder:
    """Unpickling this makes a folder: proof that a file was run as code."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("name", ["embeddings.npy", "valid.npy", "files.npy"])
def test_entry_arrays_are_read_as_data_never_unpickled(tmp_path, name):
    store = EmbeddingStore(tmp_path / "cache")
    entry, _ = write_entry(store, "k")
    marker = tmp_path / "ran"
    hostile = np.empty(N, dtype=object)
    hostile[:] = [MakesFolder(marker)] * N
    np.save(entry.path / name, hostile, allow_pickle=True)
    del entry
    assert store.load("k") is None and not marker.exists()


def test_a_committed_entry_holds_its_files_only_and_replaces_the_old_one(tmp_path):
    store = EmbeddingStore(tmp_path)
    entry, _ = write_entry(store, "k")
    assert entry.path == tmp_path / "embeddings" / "k" and entry.key == "k"
    expected = ["embeddings.npy", "files.npy", "meta.json", "skipped.csv", "valid.npy"]
    assert sorted(os.listdir(entry.path)) == expected  # done.npy is gone: the entry is complete
    write_entry(store, "k")
    assert sorted(p.name for p in store.root.iterdir() if p.is_dir()) == ["k"]  # no old copy left behind


def test_refreshing_from_an_older_entry_redoes_changed_and_failed_rows_and_keeps_the_reasons(tmp_path):
    store = EmbeddingStore(tmp_path)
    values = np.arange(N * DIM, dtype=np.float32).reshape(N, DIM)
    partial = store.open_partial("k", N, DIM, FILES)
    partial.write(np.arange(N), values, np.array([True, False, True, True, False]))
    partial.record_skips([(1, "one.png", "cannot decode"), (4, "four.png", "truncated")])
    base = store.commit("k", partial, {})
    now = FILES.copy()
    now[2, 1] += 1
    assert list(store.open_partial("k", N, DIM, now, base=base).remaining()) == [2]
    store.root.joinpath("k.partial").rename(store.root / "k.partial-discarded")
    refresh = store.open_partial("k", N, DIM, now, base=base, retry_failed=True)
    assert list(refresh.remaining()) == [1, 2, 4]
    refresh.write(np.array([1, 2]), values[[1, 2]], np.array([True, True]))
    refresh.write(np.array([4]), values[[4]], np.array([False]))
    entry = store.commit("k", refresh, {})
    assert entry.skipped() == [(4, "four.png", "truncated")]  # row 1 fixed, row 4's reason kept from before


def test_a_resumed_partial_entry_retries_its_failed_rows_only_when_asked(tmp_path):
    store = EmbeddingStore(tmp_path)
    partial = store.open_partial("k", N, DIM, FILES)
    partial.write(np.array([0, 3]), np.ones((2, DIM), np.float32), np.array([True, False]))
    del partial  # interrupted
    resumed = store.open_partial("k", N, DIM, FILES)
    assert list(resumed.remaining()) == [1, 2, 4]
    del resumed
    assert list(store.open_partial("k", N, DIM, FILES, retry_failed=True).remaining()) == [1, 2, 3, 4]


def test_a_broken_partial_entry_is_started_again_and_never_unpickled(tmp_path):
    store = EmbeddingStore(tmp_path / "cache")
    partial = store.open_partial("k", N, DIM, FILES)
    partial.write(np.arange(N), np.ones((N, DIM), np.float32), np.ones(N, bool))
    marker = tmp_path / "ran"
    hostile = np.empty(N, dtype=object)
    hostile[:] = [MakesFolder(marker)] * N
    np.save(partial.path / "files.npy", hostile, allow_pickle=True)
    del partial
    again = store.open_partial("k", N, DIM, FILES)
    assert list(again.remaining()) == list(range(N)) and not marker.exists()
    del again
    (store.root / "k.partial" / "done.npy").unlink()  # half a partial entry: started again too
    assert list(store.open_partial("k", N, DIM, FILES).remaining()) == list(range(N))
