"""The parity verdict is per group: PASS only when the 1st percentile of EVERY (dataset, modality)
group reaches the threshold, so one bad dataset or modality fails the check even when the overall
numbers look fine; `python -m cbir.parity` exits 0 on PASS, 1 on FAIL."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir

from cbir.study.parity import compare

GROUPS = {("nih14", "XR"): 400, ("radiology_ai", "CT"): 400, ("radiology_ai", "MR"): 50}


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture()
def three_groups():
    """850 rows in three groups; 'published' equals 'ours' up to a tiny perturbation."""
    table = pd.DataFrame(
        [
            {"path": f"{d}/{m}/{i}.png", "dataset": d, "modality": m, "label": f"{m}/x/y"}
            for (d, m), n in GROUPS.items()
            for i in range(n)
        ]
    )
    ours = unit_rows(len(table), 8, 0)
    published = ours + 1e-4 * unit_rows(len(table), 8, 1)
    return table, ours, published


def test_every_group_passing_is_a_pass(three_groups):
    table, ours, published = three_groups
    report = compare(table, ours, np.ones(len(table)), published, np.ones(len(table)), threshold=0.99)
    assert report.passed and report.verdict == "PASS" and report.compared == len(table)
    summary = report.summary.set_index(["dataset", "modality"])
    assert summary["rows"].to_dict() == {**GROUPS, ("all", "all"): 850}
    assert (summary["p1"] > 0.999).all() and (summary["below_threshold"] == 0).all()


def test_one_bad_group_fails_while_the_overall_numbers_pass(three_groups):
    """3 of the 50 MR rows are another image's embedding: that group's 1st percentile is far below
    the threshold, while the overall 1st percentile (3 of 850 rows, under 1%) and every median pass."""
    table, ours, published = three_groups
    mr = np.flatnonzero(table["modality"] == "MR")
    published[mr[:3]] = unit_rows(3, 8, 2)
    report = compare(table, ours, np.ones(len(table)), published, np.ones(len(table)), threshold=0.99)
    assert not report.passed and report.verdict == "FAIL"
    summary = report.summary.set_index(["dataset", "modality"])
    cosine = np.einsum("ij,ij->i", ours, published / np.linalg.norm(published, axis=1, keepdims=True))
    assert summary.loc[("radiology_ai", "MR"), "p1"] == pytest.approx(np.percentile(cosine[mr], 1))
    assert summary.loc[("radiology_ai", "MR"), "p1"] < 0.99
    assert summary.loc[("radiology_ai", "MR"), "below_threshold"] == 3
    assert summary.loc[("all", "all"), "p1"] >= 0.99 and (summary["median"] > 0.999).all()
    assert (summary.drop(("radiology_ai", "MR"))["p1"] >= 0.99).all()
    assert sorted(report.worst["path"].head(3)) == sorted(table["path"].iloc[mr[:3]])


def test_the_threshold_is_inclusive(three_groups):
    table, ours, published = three_groups
    report = compare(table, ours, np.ones(len(table)), published, np.ones(len(table)), threshold=0.99)
    lowest_p1 = float(report.summary["p1"].min())
    at = compare(table, ours, np.ones(len(table)), published, np.ones(len(table)), threshold=lowest_p1)
    above = compare(
        table, ours, np.ones(len(table)), published, np.ones(len(table)), threshold=np.nextafter(lowest_p1, 2)
    )
    assert at.passed and not above.passed


def test_nothing_compared_is_not_a_pass(three_groups):
    table, ours, published = three_groups
    report = compare(table, ours, np.zeros(len(table)), published, np.ones(len(table)))
    assert not report.passed and report.compared == 0 and report.only_published == len(table)


def test_summary_worst_rows_and_counts_are_exact(three_groups):
    """Defaults (threshold 0.99, 20 worst rows), a value at the threshold is not below it, rows
    missing on one side are counted, the worst table lists rows (no stray index column)."""
    table, ours, published = three_groups
    n = len(table)
    ours_valid, published_valid = np.ones(n, bool), np.ones(n, bool)
    ours_valid[:5] = False  # cbir could not embed 5 rows
    published_valid[-3:] = False  # 3 rows lack a published embedding
    published[5:8] = unit_rows(3, 8, 4)  # 3 rows far off (all nih14/XR)
    report = compare(table, ours, ours_valid, published, published_valid)
    assert report.threshold == 0.99 and len(report.worst) == 20
    assert (report.compared, report.only_ours, report.only_published) == (n - 8, 3, 5)
    assert list(report.worst.columns) == ["path", "dataset", "modality", "label", "cosine"]
    assert sorted(report.worst["path"].head(3)) == sorted(table["path"].iloc[5:8])
    summary = report.summary.set_index(["dataset", "modality"])
    rows = np.flatnonzero(ours_valid & published_valid)
    unit = published / np.linalg.norm(published, axis=1, keepdims=True)
    cosine = pd.Series(np.einsum("ij,ij->i", ours, unit)[rows], index=rows)
    xr = cosine[table["modality"].iloc[rows].to_numpy() == "XR"]
    assert summary.loc[("nih14", "XR"), "min"] == pytest.approx(xr.min())
    assert summary.loc[("nih14", "XR"), "median"] == pytest.approx(np.median(xr))
    assert summary.loc[("nih14", "XR"), "rows"] == len(xr) == 395
    lowest = float(summary.loc[("nih14", "XR"), "min"])  # a value in the data, bit for bit
    at_min = compare(table, ours, ours_valid, published, published_valid, threshold=lowest)
    assert at_min.summary.set_index(["dataset", "modality"]).loc[("nih14", "XR"), "below_threshold"] == 0


def test_an_empty_comparison_still_has_the_summary_columns(three_groups, tmp_path):
    from cbir.study.parity import write_report

    table, ours, published = three_groups
    report = compare(table, ours, np.zeros(len(table)), published, np.ones(len(table)))
    assert list(report.summary.columns) == [
        "dataset",
        "modality",
        "rows",
        "of_rows",
        "share",
        "min",
        "p1",
        "median",
        "below_threshold",
    ]
    write_report(report, tmp_path)
    assert pd.read_csv(tmp_path / "parity_summary.csv").columns.tolist() == list(report.summary.columns)


def test_report_files_hold_the_verdict_rule_counts_and_tables(three_groups, tmp_path):
    import json

    from cbir.study.parity import write_report

    table, ours, published = three_groups
    published[:10] = unit_rows(10, 8, 6)  # 2.5% of the XR group: its 1st percentile fails
    report = compare(table, ours, np.ones(len(table)), published, np.ones(len(table)))
    files = write_report(report, tmp_path / "reports" / "parity")  # folders created as needed
    assert sorted(p.name for p in files.values()) == ["parity.json", "parity_summary.csv", "parity_worst.csv"]
    saved = json.loads(files["json"].read_text())
    assert {k: saved[k] for k in ("verdict", "threshold", "rule", "compared", "only_ours", "only_published")} == {
        "verdict": "FAIL",
        "threshold": 0.99,
        "rule": "1st percentile >= threshold and share compared >= min_compared, in every group",
        "compared": len(table),
        "only_ours": 0,
        "only_published": 0,
    }
    assert [(r["dataset"], r["modality"], r["rows"]) for r in saved["summary"]] == [
        ("nih14", "XR", 400),
        ("radiology_ai", "CT", 400),
        ("radiology_ai", "MR", 50),
        ("all", "all", 850),
    ]
    pd.testing.assert_frame_equal(pd.read_csv(files["summary"]), report.summary, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(files["worst"]), report.worst, check_dtype=False)


def test_another_embedding_length_is_named(three_groups):
    from cbir.job.checks import DataError

    table, ours, published = three_groups
    with pytest.raises(
        DataError,
        match=r"cbir's embeddings are 8-d, the published ones 4-d: a different model "
        r"or embedding head \(e.g. projected vs CLS",
    ):
        compare(table, ours, np.ones(len(table)), published[:, :4], np.ones(len(table)))


def test_cosine_rows_in_blocks_equals_one_pass(three_groups):
    from cbir.study.parity import cosine_rows

    _, ours, _ = three_groups
    other = 3.0 * unit_rows(len(ours), 8, 5)  # unrelated vectors, not of unit length
    rows = np.arange(3, 800, 7)
    expected = np.einsum("ij,ij->i", ours[rows], other[rows] / 3.0)
    np.testing.assert_allclose(cosine_rows(ours, other, rows, block=16), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_parity_command_exit_codes(tmp_path, shared_data_dir):
    """The published files are cbir's own export (PASS, exit 0); then one row of one modality is
    replaced in the HDF5 file (FAIL, exit 1: that group's 1st percentile drops, the overall one
    does not); a missing published folder is a user error (exit 2)."""
    common = [
        "debug=smoke",
        f"paths.data_dir={shared_data_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "encoder=baseline",
    ]
    run_cbir(tmp_path, *common, f"export.dir={tmp_path / 'export'}", module="cbir.study.export")
    parity = [*common, f"parity.dir={tmp_path / 'export' / 'embeddings'}", f"parity.output_dir={tmp_path / 'parity'}"]
    passed = run_cbir(tmp_path, *parity, module="cbir.study.parity", check=False)
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert '"verdict": "PASS"' in (tmp_path / "parity" / "parity.json").read_text()

    manifest = compose(*common).dataset
    csv = pd.read_csv(tmp_path / "export" / "datasets" / "synthetic.csv")
    us_key = csv.loc[csv["modality"] == "US", "filepath"].iloc[0]
    assert manifest.name == "synthetic" and (csv["modality"] == "US").sum() < 100  # one row is over 1% of US
    (h5,) = (tmp_path / "export" / "embeddings").glob("*/synthetic.h5")
    with h5py.File(h5, "r+") as f:
        f[us_key][...] = -f[us_key][...]
    failed = run_cbir(tmp_path, *parity, module="cbir.study.parity", check=False)
    assert failed.returncode == 1, failed.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "parity" / "parity_summary.csv").set_index("modality")
    assert summary.loc["US", "p1"] < 0.99 and summary.loc["all", "p1"] >= 0.99
    assert (summary.drop("US")["p1"] >= 0.99).all()

    missing = run_cbir(tmp_path, *common, f"parity.dir={tmp_path / 'nowhere'}", module="cbir.study.parity", check=False)
    assert missing.returncode == 2, missing.stderr[-3000:]
