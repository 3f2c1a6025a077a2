"""The retrieval path (rows -> FAISS -> metrics) when query and index splits overlap: a query
must neither retrieve itself nor count itself among its class's index rows (n_c)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cbir.retrieval import choose_rows, own_positions, run_retrieval

FLAT = OmegaConf.create({"type": "flat", "use_gpu": False, "params": {}})


def on_circle(degrees) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


@pytest.fixture()
def five_rows():
    """Five train rows on the unit circle; every similarity is distinct, so the ranking is by angle."""
    table = pd.DataFrame({"label": ["CT/a", "CT/a", "CT/b", "CT/b", "CT/b"], "modality": "CT",
                          "anatomy": ["a", "a", "b", "b", "b"], "split": "train"})
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
    assert own_positions(index_rows, np.array([4, 5, 7, 9, 0])).tolist() == [3, -1, 0, 2, -1]
