"""Embedding-space scores used by experiments/embedding_space.py, on hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.evaluate.index import l2_normalise
from cbir.report import figures


def test_knn_purity_counts_neighbours_other_than_the_sample_itself():
    # on a circle: a at 0 deg, b at 10, c at 20 (class x), d at 100 (class y).
    angles = np.radians([0, 10, 20, 100])
    points = np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = np.array(["x", "x", "x", "y"])
    # k=1: a->b, b->a (tie with c broken by row order), c->b, d->c  => 3 of 4 agree
    assert figures.knn_purity(points, labels, k=1) == pytest.approx(0.75)
    # k=2: a:{b,c}=1, b:{a,c}=1, c:{b,a}=1, d:{c,b}=0  => 6/8
    assert figures.knn_purity(points, labels, k=2) == pytest.approx(0.75)
    assert np.isnan(figures.knn_purity(points[:1], labels[:1], k=3))


def test_silhouette_matches_its_definition_with_cosine_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    labels = np.array([0] * 5 + [1] * 4 + [2] * 3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - unit @ unit.T
    scores = []
    for i in range(len(x)):
        same = (labels == labels[i]) & (np.arange(len(x)) != i)
        a = d[i, same].mean()
        b = min(d[i, labels == c].mean() for c in set(labels) - {labels[i]})
        scores.append((b - a) / max(a, b))
    assert figures.silhouette(x, labels) == pytest.approx(np.mean(scores), abs=1e-9)
    assert np.isnan(figures.silhouette(x, np.zeros(12)))


def test_pca_2d_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(1)
    x = np.zeros((200, 3))
    x[:, 2] = rng.normal(scale=10, size=200)
    x[:, 0] = rng.normal(scale=0.1, size=200)
    projected = figures.pca_2d(x)
    assert projected.shape == (200, 2)
    assert abs(np.corrcoef(projected[:, 0], x[:, 2])[0, 1]) > 0.999


def test_l2_normalise_returns_unit_rows_and_keeps_zero_rows():
    x = np.array([[3, 4], [0, 0]], dtype=np.float64)
    out = l2_normalise(x)
    assert out.dtype == np.float32 and np.allclose(out, [[0.6, 0.8], [0, 0]])
    assert x[0, 0] == 3  # the input is not changed in place
