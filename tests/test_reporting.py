"""Saturation curves from a sweep's runs: one line per encoder (and per swept dataset, index type
or labels mode), one point per index size."""

from __future__ import annotations

import pandas as pd

from cbir.report.job_files import saturation_figure, saturation_frame


def runs(*rows):
    columns = ["encoder", "dataset", "index_type", "labels", "task", "per_class", "micro/P_at_1", "macro/P_at_1"]
    return pd.DataFrame([dict(zip(columns, r)) for r in rows])


def test_labels_modes_are_separate_lines_and_shared_searches_one_point():
    table = runs(
        ("a", "syn", "flat", "single", "retrieval", "5", 0.5, 0.4),
        ("a", "syn", "flat", "single", "all", "5", 0.5, 0.4),  # same search as the row above
        ("a", "syn", "flat", "multi", "retrieval", "5", 0.3, 0.2),
        ("a", "syn", "flat", "single", "knn_classification", "5", None, None),  # no P@N: no point
        ("a", "syn", "flat", "single", "retrieval", "20", 0.6, 0.5),
    )
    curves = saturation_frame(table, [1])
    assert sorted(curves["group"].unique()) == ["a/multi", "a/single"]
    single = curves[curves["group"] == "a/single"]
    assert single["step"].tolist() == [5, 20] and single["micro/P_at_1"].tolist() == [0.5, 0.6]


def test_different_numbers_at_one_size_are_both_kept():
    table = runs(
        ("a", "syn", "flat", "single", "retrieval", "5", 0.5, 0.4),
        ("a", "syn", "flat", "single", "retrieval", "5", 0.7, 0.6),
    )  # e.g. another index.params
    assert len(saturation_frame(table, [1])) == 2


def test_saturation_figure_keeps_a_flat_curve_flat():
    """The whole precision scale on the y axis: 0.301 to 0.305 must not fill the plot as a steep fall."""
    import matplotlib.pyplot as plt

    table = runs(
        ("a", "syn", "flat", "single", "retrieval", "10", 0.305, 0.2),
        ("a", "syn", "flat", "single", "retrieval", "100", 0.301, 0.2),
    )
    fig = saturation_figure(saturation_frame(table, [1]), [1])
    try:
        assert [ax.get_ylim() for ax in fig.axes] == [(0, 1.02), (0, 1.02)]
    finally:
        plt.close(fig)
