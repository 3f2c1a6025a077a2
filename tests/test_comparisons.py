"""Paired comparisons across runs that answered the same queries: the sweep's table, its parent
run and cbir.report.from_runs name the encoders tied for best."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir
from mlflow.tracking import MlflowClient

from cbir.evaluate import comparisons


def records(seed: int, rate: float, n: int = 500, rows=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shared = np.random.default_rng(0)  # the same queries and a shared "easiness" across runs
    classes = shared.choice(["a", "b", "c"], n)
    easy = shared.random(n)
    hit1 = np.where(rng.random(n) < 0.2, rng.random(n) < rate, easy < rate).astype(float)
    return pd.DataFrame(
        {
            "row": np.arange(n) if rows is None else rows,
            "class": classes,
            "P@1": hit1,
            "P@10": np.clip(hit1 * 0.5 + rng.integers(0, 6, n) / 10, 0, 1),
        }
    )


def test_groups_compare_only_runs_of_the_same_queries_and_name_the_tied(caplog):
    runs = pd.DataFrame(
        {
            "name": [
                "enc_a",
                "enc_a_again",
                "enc_worse",
                "other_index",
                "fewer_queries",
                "also_fewer",
            ],
            "group": ["g1", "g1", "g1", "g2", "g1", "g1"],
            "run_id": ["r1", "r2", "r3", "r4", "r5", "r6"],
        }
    )
    data = {
        "r1": records(1, 0.6),
        "r2": records(2, 0.6),
        "r3": records(3, 0.4),
        "r4": records(4, 0.9),
        "r5": records(5, 0.9).iloc[:400],
        "r6": records(6, 0.9).iloc[100:],
    }
    with caplog.at_level(logging.WARNING, logger="cbir.evaluate.comparisons"):
        pairs, verdicts = comparisons.compare_groups(runs, data, 300, 0.95, 5000, seed=0)
    assert caplog.messages == [
        "comparisons: also_fewer, fewer_queries answered other queries than the rest of group g1; "
        "left out of the comparison"
    ]
    assert "enc_a answered" not in caplog.text
    assert set(pairs["group"]) == {"g1"}  # g2 has one run; r5 answered other queries: left out
    assert not {"other_index", "fewer_queries", "also_fewer"} & (set(pairs["a"]) | set(pairs["b"]))
    assert len(pairs) == 3 * 4  # 3 pairs x micro/macro P@1/P@10
    labels = comparisons.tied_labels(verdicts)
    assert labels["enc_worse"] == ""
    assert "µP@1" in labels["enc_a"] and "µP@1" in labels["enc_a_again"]
    lines = comparisons.summary_lines(verdicts)
    assert any(line.startswith("micro P@1: tied for best:") and "enc_worse" not in line for line in lines)


def test_query_set_tells_index_sizes_and_types_apart():
    base = compose("debug=smoke")
    key = comparisons.query_set(base, "digest")
    assert key == comparisons.query_set(compose("debug=smoke", "encoder=random"), "digest")  # encoders compare
    assert key != comparisons.query_set(compose("debug=smoke", "index.per_class=5"), "digest")
    assert key != comparisons.query_set(compose("debug=smoke", "index=hnsw"), "digest")
    assert key != comparisons.query_set(base, "other manifest")


@pytest.mark.slow
def test_sweep_names_the_encoders_tied_for_best(tmp_path, shared_data_dir):
    proc = run_cbir(
        tmp_path,
        "-m",
        "debug=smoke",
        "encoder=baseline,random",
        f"paths.data_dir={shared_data_dir}",
    )
    assert "micro P@1: tied for best: baseline" in proc.stdout
    assert "tied for best" in proc.stdout and "[0." in proc.stdout  # the column and the intervals
    (csv,) = (tmp_path / "multirun").glob("*/*/comparisons.csv")
    pairs = pd.read_csv(csv)
    assert set(pairs["metric"]) == {
        "micro P@1",
        "macro P@1",
        "micro P@10",
        "macro P@10",
    }
    assert (pairs["p_holm"] < 0.05).all() and (pairs["ci_low"] > 0).all()  # baseline beats random everywhere
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("cbir").experiment_id],
        filter_string="tags.`cbir.role` = 'sweep'",
    )
    assert "comparisons.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "tied for best: baseline" in parent.data.tags["mlflow.note.content"]
    run_cbir(tmp_path, "report.output_dir=rep", module="cbir.report")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "Tied for best" in report and "] |" in report  # intervals in table 1
    tied = pd.read_csv(tmp_path / "rep" / "tied_for_best.csv")
    assert set(tied["run"].str.split(" ").str[0]) == {"baseline"}


def test_group_tables_hold_each_runs_point_values_and_one_best():
    # groups listed out of order; g0 has a single run (nothing to compare, the others still are)
    runs = pd.DataFrame(
        {
            "name": ["c1", "c2", "enc_a", "enc_b", "enc_b", "no_records", "ungrouped", "alone", "s1", "s2"],
            "group": ["g2", "g2", "g1", "g1", "g1", "g1", None, "g0", "g3", "g3"],
            "run_id": ["r7", "r8", "r1", "r2", "r2bis", "r9", "r6", "r0", "s1", "s2"],
        }
    )
    data = {
        "r0": records(0, 0.5),
        "r1": records(1, 0.6),
        "r2": records(2, 0.4),
        "r2bis": records(3, 0.9),  # the second row of name enc_b: dropped
        "r6": records(6, 0.9),
        "r7": records(7, 0.5).drop(columns="P@10"),  # group g2 compares P@1 only
        # group g3: the same P@1 (tied), P@10 all 1 against all 0 (not tied)
        "s1": records(1, 0.5).assign(**{"P@10": 1.0}),
        "s2": records(1, 0.5).assign(**{"P@10": 0.0}),
        "r8": records(8, 0.5),
    }
    pairs, verdicts = comparisons.compare_groups(runs, data, 50, 0.95, 500, seed=0)
    assert list(pairs.columns) == comparisons.PAIR_COLUMNS
    assert pairs["group"].tolist() == ["g1"] * 4 + ["g2"] * 2 + ["g3"] * 4
    assert pairs.index.tolist() == list(range(10))
    four = ["micro P@1", "macro P@1", "micro P@10", "macro P@10"]
    assert pairs["metric"].tolist() == four + four[:2] + four

    def point(frame, average, column):
        if average == "micro":
            return frame[column].mean()
        return frame.groupby("class")[column].mean().mean()

    for row in pairs.itertuples():
        average, column = row.metric.split()
        first = {"g1": ("r1", "r2"), "g2": ("r7", "r8"), "g3": ("s1", "s2")}[row.group]
        assert (row.a, row.b) == {"g1": ("enc_a", "enc_b"), "g2": ("c1", "c2"), "g3": ("s1", "s2")}[row.group]
        assert row.a_value == pytest.approx(point(data[first[0]], average, column))
        assert row.b_value == pytest.approx(point(data[first[1]], average, column))
        assert row.difference == pytest.approx(row.a_value - row.b_value)
    assert list(verdicts.columns) == ["group", "metric", "run", "value", "best", "tied_for_best"]
    assert len(verdicts) == 2 * 4 + 2 * 2 + 2 * 4
    g1 = verdicts[verdicts["group"] == "g1"].set_index(["metric", "run"])
    assert g1.loc[("micro P@1", "enc_a"), "best"] and not g1.loc[("micro P@1", "enc_b"), "best"]
    assert g1.loc[("micro P@1", "enc_a"), "value"] == pytest.approx(data["r1"]["P@1"].mean())
    assert verdicts.groupby(["group", "metric"])["best"].sum().tolist() == [1] * 10
    assert (verdicts["best"] <= verdicts["tied_for_best"]).all()  # the best is always tied for best
    for (group, metric), rows in verdicts.groupby(["group", "metric"]):
        best = rows.loc[rows["value"].idxmax(), "run"]
        against = pairs[(pairs["group"] == group) & (pairs["metric"] == metric)]
        for row in rows.itertuples():
            pair = against[
                ((against["a"] == best) & (against["b"] == row.run))
                | ((against["a"] == row.run) & (against["b"] == best))
            ]
            assert row.tied_for_best == (row.run == best or float(pair["p_holm"].iloc[0]) >= 0.05), (
                group,
                metric,
                row.run,
            )
    # two query sets: each line names its group
    lines = comparisons.summary_lines(verdicts)
    assert len(lines) == 10 and lines[0].startswith("micro P@1 [queries g1]: tied for best: enc_a (")
    # runs of one rate are tied: both named, the higher value first
    g2 = verdicts[(verdicts["group"] == "g2") & (verdicts["metric"] == "micro P@1")].sort_values("value")
    assert g2["tied_for_best"].all()
    (low, low_value), (high, high_value) = g2[["run", "value"]].itertuples(index=False)
    assert f"micro P@1 [queries g2]: tied for best: {high} ({high_value:.3f}), {low} ({low_value:.3f})" in lines
    assert "µP@1" in comparisons.tied_labels(verdicts)["enc_a"].split()


def test_no_group_with_two_runs_gives_empty_tables():
    # g1 and g2 have one run each; g3's runs have no per-query records
    runs = pd.DataFrame(
        {"name": ["a", "b", "c", "d"], "group": ["g1", "g2", "g3", "g3"], "run_id": ["r1", "r2", "r3", "r4"]}
    )
    pairs, verdicts = comparisons.compare_groups(runs, {"r1": records(1, 0.5), "r2": records(2, 0.5)}, 10, 0.95, 10, 0)
    assert pairs.empty and list(pairs.columns) == comparisons.PAIR_COLUMNS
    assert verdicts.empty and list(verdicts.columns) == ["group", "metric", "run", "value", "best", "tied_for_best"]


def test_query_set_tells_splits_seeds_labels_and_patient_exclusion_apart():
    base = compose("debug=smoke")
    key = comparisons.query_set(base, "digest")
    for override in ("eval.query_split=val", "index.split=val", "index.seed=1", "eval.exclude_same_patient=true"):
        assert key != comparisons.query_set(compose("debug=smoke", override), "digest"), override
    assert len(key) == 16 and int(key, 16) >= 0


def test_ci_settings_from_the_config_and_defaults_without_one():
    from omegaconf import OmegaConf

    assert comparisons.ci_settings(None) == (1000, 0.95, 10000, 42)
    assert comparisons.ci_settings(OmegaConf.create({})) == (1000, 0.95, 10000, 42)
    cfg = OmegaConf.create({"seed": 7, "eval": {"ci": {"resamples": 20, "level": 0.9, "flips": 30}}})
    assert comparisons.ci_settings(cfg) == (20, 0.9, 30, 7)


def test_query_set_is_the_hash_of_the_documented_fields():
    """The tag is stored on runs and compared across cbir versions: its fields, names and defaults are fixed."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "eval": {"query_split": "test"},
            "index": {"split": "train", "per_class": None, "seed": 0, "type": "flat"},
            "dataset": {},
        }
    )
    blob = (
        '{"exclude_same_patient": false, "index_seed": 0, "index_split": "train", "index_type": "flat", '
        '"labels": "single", "manifest": "d", "per_class": "None", "query_split": "test"}'
    )
    assert json.loads(blob)  # the expected text is valid JSON, keys sorted
    assert comparisons.query_set(cfg, "d") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    multi = OmegaConf.merge(cfg, {"dataset": {"labels": "multi"}, "eval": {"exclude_same_patient": True}})
    blob = blob.replace('"single"', '"multi"').replace("false", "true")
    assert comparisons.query_set(multi, "d") == hashlib.sha256(blob.encode()).hexdigest()[:16]
