"""The retrieval path (rows -> FAISS -> metrics) when query and index splits overlap: a query
must neither retrieve itself nor count itself among its class's index rows (n_c)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cbir.evaluate.retrieval import choose_rows, own_positions, run_retrieval

FLAT = OmegaConf.create({"type": "flat", "use_gpu": False, "params": {}})


def on_circle(degrees) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


@pytest.fixture()
def five_rows():
    """Five train rows on the unit circle; every similarity is distinct, so the ranking is by angle."""
    table = pd.DataFrame(
        {
            "label": ["CT/a", "CT/a", "CT/b", "CT/b", "CT/b"],
            "modality": "CT",
            "anatomy": ["a", "a", "b", "b", "b"],
            "split": "train",
        }
    )
    return table, on_circle([0, 10, 25, 90, 100])


def test_overlapping_splits_exclude_each_query_from_its_own_results(five_rows):
    """Hand-computed, each query's neighbours among the OTHER rows, nearest first:
        row 0 (a,   0 deg): 1(a) 2(b) ...   n_c(a)=1 -> P@1 = 1, P@3 = 1/1
        row 1 (a,  10 deg): 0(a) 2(b) ...   n_c(a)=1 -> P@1 = 1, P@3 = 1/1
        row 2 (b,  25 deg): 1(a) 0(a) ...   n_c(b)=2 -> P@1 = 0, P@3 = 0/2
        row 3 (b,  90 deg): 4(b) 2(b) ...   n_c(b)=2 -> P@1 = 1, P@3 = 2/2
        row 4 (b, 100 deg): 3(b) 2(b) ...   n_c(b)=2 -> P@1 = 1, P@3 = 2/2
    micro = 4/5 at both N; macro = (1 + 2/3) / 2. Were a query its own neighbour, P@1 would be 1
    for everyone, and with n_c counting the query, row 2's P@3 would be 1/3."""
    table, embeddings = five_rows
    setup = choose_rows(table, np.ones(5, bool), "train", "train", None, 0)
    assert list(setup.query_rows) == list(setup.index_rows) == [0, 1, 2, 3, 4]
    result, search = run_retrieval(table, embeddings, setup, FLAT, [1, 3], levels=(), return_search=True)
    assert search.neighbours[:, :2].tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 2]]
    assert result.metrics["micro/P_at_1"] == pytest.approx(0.8)
    assert result.metrics["micro/P_at_3"] == pytest.approx(0.8)
    assert result.metrics["macro/P_at_1"] == pytest.approx((1 + 2 / 3) / 2)
    assert result.metrics["macro/P_at_3"] == pytest.approx((1 + 2 / 3) / 2)


def test_a_query_outside_the_index_is_not_excluded_from_anything():
    """own_positions: the index position of a query that is also an index row, else -1."""
    index_rows = np.array([7, 3, 9, 4])
    own = own_positions(index_rows, np.array([4, 5, 7, 9, 0]))
    assert own.tolist() == [3, -1, 0, 2, -1] and own.dtype == np.int64  # positions, not floats


@pytest.fixture()
def eight_rows(five_rows):
    """The five train rows, one train row whose image failed (row 5), two test rows."""
    table, embeddings = five_rows
    extra = pd.DataFrame(
        {
            "label": ["CT/a", "CT/a", "CT/b"],
            "modality": "CT",
            "anatomy": ["a", "a", "b"],
            "split": ["train", "test", "test"],
        }
    )
    valid = np.array([True] * 5 + [False, True, True])
    return pd.concat([table, extra], ignore_index=True), np.vstack([embeddings, on_circle([5, 2, 93])]), valid


def test_rows_are_chosen_from_usable_rows_of_each_split(eight_rows):
    table, _, valid = eight_rows
    setup = choose_rows(table, valid, "train", "test", None, 0)
    assert setup.index_rows.tolist() == [0, 1, 2, 3, 4] and setup.query_rows.tolist() == [6, 7]
    sampled = choose_rows(table, valid, "train", "train", 1, 3)  # one row per class, seeded
    assert sorted(table["label"][sampled.index_rows]) == ["CT/a", "CT/b"]
    repeats = {tuple(choose_rows(table, valid, "train", "train", 1, 3).index_rows) for _ in range(6)}
    assert repeats == {tuple(sampled.index_rows)}  # the same seed, the same rows, every time
    seeds = {tuple(choose_rows(table, valid, "train", "train", 1, seed).index_rows) for seed in range(12)}
    assert len(seeds) > 1  # the seed decides which rows
    with pytest.raises(ValueError, match="index.split=val: no usable rows"):
        choose_rows(table, valid, "val", "test", None, 0)
    with pytest.raises(ValueError, match="eval.query_split=val: no usable rows"):
        choose_rows(table, valid, "train", "val", None, 0)
    one_query = valid.copy()
    one_query[7] = False  # a single usable row is enough, for queries as for the index
    assert choose_rows(table, one_query, "test", "test", None, 0).query_rows.tolist() == [6]


def test_run_retrieval_passes_its_options_through(eight_rows):
    table, embeddings, valid = eight_rows
    setup = choose_rows(table, valid, "train", "test", None, 0)
    plain = run_retrieval(table, embeddings, setup, FLAT, [1, 2])
    assert sorted(k for k in plain.metrics if k.startswith("micro/")) == ["micro/P_at_1", "micro/P_at_2"]
    assert plain.curve.empty and "level/anatomy/micro/P_at_1" in plain.metrics  # default levels
    result, search = run_retrieval(
        table, embeddings, setup, FLAT, [1], curve_k=3, levels=("modality",), batch_size=1, return_search=True
    )
    # queries at 2 deg (a) and 93 deg (b): nearest train rows 0, 1, 2 and 3, 4, 2
    assert search.setup is setup and search.neighbours.tolist() == [[0, 1, 2], [3, 4, 2]]
    expected = np.take_along_axis(embeddings[setup.query_rows] @ embeddings[setup.index_rows].T, search.neighbours, 1)
    np.testing.assert_allclose(search.scores, expected, rtol=1e-6)
    assert search.index.ntotal == 5
    assert result.curve["micro"].tolist() == pytest.approx([1.0, 1.0, 1.0])  # n_c(a) = 2, n_c(b) = 3
    assert "level/modality/micro/P_at_1" in result.metrics and "level/anatomy/micro/P_at_1" not in result.metrics


def test_index_params_reach_the_index(eight_rows):
    import faiss

    table, embeddings, valid = eight_rows
    setup = choose_rows(table, valid, "train", "train", None, 0)
    ivf = OmegaConf.create({"type": "ivf", "use_gpu": False, "params": {"nlist": 2, "nprobe": 1}})
    _, search = run_retrieval(table, embeddings, setup, ivf, [1], return_search=True)
    inner = faiss.downcast_index(search.index)
    assert (inner.nlist, inner.nprobe) == (2, 1)  # as given (the preset would have 1024 lists and 32 probes)
