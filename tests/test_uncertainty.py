"""Intervals and paired comparisons over per-query records (SPEC section 11)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import f1_score, roc_auc_score

from cbir.evaluate import uncertainty


def scipy_interval(values, resamples=20000, seed=1):
    ci = stats.bootstrap(
        (values,),
        np.mean,
        method="percentile",
        n_resamples=resamples,
        random_state=seed,
    )
    return ci.confidence_interval.low, ci.confidence_interval.high


@pytest.mark.parametrize("kind", ["binary", "continuous", "p_at_10"])
def test_interval_agrees_with_scipy_percentile_bootstrap(kind):
    rng = np.random.default_rng(3)
    values = {
        "binary": (rng.random(150) < 0.4).astype(float),
        "continuous": rng.beta(2, 5, 400),
        "p_at_10": rng.integers(0, 11, 300) / 10,
    }[kind]
    bounds = uncertainty.mean_intervals(values, np.zeros(len(values), int), 20000, 0.95, uncertainty.rng_for(7, kind))
    low, high = scipy_interval(values)
    width = high - low
    # Monte-Carlo error of a 2.5 % quantile with 20,000 resamples is ~1 % of the width
    assert bounds["micro"][0] == pytest.approx(low, abs=0.04 * width)
    assert bounds["micro"][1] == pytest.approx(high, abs=0.04 * width)
    assert bounds["macro"] == bounds["micro"]  # one class: macro is micro


def test_stratified_resamples_keep_every_class_and_its_count():
    values = np.r_[np.ones(5), np.zeros(95)]
    classes = np.r_[np.zeros(5, int), np.ones(95, int)]
    sums, counts = uncertainty.class_resample_sums(values, classes, 500, uncertainty.rng_for(0, "t"))
    assert list(counts) == [5, 95]
    assert np.all(sums[:, 0] == 5) and np.all(sums[:, 1] == 0)  # a class never loses its queries
    # macro is then the same in every resample: mean of 1.0 and 0.0
    micro, macro = uncertainty.micro_macro_samples(values, classes, 500, uncertainty.rng_for(0, "t"))
    assert np.allclose(macro, 0.5) and np.allclose(micro, 0.05)


def test_stratified_interval_matches_index_resampling_within_each_class():
    """The multinomial-over-distinct-values draw is the distribution of a resample of queries:
    the interval agrees with explicit per-class index resampling (scipy, stratified by hand)."""
    rng = np.random.default_rng(5)
    classes = np.repeat(np.arange(4), [10, 30, 60, 200])
    values = rng.integers(0, 6, len(classes)) / 5
    bounds = uncertainty.mean_intervals(values, classes, 20000, 0.95, uncertainty.rng_for(1, "m"))
    by_class = [values[classes == c] for c in range(4)]
    ci = stats.bootstrap(
        by_class,
        lambda *parts: np.mean([p.mean() for p in parts]),
        method="percentile",
        n_resamples=20000,
        random_state=2,
    ).confidence_interval  # each sample resampled alone
    width = ci.high - ci.low
    assert bounds["macro"][0] == pytest.approx(ci.low, abs=0.04 * width)
    assert bounds["macro"][1] == pytest.approx(ci.high, abs=0.04 * width)


def test_many_distinct_values_use_index_resampling_with_the_same_result():
    rng = np.random.default_rng(9)
    values = rng.random(2000)  # > MAX_DISTINCT distinct values: index-array path
    low, high = scipy_interval(values)
    bounds = uncertainty.mean_intervals(values, np.zeros(2000, int), 20000, 0.95, uncertainty.rng_for(3, "x"))
    assert bounds["micro"][0] == pytest.approx(low, abs=0.04 * (high - low))
    assert bounds["micro"][1] == pytest.approx(high, abs=0.04 * (high - low))


def test_retrieval_intervals_bracket_the_point_estimate_and_are_seeded():
    rng = np.random.default_rng(0)
    records = pd.DataFrame(
        {
            "class": rng.choice(list("abcd"), 300),
            "modality": rng.choice(["CT", "MR"], 300),
            "P@1": (rng.random(300) < 0.5).astype(float),
            "P@10": rng.integers(0, 11, 300) / 10,
        }
    )
    records.loc[:4, "P@1"] = np.nan  # excluded queries
    first = uncertainty.retrieval_intervals(records, [1, 10], 300, 0.95, seed=42)
    assert first == uncertainty.retrieval_intervals(records, [1, 10], 300, 0.95, seed=42)
    assert first != uncertainty.retrieval_intervals(records, [1, 10], 300, 0.95, seed=43)
    assert "modality/CT/macro/P_at_10_ci_high" in first
    ok = records["P@1"].notna()
    micro, macro = uncertainty.point_micro_macro(records["P@1"][ok].to_numpy(), records["class"][ok].to_numpy())
    assert first["micro/P_at_1_ci_low"] < micro < first["micro/P_at_1_ci_high"]
    assert first["macro/P_at_1_ci_low"] < macro < first["macro/P_at_1_ci_high"]
    assert uncertainty.retrieval_intervals(records, [1], 0, 0.95, seed=42) == {}  # resamples=0: off


def test_resampled_confusions_give_sklearn_macro_f1_and_weighted_auc_equals_sklearn_on_repeated_rows():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, 120)
    probabilities = rng.dirichlet(np.ones(4), 120)
    probabilities[np.arange(60), truth[:60]] += 0.5
    # one resample drawn as weights, then the same rows repeated for scikit-learn
    weights = uncertainty._stratified_weights(truth, 1, np.random.default_rng(2))
    repeated = np.repeat(np.arange(120), weights[0].astype(int))
    one_hot = np.eye(4, dtype=bool)[truth]
    for c in range(4):
        assert uncertainty.weighted_auc(probabilities[:, c], one_hot[:, c], weights)[0] == pytest.approx(
            roc_auc_score(one_hot[repeated, c], probabilities[repeated, c])
        )
    assert uncertainty.weighted_auc(probabilities.ravel(), one_hot.ravel(), np.repeat(weights, 4, axis=1))[
        0
    ] == pytest.approx(roc_auc_score(one_hot[repeated], probabilities[repeated], average="micro"))
    predicted = probabilities.argmax(1)
    matrix = np.zeros((1, 4, 4))
    np.add.at(matrix[0], (truth[repeated], predicted[repeated]), 1)
    f1 = uncertainty.f1_from_confusions(matrix)
    assert f1["macro_f1"][0] == pytest.approx(f1_score(truth[repeated], predicted[repeated], average="macro"))
    bounds = uncertainty.classification_intervals(
        truth, probabilities, 200, 0.95, 0, modality=np.array(["A", "B"] * 60)
    )
    for name in (
        "accuracy",
        "macro_f1",
        "micro_roc_auc",
        "macro_roc_auc",
        "modality/A/macro_f1",
    ):
        assert bounds[f"{name}_ci_low"] <= bounds[f"{name}_ci_high"]
    assert bounds["macro_f1_ci_low"] < f1_score(truth, predicted, average="macro") < bounds["macro_f1_ci_high"]


def test_sign_flip_exact_for_few_differences_and_matches_enumeration():
    d = np.array([0.3, -0.1, 0.2, 0.0, 0.4])
    # by hand: 16 sign patterns of the 4 nonzero |d|, |sum| >= 0.8
    patterns = np.array([[s1, s2, s3, s4] for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1) for s4 in (1, -1)])
    expected = np.mean(np.abs(patterns @ np.array([0.3, 0.1, 0.2, 0.4])) >= 0.8 - 1e-12)
    p = uncertainty.sign_flip_p(d, np.zeros(5, int), "micro", 10000, uncertainty.rng_for(0, "f"))
    assert p == pytest.approx(expected)


def test_sign_flip_monte_carlo_agrees_with_scipy_permutation_test():
    rng = np.random.default_rng(4)
    d = rng.integers(-1, 2, 200) * (rng.random(200) < 0.5) + (rng.random(200) < 0.06)
    ours = uncertainty.sign_flip_p(d, np.zeros(200, int), "micro", 20000, uncertainty.rng_for(0, "f"))
    theirs = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20000, random_state=0).pvalue
    assert ours == pytest.approx(theirs, abs=0.02)


def test_holm_matches_the_textbook_example():
    assert np.allclose(uncertainty.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(uncertainty.holm([0.5, 0.9]), [1.0, 1.0])


def paired_records(seed: int, rates: dict[str, float], n: int = 600) -> dict[str, pd.DataFrame]:
    """Per-query P@1 of several runs on the same queries: a run hits with its rate, and runs
    with equal rates are independent draws (two runs of one encoder with different noise)."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(["c0", "c1", "c2"], n)
    base = rng.random(n)
    out = {}
    for name, rate in rates.items():
        noise = rng.random(n) < 0.15  # some queries flip between runs
        hit = np.where(noise, rng.random(n) < rate, base < rate).astype(float)
        out[name] = pd.DataFrame({"row": np.arange(n), "class": classes, "P@1": hit})
    return out


def test_paired_comparison_finds_a_planted_difference_and_ties_two_runs_of_one_encoder():
    records = paired_records(2, {"good": 0.6, "good_again": 0.6, "worse": 0.45})
    table = uncertainty.compare_runs(records, [("micro", "P@1"), ("macro", "P@1")], 500, 0.95, 10000, seed=1)
    assert len(table) == 6  # 3 pairs x 2 metrics
    for metric in ("micro P@1", "macro P@1"):
        rows = table[table["metric"] == metric]
        values = {name: float(r["P@1"].mean()) for name, r in records.items()}
        tied = uncertainty.tied_for_best(values, rows)
        assert set(tied) == {"good", "good_again"}
        planted = rows[(rows["a"] == "good") & (rows["b"] == "worse")].iloc[0]
        assert planted["p_holm"] < 0.05 and planted["ci_low"] > 0
        same = rows[(rows["a"] == "good") & (rows["b"] == "good_again")].iloc[0]
        assert same["p_holm"] >= 0.05 and same["ci_low"] <= 0 <= same["ci_high"]


def test_sign_flip_p_is_calibrated_under_no_difference():
    """Two runs of one encoder (same rate, independent noise): p < 0.05 in about 5 % of datasets."""
    rejected = []
    for seed in range(200):
        records = paired_records(seed, {"a": 0.6, "b": 0.6}, n=300)
        d = records["a"]["P@1"].to_numpy() - records["b"]["P@1"].to_numpy()
        rejected.append(
            uncertainty.sign_flip_p(
                d,
                records["a"]["class"].to_numpy(),
                "micro",
                2000,
                uncertainty.rng_for(seed, "null"),
            )
            < 0.05
        )
    assert 0.015 <= np.mean(rejected) <= 0.10


def test_scale_of_the_vectorised_bootstrap_is_independent_of_query_count_for_p_at_n():
    """1.6M queries: the draws are per (class, distinct value), not per query (memory stays small)."""
    rng = np.random.default_rng(0)
    q = 1_600_000
    classes = rng.integers(0, 165, q)
    values = rng.integers(0, 11, q) / 10
    bounds = uncertainty.mean_intervals(values, classes, 200, 0.95, uncertainty.rng_for(0, "big"))
    assert bounds["micro"][0] < values.mean() < bounds["micro"][1]
    assert bounds["micro"][1] - bounds["micro"][0] < 0.002


def test_interval_formatting():
    assert uncertainty.fmt_interval(0.409, 0.3712, 0.4488) == "0.409 [0.37, 0.45]"
    assert uncertainty.fmt_interval(0.409) == "0.409"
    assert uncertainty.with_interval({"m": 0.5}, "m") == "0.500"
    assert uncertainty.with_interval({}, "m") == "-"


@pytest.mark.slow
def test_the_95_percent_interval_covers_the_population_value_in_93_to_97_percent_of_datasets():
    """Repeated datasets with the synthetic generator's classes (36, 120 down to 12 queries)."""
    from cbir.bench.uncertainty import coverage

    result = coverage(datasets=2000, resamples=1000, populations=8)
    assert 0.93 <= result["micro_coverage"] <= 0.97
    assert 0.93 <= result["macro_coverage"] <= 0.97


@pytest.mark.parametrize(
    "override",
    [
        "eval.ci.resamples=-1",
        "eval.ci.level=1.5",
        "eval.ci.flips=0",
        "eval.audit.near_duplicate=2",
        "eval.exclude_same_patient=maybe",
    ],
)
def test_bad_interval_and_audit_settings_are_config_errors(override):
    from conftest import compose

    from cbir.evaluate import per_query
    from cbir.job.checks import ConfigError

    per_query.check_config(compose("debug=smoke"))  # the defaults are fine
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        per_query.check_config(compose("debug=smoke", override))


def test_percentile_interval_and_point_estimates_by_hand():
    samples = np.r_[np.arange(101.0), np.nan, np.nan]  # resamples without a value are left out
    assert uncertainty.percentile_interval(samples, 0.9) == pytest.approx((5.0, 95.0))
    assert uncertainty.percentile_interval(samples, 0.5) == pytest.approx((25.0, 75.0))
    assert all(np.isnan(uncertainty.percentile_interval(np.array([np.nan]), 0.95)))
    # class a: 1, 0; class b: 0, 1, 1 -> micro 3/5, macro (1/2 + 2/3) / 2
    micro, macro = uncertainty.point_micro_macro(np.array([1.0, 0, 0, 1, 1]), np.array(list("aabbb")))
    assert (micro, macro) == pytest.approx((0.6, (0.5 + 2 / 3) / 2))
    assert all(np.isnan(uncertainty.point_micro_macro(np.zeros(0), np.zeros(0))))
    # all values missing: no interval
    nan = uncertainty.mean_intervals(np.full(3, np.nan), np.zeros(3), 10, 0.95, uncertainty.rng_for(0, "n"))
    assert all(np.isnan(nan["micro"])) and all(np.isnan(nan["macro"]))


def test_rng_is_reproducible_and_differs_by_seed_and_by_name():
    def draw(seed, *names):
        return uncertainty.rng_for(seed, *names).random(4).tolist()

    assert draw(0, "micro") == draw(0, "micro")
    assert draw(0, "micro") != draw(1, "micro")
    assert draw(0, "micro") != draw(0, "macro")
    assert draw(0, "flip", "x") != draw(0, "diff", "x")


def test_f1_from_confusions_by_hand_leaves_out_a_class_never_true_nor_predicted():
    # true class rows, predicted columns; class 2 absent; class 3 predicted once, never true
    matrix = np.array([[3, 1, 0, 0], [0, 2, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    got = uncertainty.f1_from_confusions(matrix[None])
    # F1 = 2 tp / (row + column): class 0 6/7, class 1 4/6, class 3 0
    assert got["macro_f1"][0] == pytest.approx((6 / 7 + 4 / 6 + 0) / 3)
    assert got["accuracy"][0] == pytest.approx(5 / 7)


def test_resampled_confusions_keep_each_true_class_count():
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 1, 0])
    confusions = uncertainty._resampled_confusions(truth, predicted, 4, 50, uncertainty.rng_for(0, "c"))
    assert confusions.shape == (50, 4, 4)
    assert np.all(confusions.sum(axis=2) == [3, 2, 1, 0])  # per true class: its query count
    # a true class's draws land only where its queries were predicted
    assert np.all(confusions[:, 1, [0, 2, 3]] == 0) and np.all(confusions[:, 2, 1:] == 0)
    assert np.any(confusions[:, 0, 0] != 2)  # and they vary between resamples


def test_holm_caps_at_one():
    assert uncertainty.holm([0.6, 0.7]).tolist() == [1.0, 1.0]  # 2 x 0.6 and 2 x 0.7 would exceed 1
    assert uncertainty.holm([0.2]).tolist() == [0.2]


def sign_flip_by_enumeration(d, classes):
    """The definition: the share of all sign vectors whose |mean of class means| is at least the observed one."""
    import itertools

    frame = pd.DataFrame({"d": d, "c": classes})

    def statistic(values):
        return abs(frame.assign(d=values).groupby("c")["d"].mean().mean())

    observed = statistic(d)
    signs = itertools.product((1, -1), repeat=len(d))
    return np.mean([statistic(np.asarray(s) * d) >= observed - 1e-12 for s in signs])


def test_macro_sign_flip_is_exact_over_class_means_and_at_the_flip_count_boundary():
    d = np.array([1.0, 0.5, 0.5, -0.25])
    classes = np.array(["a", "a", "a", "b"])
    p = uncertainty.sign_flip_p(d, classes, "macro", 10000, uncertainty.rng_for(0, "m"))
    assert p == pytest.approx(sign_flip_by_enumeration(d, classes))
    assert p != pytest.approx(uncertainty.sign_flip_p(d, classes, "micro", 10000, uncertainty.rng_for(0, "m")))
    # 4 nonzero differences, 16 flips: still the exact enumeration (random flips give k / 17)
    assert uncertainty.sign_flip_p(d, classes, "macro", 16, uncertainty.rng_for(0, "m")) == pytest.approx(p)
    assert uncertainty.sign_flip_p(np.zeros(4), classes, "macro", 16, uncertainty.rng_for(0, "m")) == 1.0


def test_tied_for_best_by_hand():
    pairs = pd.DataFrame({"a": ["a", "c", "a"], "b": ["b", "a", "c"], "p_holm": [0.05, 0.01, 0.2]})
    # b: p 0.05 against the best is not below alpha (tied); c: 0.01 (not tied)
    assert uncertainty.tied_for_best({"a": 0.5, "b": 0.4, "c": 0.3}, pairs) == ["a", "b"]
    assert uncertainty.tied_for_best({"a": 0.5, "b": 0.4, "c": 0.3}, pairs, alpha=0.06) == ["a"]
    # equal values: the later name is the best
    assert uncertainty.tied_for_best({"a": 0.3, "b": 0.1, "c": 0.3}, pairs)[0] == "c"


def test_compare_runs_pairs_queries_by_row_not_by_order():
    records = paired_records(2, {"good": 0.6, "worse": 0.45}, n=200)
    table = uncertainty.compare_runs(records, [("micro", "P@1"), ("macro", "P@1")], 100, 0.95, 1000, seed=1)
    shuffled = dict(records, worse=records["worse"].sample(frac=1, random_state=0))
    again = uncertainty.compare_runs(shuffled, [("micro", "P@1"), ("macro", "P@1")], 100, 0.95, 1000, seed=1)
    pd.testing.assert_frame_equal(table, again)
    assert list(table.columns) == ["metric", "a", "b", "difference", "ci_low", "ci_high", "p", "p_holm"]
    assert table["metric"].tolist() == ["micro P@1", "macro P@1"]
    good, worse = records["good"], records["worse"]
    micro = good["P@1"].mean() - worse["P@1"].mean()
    macro = (good.groupby("class")["P@1"].mean() - worse.groupby("class")["P@1"].mean()).mean()
    assert table["difference"].tolist() == pytest.approx([micro, macro])
    assert table["p_holm"].tolist() == pytest.approx(table["p"].tolist())  # one pair per metric
    fewer = dict(records, worse=records["worse"].iloc[1:])
    with pytest.raises(ValueError, match="good and worse answered different queries"):
        uncertainty.compare_runs(fewer, [("micro", "P@1")], 100, 0.95, 1000, seed=1)


def test_merged_interval_columns_and_digits():
    frame = pd.DataFrame({"run": ["x"], "P@1": [0.409], "P@1 low": [0.3712], "P@1 high": [0.4488], "n": [3]})
    merged = uncertainty.merge_interval_columns(frame)
    assert merged.to_dict("records") == [{"run": "x", "P@1": "0.409 [0.37, 0.45]", "n": 3}]
    assert frame["P@1"].tolist() == [0.409] and len(frame.columns) == 5  # the input is left alone
    assert uncertainty.fmt_interval(0.5, 0.41, 0.62, digits=2) == "0.50 [0.4, 0.6]"
    assert uncertainty.fmt_interval(np.nan, 0.1, 0.2) == "-" and uncertainty.fmt_interval(0.5, np.nan, 0.6) == "0.500"
    assert uncertainty.with_interval({"m": 0.5, "m_ci_low": 0.4, "m_ci_high": 0.6}, "m", 2) == "0.50 [0.4, 0.6]"


def test_classification_intervals_keys_and_agreement_with_resampled_correctness():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 150)
    probabilities = rng.dirichlet(np.ones(3), 150)
    probabilities[np.arange(90), truth[:90]] += 0.6
    modality = np.where(np.arange(150) % 3 == 0, "MR", "CT")
    bounds = uncertainty.classification_intervals(truth, probabilities, 4000, 0.9, 5, modality=modality, prefix="knn/")
    names = ("accuracy", "micro_f1", "macro_f1", "micro_roc_auc", "macro_roc_auc")
    subsets = ("knn/", "knn/modality/CT/", "knn/modality/MR/")
    assert set(bounds) == {f"{s}{n}_ci_{end}" for s in subsets for n in names for end in ("low", "high")}
    assert bounds["knn/micro_f1_ci_low"] == bounds["knn/accuracy_ci_low"]
    # accuracy resampled within each true class = the stratified interval of per-query correctness
    correct = (probabilities.argmax(1) == truth).astype(float)
    for subset, rows in (("knn/", slice(None)), ("knn/modality/MR/", modality == "MR")):
        expected = uncertainty.mean_intervals(correct[rows], truth[rows], 4000, 0.9, uncertainty.rng_for(0, "c"))
        width = expected["micro"][1] - expected["micro"][0]
        assert bounds[f"{subset}accuracy_ci_low"] == pytest.approx(expected["micro"][0], abs=0.1 * width)
        assert bounds[f"{subset}accuracy_ci_high"] == pytest.approx(expected["micro"][1], abs=0.1 * width)
    point = roc_auc_score(np.eye(3)[truth], probabilities, average="micro")
    assert bounds["knn/micro_roc_auc_ci_low"] < point < bounds["knn/micro_roc_auc_ci_high"]
    point = roc_auc_score(np.eye(3)[truth], probabilities, average="macro")
    assert bounds["knn/macro_roc_auc_ci_low"] < point < bounds["knn/macro_roc_auc_ci_high"]
    assert bounds["knn/macro_roc_auc_ci_high"] - bounds["knn/macro_roc_auc_ci_low"] < 0.2
    # too many cells to recompute ROC-AUC, or a single class: F1 and accuracy only
    big = uncertainty.classification_intervals(truth, probabilities, 50000, 0.9, 5)
    assert set(big) == {f"{n}_ci_{end}" for n in names[:3] for end in ("low", "high")}
    single = uncertainty.classification_intervals(np.zeros(5, int), np.ones((5, 1)), 20, 0.9, 5)
    assert set(single) == {f"{n}_ci_{end}" for n in names[:3] for end in ("low", "high")}
    assert uncertainty.classification_intervals(truth, probabilities, 0, 0.9, 5) == {}


def test_weighted_auc_counts_ties_as_one_half_by_hand():
    scores, positive = np.array([0.5, 0.5, 0.2, 0.8]), np.array([True, False, False, True])
    # positives .5 and .8 against negatives .5 and .2: 0.5 (tie) + 1 + 1 + 1 out of 4 pairs
    assert uncertainty.weighted_auc(scores, positive, np.ones((1, 4)))[0] == pytest.approx(3.5 / 4)
    # the positive .5 counted twice: (2 x 1.5 + 2) / (3 x 2)
    assert uncertainty.weighted_auc(scores, positive, np.array([[2.0, 1, 1, 1]]))[0] == pytest.approx(5 / 6)
    # a resample without a negative has no AUC
    assert np.isnan(uncertainty.weighted_auc(scores, positive, np.array([[1.0, 0, 0, 1]]))[0])


def test_macro_and_micro_roc_auc_intervals_are_told_apart():
    """Scores that rank each class's queries perfectly (macro 1) but sit at a different level
    per class, so that pooled cells mix (micro well below 1)."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 90)
    scores = 0.3 * np.arange(3)[None, :] + 0.2 * np.eye(3)[truth] + 0.01 * rng.random((90, 3))
    bounds = uncertainty.classification_intervals(truth, scores, 300, 0.95, 0)
    assert bounds["macro_roc_auc_ci_low"] == bounds["macro_roc_auc_ci_high"] == 1.0
    # pooled, the ranking of cells depends only on the class counts, which resampling keeps
    micro = roc_auc_score(np.eye(3)[truth], scores, average="micro")
    assert micro < 0.9
    assert (bounds["micro_roc_auc_ci_low"], bounds["micro_roc_auc_ci_high"]) == pytest.approx((micro, micro))


def test_resamples_drawn_in_chunks_equal_one_draw(monkeypatch):
    """Chunks bound memory only: the generator's draws, and so the numbers, are the same."""
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], [40, 25, 1])
    few = rng.integers(1, 5, len(classes)) / 4  # multinomial over distinct values
    many = 1 + 0.01 * rng.random(len(classes))  # index resampling
    d = rng.integers(-1, 2, 60) * rng.integers(1, 4, 60) / 4  # random sign flips

    def draw():
        return (
            uncertainty.class_resample_sums(few, classes, 37, uncertainty.rng_for(0, "a")),
            uncertainty.class_resample_sums(many, classes, 37, uncertainty.rng_for(0, "b")),
            uncertainty.sign_flip_p(d, np.zeros(60), "micro", 500, uncertainty.rng_for(0, "c")),
        )

    monkeypatch.setattr(uncertainty, "MAX_DISTINCT", 10)
    whole = draw()
    monkeypatch.setattr(uncertainty, "CHUNK_ELEMENTS", 50)  # a few resamples per chunk
    chunked = draw()
    for (sums, counts), (sums_chunked, counts_chunked) in zip(whole[:2], chunked[:2]):
        assert np.array_equal(sums, sums_chunked) and np.array_equal(counts, counts_chunked)
        assert np.all(sums[:, 2] == sums[0, 2])  # a one-query class: its value every time
    assert whole[2] == chunked[2]
    # index resampling draws every member: two values 0 and 1, sums 0, 1 or 2
    monkeypatch.setattr(uncertainty, "MAX_DISTINCT", 1)
    sums, _ = uncertainty.class_resample_sums(np.array([0.0, 1.0]), np.zeros(2), 200, uncertainty.rng_for(0, "d"))
    assert set(np.unique(sums)) == {0.0, 1.0, 2.0}
    # stratified: each resample's class sum is a sum of the class's count of its values
    for values, (sums, _) in zip((few, many), whole[:2]):
        assert np.all(sums[:, 0] <= 40 * values[:40].max()) and np.all(sums[:, 0] >= 40 * values[:40].min())


def test_retrieval_intervals_per_modality_and_per_metric():
    rng = np.random.default_rng(1)
    values = (rng.random(80) < 0.5).astype(float)
    records = pd.DataFrame(
        {
            "class": rng.choice(list("ab"), 80),
            "modality": np.repeat(["CT", "MR"], 40),
            "P@1": values,
            "P@5": values,  # the same values under another metric's name
        }
    )
    records.loc[records["modality"] == "CT", "P@1"] = 1.0
    records.loc[records["modality"] == "MR", "P@1"] = 0.0
    out = uncertainty.retrieval_intervals(records, [1, 5], 200, 0.95, seed=0, prefix="x/")
    names = {
        f"x/{subset}{average}/P_at_{n}_ci_{end}"
        for subset in ("", "modality/CT/", "modality/MR/")
        for average in ("micro", "macro")
        for n in (1, 5)
        for end in ("low", "high")
    }
    assert set(out) == names
    assert out["x/modality/CT/micro/P_at_1_ci_low"] == out["x/modality/CT/macro/P_at_1_ci_high"] == 1.0
    assert out["x/modality/MR/micro/P_at_1_ci_low"] == out["x/modality/MR/macro/P_at_1_ci_high"] == 0.0
    # each metric draws its own resamples (a generator per seed and name)
    again = uncertainty.retrieval_intervals(records.rename(columns={"P@5": "P@9"}), [9], 200, 0.95, seed=0, prefix="x/")
    assert (out["x/micro/P_at_5_ci_low"], out["x/micro/P_at_5_ci_high"]) != (
        again["x/micro/P_at_9_ci_low"],
        again["x/micro/P_at_9_ci_high"],
    )
    # one resample is a (degenerate) interval, not "off"
    assert set(uncertainty.retrieval_intervals(records, [1, 5], 1, 0.95, seed=0, prefix="x/")) == names
    # a bound column without its pair is left as it is
    lone = pd.DataFrame({"P@1": [0.5], "P@1 low": [0.4]})
    assert uncertainty.merge_interval_columns(lone).to_dict("records") == [{"P@1": 0.5, "P@1 low": 0.4}]


def test_point_estimates_of_one_query_and_f1_of_one_class():
    assert uncertainty.point_micro_macro(np.array([0.5]), np.array(["a"])) == (0.5, 0.5)
    # every query of class 0, all right: macro F1 over the one class present
    got = uncertainty.f1_from_confusions(np.array([[[3.0, 0], [0, 0]]]))
    assert got["macro_f1"][0] == 1.0 and got["accuracy"][0] == 1.0


def test_weighted_auc_of_one_positive_and_one_negative_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auc = uncertainty.weighted_auc(np.array([0.2, 0.8]), np.array([False, True]), np.array([[1.0, 1], [0, 1]]))
    assert auc[0] == 1.0 and np.isnan(auc[1])  # the second resample has no negative


def test_paired_difference_micro_and_macro_by_hand():
    d = np.array([1.0, 0.5, 0.5, -0.25])
    classes = np.array(list("aaab"))
    micro = uncertainty.paired_difference(d, np.zeros(4), classes, "micro", 0, 0.95, 10000, seed=0)
    macro = uncertainty.paired_difference(d, np.zeros(4), classes, "macro", 0, 0.95, 10000, seed=0)
    assert micro.difference == pytest.approx(1.75 / 4) and macro.difference == pytest.approx((2 / 3 - 0.25) / 2)
    assert micro.p == pytest.approx(sign_flip_by_enumeration(d, np.zeros(4))) == 0.25
    assert macro.p == pytest.approx(sign_flip_by_enumeration(d, classes)) == 0.5
    assert isinstance(micro.low, float) and np.isnan(micro.low) and np.isnan(micro.high)  # no resamples: no interval
    # ten queries of class a at +1, one of class b at -1: each class keeps its count and its one
    # value in every resample, so the intervals are the points
    a, classes = np.r_[np.ones(10), 0.0], np.r_[np.zeros(10, int), 1]
    b = np.r_[np.zeros(10), 1.0]
    for average, point in (("micro", 9 / 11), ("macro", 0.0)):
        result = uncertainty.paired_difference(a, b, classes, average, 1, 0.95, 100, seed=0)
        assert (result.difference, result.low, result.high) == pytest.approx((point, point, point)), average


def test_compare_runs_leaves_out_queries_missing_in_either_run():
    records = paired_records(0, {"a": 0.6, "b": 0.5}, n=50)
    records["a"].loc[3, "P@1"] = np.nan  # excluded in run a only
    table = uncertainty.compare_runs(records, [("micro", "P@1")], 0, 0.95, 100, seed=0)
    both = records["a"]["P@1"].notna()
    expected = (records["a"]["P@1"][both] - records["b"]["P@1"][both]).mean()
    assert table["difference"].tolist() == pytest.approx([expected])
    assert table["ci_low"].dtype == float and table["ci_low"].isna().all()
    empty = uncertainty.compare_runs(records, [], 0, 0.95, 100, seed=0)
    assert empty.empty and list(empty.columns) == ["metric", "a", "b", "difference", "ci_low", "ci_high", "p", "p_holm"]


def test_sign_flip_p_ignores_zero_differences_and_the_scale():
    classes = np.zeros(5, int)
    # 3 nonzero differences: 8 sign patterns, exact with 8 flips; the zeros do not count
    d = np.array([1.0, 0.5, 0.5, 0.0, 0.0])
    p = uncertainty.sign_flip_p(d, classes, "micro", 8, uncertainty.rng_for(0, "z"))
    assert p == pytest.approx(sign_flip_by_enumeration(d, classes)) == 0.25
    # the same p for differences a million times smaller (a tolerance relative to the statistic)
    assert uncertainty.sign_flip_p(d * 1e-6, classes, "micro", 8, uncertainty.rng_for(0, "z")) == p
    # differences that cancel: every sign pattern is at least as extreme
    assert uncertainty.sign_flip_p(np.array([1.0, -1.0]), np.zeros(2), "micro", 8, uncertainty.rng_for(0, "z")) == 1.0


def test_roc_auc_intervals_agree_with_scikit_learn_on_resampled_rows():
    """Stratified resamples drawn as row indices, scored by scikit-learn: the same interval."""
    rng = np.random.default_rng(7)
    truth = np.repeat([0, 1, 2], [30, 50, 70])
    scores = rng.random((150, 3)) + np.eye(3)[truth] * np.array([0.9, 0.3, 0.1])  # AUCs far apart per class
    ours = uncertainty.classification_intervals(truth, scores, 2000, 0.9, 0)
    micro, macro = [], []
    for _ in range(600):
        rows = np.concatenate([rng.choice(np.flatnonzero(truth == c), (truth == c).sum()) for c in range(3)])
        micro.append(roc_auc_score(np.eye(3)[truth[rows]], scores[rows], average="micro"))
        macro.append(roc_auc_score(np.eye(3)[truth[rows]], scores[rows], average="macro"))
    for name, samples in (("micro_roc_auc", micro), ("macro_roc_auc", macro)):
        low, high = np.percentile(samples, [5, 95])
        assert ours[f"{name}_ci_low"] == pytest.approx(low, abs=0.15 * (high - low)), name
        assert ours[f"{name}_ci_high"] == pytest.approx(high, abs=0.15 * (high - low)), name


def test_classification_intervals_of_two_classes_one_query_one_resample_and_one_true_class():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 40)
    scores = rng.random((40, 2))
    names = {
        f"{n}_ci_{end}"
        for n in ("accuracy", "micro_f1", "macro_f1", "micro_roc_auc", "macro_roc_auc")
        for end in ("low", "high")
    }
    assert set(uncertainty.classification_intervals(truth, scores, 50, 0.9, 0)) == names  # two classes have AUCs
    assert set(uncertainty.classification_intervals(truth, scores, 1, 0.9, 0)) == names
    one = uncertainty.classification_intervals(truth[:1], scores[:1], 20, 0.9, 0)
    assert one["accuracy_ci_low"] == one["accuracy_ci_high"] == float(scores[0].argmax() == truth[0])
    # every query of class 0 (of three): no class has both outcomes, so no macro AUC; micro has one
    single = uncertainty.classification_intervals(np.zeros(30, int), rng.random((30, 3)), 50, 0.9, 0)
    assert np.isnan(single["macro_roc_auc_ci_low"]) and np.isnan(single["macro_roc_auc_ci_high"])
    assert 0 <= single["micro_roc_auc_ci_low"] <= single["micro_roc_auc_ci_high"] <= 1
    # too many cells overall and for CT: skipped there, still computed for MR's 10 queries
    big_truth, big_scores = rng.integers(0, 3, 150), rng.random((150, 3))
    modality = np.where(np.arange(150) < 10, "MR", "CT")
    big = uncertainty.classification_intervals(big_truth, big_scores, 50000, 0.9, 0, modality=modality)
    assert "micro_roc_auc_ci_low" not in big and "modality/CT/micro_roc_auc_ci_low" not in big
    assert "modality/CT/macro_f1_ci_low" in big and "modality/MR/macro_roc_auc_ci_low" in big


def test_random_sign_flips_count_every_draw_once():
    # 2 nonzero differences, 3 flips: random flips; differences that cancel make every draw count
    p = uncertainty.sign_flip_p(np.array([1.0, -1.0]), np.zeros(2), "micro", 3, uncertainty.rng_for(0, "r"))
    assert p == (1 + 3) / (1 + 3)
