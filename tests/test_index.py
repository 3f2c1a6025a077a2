"""Index subset sampling and FAISS search."""

import numpy as np
import pandas as pd
import pytest

from cbir.evaluate.index import build_index, l2_normalise, sample_per_class, search


def test_subsets_are_nested_capped_and_seeded():
    labels = np.repeat(["a", "b", "c"], [50, 7, 300])
    small = sample_per_class(labels, 5, seed=3)
    large = sample_per_class(labels, 40, seed=3)
    assert set(small) <= set(large)
    counts = pd.Series(labels[large]).value_counts()
    assert counts["a"] == 40 and counts["b"] == 7 and counts["c"] == 40  # b has only 7 rows
    assert np.array_equal(sample_per_class(labels, 5, seed=3), small)
    assert not np.array_equal(sample_per_class(labels, 5, seed=4), small)
    assert len(sample_per_class(labels, None)) == len(labels)
    with pytest.raises(ValueError, match="index.per_class"):
        sample_per_class(labels, 0)


def test_search_matches_exhaustive_cosine_ranking():
    rng = np.random.default_rng(0)
    base = l2_normalise(rng.normal(size=(200, 16)))
    queries = l2_normalise(rng.normal(size=(30, 16)))
    index = build_index(base, "flat", use_gpu=False)
    scores, ids = search(index, queries, k=5, batch_size=7)
    expected = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, np.take_along_axis(queries @ base.T, expected, 1), atol=1e-5)


def test_ties_are_broken_by_index_position_and_self_matches_excluded():
    base = l2_normalise(np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.9, 0.1]], dtype=np.float32))
    index = build_index(base, "flat", use_gpu=False)
    _, ids = search(index, base[[0]], k=3)
    assert ids.tolist() == [[0, 2, 3]]
    # query 0 is index row 0: it must not retrieve itself
    _, ids = search(index, base[[0]], k=3, exclude=np.array([0]))
    assert ids.tolist() == [[2, 3, 4]]


def test_other_index_types_through_index_factory():
    rng = np.random.default_rng(1)
    base = l2_normalise(rng.normal(size=(500, 8)))
    index = build_index(base, "HNSW16", use_gpu=False)
    assert index.ntotal == 500
    _, ids = search(index, base[:10], k=1)
    assert (ids[:, 0] == np.arange(10)).mean() >= 0.9


def test_more_neighbours_than_rows_are_padded():
    base = l2_normalise(np.eye(3, dtype=np.float32))
    _, ids = search(build_index(base, "flat", use_gpu=False), base, k=5)
    assert (ids[:, 3:] == -1).all() and (ids[:, :3] >= 0).all()
