"""Property-based checks of modified P@N (hypothesis)."""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.evaluate.metrics import evaluate

N_VALUES = [1, 3, 5]


def frame(labels):
    return pd.DataFrame({"label": [f"CT/abd/{c}" for c in labels], "modality": "CT", "anatomy": "abd"})


@st.composite
def retrieval_case(draw):
    n_classes = draw(st.integers(1, 4))
    index_labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=25))
    query_labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=15))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    k = min(len(index_labels), 5)
    neighbours = np.stack([rng.permutation(len(index_labels))[:k] for _ in query_labels])
    if k < 5:
        neighbours = np.pad(neighbours, ((0, 0), (0, 5 - k)), constant_values=-1)
    return index_labels, query_labels, neighbours


@settings(max_examples=60, deadline=None)
@given(retrieval_case())
def test_values_lie_in_unit_interval(case):
    index_labels, query_labels, neighbours = case
    m = evaluate(frame(query_labels), frame(index_labels), neighbours, ns=N_VALUES, levels=[]).metrics
    for avg in ("micro", "macro"):
        for n in N_VALUES:
            v = m[f"{avg}/P_at_{n}"]
            assert np.isnan(v) or 0.0 <= v <= 1.0


@settings(max_examples=60, deadline=None)
@given(retrieval_case(), st.integers(0, 2**16))
def test_invariant_to_query_order(case, seed):
    index_labels, query_labels, neighbours = case
    order = np.random.default_rng(seed).permutation(len(query_labels))
    a = evaluate(frame(query_labels), frame(index_labels), neighbours, ns=N_VALUES, levels=[]).metrics
    b = evaluate(
        frame([query_labels[i] for i in order]), frame(index_labels), neighbours[order], ns=N_VALUES, levels=[]
    ).metrics
    for key in ("micro/P_at_1", "macro/P_at_3", "micro/P_at_5"):
        assert np.isclose(a[key], b[key], equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_micro_equals_macro_when_classes_are_balanced(n_classes, per_class, seed):
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    rng = np.random.default_rng(seed)
    neighbours = np.stack([rng.permutation(len(labels)) for _ in labels])[:, : min(5, len(labels))]
    m = evaluate(frame(labels), frame(labels), neighbours, ns=[1], levels=[]).metrics
    assert np.isclose(m["micro/P_at_1"], m["macro/P_at_1"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=20), st.lists(st.integers(0, 3), min_size=1, max_size=10))
def test_perfect_ranking_scores_one(index_labels, query_labels):
    index_labels = np.array(index_labels)
    # perfect ranking: all rows of the query's class first
    neighbours = np.stack([np.argsort(index_labels != q, kind="stable") for q in query_labels])
    result = evaluate(
        frame(query_labels),
        frame(list(index_labels)),
        neighbours,
        ns=[1, 3, 10][:1] + [min(3, len(index_labels))],
        levels=[],
    )
    for key, value in result.metrics.items():
        if key.startswith(("micro/", "macro/")) and not np.isnan(value):
            assert value == 1.0
