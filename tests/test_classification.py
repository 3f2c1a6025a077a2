"""Classification metrics and k-NN voting: hand-checked tiny cases and scikit-learn on
hand-built probability matrices (the study's `evaluate`, written out again here)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from cbir.evaluate import classification, knn


def study_evaluate(y_true_onehot, y_pred):
    """The study's evaluate(): scikit-learn on the one-hot truth and the probability matrix."""
    t, p = y_true_onehot.argmax(1), y_pred.argmax(1)
    return {
        "micro_roc_auc": skm.roc_auc_score(y_true_onehot, y_pred, average="micro", multi_class="ovr"),
        "macro_roc_auc": skm.roc_auc_score(y_true_onehot, y_pred, average="macro", multi_class="ovr"),
        "micro_f1": skm.f1_score(t, p, average="micro"),
        "macro_f1": skm.f1_score(t, p, average="macro", zero_division=0),
        "macro_precision": skm.precision_score(t, p, average="macro", zero_division=0),
        "macro_recall": skm.recall_score(t, p, average="macro", zero_division=0),
        "accuracy": skm.accuracy_score(t, p),
    }


# 4 queries, 3 classes; query 3 ties classes 0 and 1 (the first, 0, is predicted)
TRUTH = np.array([0, 0, 1, 2])
PROBS = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.7, 0.2], [0.4, 0.4, 0.2]])


def test_hand_checked_case_with_a_tie():
    got = classification.scores(TRUTH, PROBS)
    # predictions 0, 1, 1, 0: two right
    assert got["accuracy"] == pytest.approx(0.5) and got["micro_f1"] == pytest.approx(0.5)
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 1/2 R 1 F1 2/3; class 2: never predicted, P R F1 0
    assert got["macro_precision"] == pytest.approx(1 / 3)
    assert got["macro_recall"] == pytest.approx(0.5)
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    # one-vs-rest AUCs by counting pairs (ties count 1/2): class 0 3/4, class 1 3/3, class 2 1.5/3
    assert got["macro_roc_auc"] == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    # micro: 4 positive cells against 8 negative cells: (8 + 2.5 + 8 + 2.5) / 32
    assert got["micro_roc_auc"] == pytest.approx(21 / 32)
    assert got["roc_auc_classes"] == 3


@pytest.mark.parametrize("seed", range(5))
def test_every_metric_matches_scikit_learn_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 9))
    truth = np.r_[np.arange(n_classes), rng.integers(0, n_classes, 60)]  # every class present
    logits = rng.normal(size=(len(truth), n_classes)) + 1.5 * np.eye(n_classes)[truth] * rng.random()
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = classification.scores(truth, probs)
    expected = study_evaluate(np.eye(n_classes)[truth], probs)
    for name in classification.METRICS:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_class_absent_from_the_test_truth_is_left_out_of_macro_auc_only():
    truth = np.array([0, 1, 0, 1, 1])
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5)  # 3 classes, class 2 has no test query
    got = classification.scores(truth, probs)
    y = np.eye(3)[truth]
    # (scikit-learn on the full matrix has no AUC for class 2: an error or NaN, by version)
    assert got["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, :2], probs[:, :2], average="macro"))
    assert got["micro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, average="micro"))
    assert got["roc_auc_classes"] == 2
    pred = probs.argmax(1)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(truth, pred, average="macro", zero_division=0))


def test_evaluate_tables_and_per_modality():
    result = classification.evaluate(
        TRUTH, PROBS, ["A", "B", "C"], modality=["CT", "CT", "MR", "MR"], train_counts=[5, 4, 3]
    )
    table = result.per_class.set_index("class")
    assert table["queries"].tolist() == [2, 1, 1] and table["train_rows"].tolist() == [5, 4, 3]
    assert table["f1"].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert table.loc["A", "most_confused_with"] == "B" and table.loc["C", "most_confused_with"] == "A"
    assert table.loc["B", "most_confused_with"] == ""
    confusion = {(r.true, r.predicted): r.count for r in result.confusion.itertuples()}
    assert confusion == {("A", "A"): 1, ("A", "B"): 1, ("B", "B"): 1, ("C", "A"): 1}
    # CT queries 0, 1 (truth A, A; predicted A, B)
    assert result.metrics["modality/CT/accuracy"] == pytest.approx(0.5)
    ct = classification.scores(TRUTH[:2], PROBS[:2])
    assert result.metrics["modality/CT/micro_roc_auc"] == pytest.approx(ct["micro_roc_auc"])
    assert result.metrics["modality/MR/accuracy"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ k-NN voting
def test_knn_probabilities_study_and_plain_modes_by_hand():
    # classes 0=A, 1=B, 2=C; the query is of class A, with 2 A rows in the index
    codes = np.array([[1, 0, 2, 0, 1]])
    study = knn.probabilities(codes, np.array([2]), k=3, n_classes=3, mode="study")
    assert study.tolist() == [[0.5, 0.5, 0.0]]  # n = min(3, 2) = 2 votes: B, A
    plain = knn.probabilities(codes, np.array([2]), k=3, n_classes=3, mode="plain")
    assert plain[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])  # 3 votes: B, A, C
    # ties in the vote go to the first class in class order
    assert classification.predicted(study).tolist() == [0] and classification.predicted(plain).tolist() == [0]
    # n_c = 0 (class absent from the index): no votes, an all-zero row
    assert knn.probabilities(codes, np.array([0]), k=3, n_classes=3).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("mode", knn.MODES)
def test_predictions_by_k_equal_the_arg_max_of_each_k(mode):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, size=(50, 12))
    n_relevant = rng.integers(1, 15, size=50)
    by_k = knn.predictions_by_k(codes, n_relevant, 12, 4, mode, chunk=7)
    for k in range(1, 13):
        direct = knn.probabilities(codes, n_relevant, k, 4, mode).argmax(1)
        assert by_k[k - 1].tolist() == direct.tolist(), k


def test_choose_k_takes_the_best_k_not_one_less_and_the_smallest_on_ties():
    truth = np.array([0, 1, 1])
    predictions = np.array(
        [
            [1, 1, 0],  # k=1: 1/3
            [0, 1, 1],  # k=2: 3/3  <- best
            [0, 1, 1],  # k=3: 3/3 (tie: the smaller k wins)
            [0, 0, 0],
        ]
    )  # k=4: 1/3
    k, table = knn.choose_k(truth, predictions)
    assert k == 2
    assert table["micro_f1"].tolist() == pytest.approx([1 / 3, 1, 1, 1 / 3])
    assert table["k"].tolist() == [1, 2, 3, 4]


def test_no_queries_one_query_and_one_class():
    empty = classification.scores(np.zeros(0, int), np.zeros((0, 3)))
    assert all(np.isnan(empty[m]) for m in classification.METRICS) and empty["roc_auc_classes"] == 0
    one = classification.scores(np.array([1]), np.array([[0.2, 0.7, 0.1]]))
    assert one["accuracy"] == 1.0 and one["macro_precision"] == 1.0 and one["roc_auc_classes"] == 0
    assert one["micro_roc_auc"] == 1.0  # pooled cells: the true cell scores highest
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN without scikit-learn's warning about one class
        single = classification.scores(np.array([0, 0]), np.ones((2, 1)))
    assert np.isnan(single["micro_roc_auc"]) and single["accuracy"] == 1.0  # one class: no AUC


def test_a_class_never_predicted_scores_zero_not_one():
    """zero_division=0, as the study: class 2 is true once and never predicted; class 1 is
    predicted once and never true."""
    truth = np.array([0, 0, 2])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.6, 0.3]])
    s = classification.scores(truth, probabilities)
    assert s["macro_recall"] == pytest.approx((1 + 0 + 0) / 3)
    assert s["macro_precision"] == pytest.approx((1 + 0 + 0) / 3)
    assert s["macro_f1"] == pytest.approx((1 + 0 + 0) / 3)


def test_per_class_table_covers_every_class_even_without_queries():
    truth = np.array([0, 0, 1])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0]])
    result = classification.evaluate(truth, probabilities, ["CT/a/x", "CT/a/y", "MR/b/z"])
    table = result.per_class
    assert list(table.columns) == ["class", "queries", "train_rows", "precision", "recall", "f1", "most_confused_with"]
    assert table["class"].tolist() == ["CT/a/x", "CT/a/y", "MR/b/z"] and table["queries"].tolist() == [2, 1, 0]
    assert table["train_rows"].tolist() == [0, 0, 0] and table["train_rows"].dtype.kind == "i"  # "0", not "0.0"
    assert table["recall"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert table["most_confused_with"].tolist() == ["CT/a/y", "", ""]


def test_two_classes_have_a_micro_auc_and_one_true_class_has_no_macro_auc():
    # two classes: positive cells .7, .6, .4 against negative cells .3, .4, .6 (ties count 1/2)
    two = classification.scores(np.array([0, 1, 1]), np.array([[0.7, 0.3], [0.4, 0.6], [0.6, 0.4]]))
    assert two["micro_roc_auc"] == pytest.approx((3 + 2.5 + 1.5) / 9)
    assert two["macro_roc_auc"] == 1.0 and two["roc_auc_classes"] == 2
    # every query of class 0 (of three): no class has both outcomes, so no macro AUC
    one = classification.scores(np.array([0, 0]), np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]))
    assert np.isnan(one["macro_roc_auc"]) and one["roc_auc_classes"] == 0
    # pooled: .5 beats 3 of the 4 negative cells and ties one, .2 ties one -> 4 / 8
    assert one["micro_roc_auc"] == pytest.approx(0.5)
    # predictions 0, 1: class 0 P 1 R 1/2 F1 2/3; class 1 predicted, never true: 0
    assert one["macro_f1"] == pytest.approx(1 / 3) and one["macro_recall"] == pytest.approx(0.25)
    assert one["macro_precision"] == pytest.approx(0.5) and one["accuracy"] == 0.5


def test_evaluate_logs_the_seven_metrics_overall_and_per_modality_and_no_other_key():
    result = classification.evaluate(TRUTH, PROBS, ["A", "B", "C"], modality=["MR", "CT", "MR", "CT"])
    per_modality = {f"modality/{m}/{name}" for m in ("CT", "MR") for name in classification.METRICS}
    assert set(result.metrics) == set(classification.METRICS) | {"roc_auc_classes"} | per_modality
    # MR queries 0 and 2 (truth A, B; predicted A, B); CT queries 1 and 3 (truth A, C; predicted B, A)
    assert result.metrics["modality/MR/accuracy"] == 1.0 and result.metrics["modality/CT/accuracy"] == 0.0
    assert result.metrics["modality/MR/macro_roc_auc"] == pytest.approx(
        classification.scores(TRUTH[[0, 2]], PROBS[[0, 2]])["macro_roc_auc"]
    )
    assert classification.evaluate(TRUTH, PROBS, ["A", "B", "C"]).metrics.keys() == set(classification.METRICS) | {
        "roc_auc_classes"
    }
