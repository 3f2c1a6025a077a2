"""Modified P@N against hand-worked examples (SPEC section 3)."""

import warnings

import numpy as np
import pandas as pd
import pytest

from cbir.evaluate.metrics import evaluate, modified_precision, precision_curve


def frame(labels):
    rows = [label.split("/") for label in labels]
    return pd.DataFrame({"label": labels, "modality": [r[0] for r in rows], "anatomy": [r[1] for r in rows]})


def test_denominator_is_min_of_n_and_class_size():
    # class A has 2 index rows; neighbours A, B, A, B, B -> P@5 uses n = 2: one hit in the first 2
    hits = np.array([[1, 0, 1, 0, 0]], bool)
    p = modified_precision(hits, np.array([2]), [1, 3, 5])
    assert p[:, 0] == pytest.approx([1.0, 0.5, 0.5])


def test_query_whose_class_is_absent_is_excluded_and_counted():
    index = frame(["CT/abd/a", "CT/abd/b"])
    query = frame(["CT/abd/a", "CT/abd/c"])
    neighbours = np.array([[0, 1], [1, 0]])
    result = evaluate(query, index, neighbours, ns=[1], levels=[])
    assert result.n_excluded == 1
    assert result.excluded_classes == ["CT/abd/c"]
    assert result.metrics["micro/P_at_1"] == 1.0  # only the first query counts
    assert result.metrics["queries/excluded"] == 1.0


def test_micro_and_macro_differ_with_unequal_class_sizes():
    index = frame(["CT/abd/a", "CT/abd/b"])
    # three queries of class a retrieve a (hit), one of class b retrieves a (miss)
    query = frame(["CT/abd/a"] * 3 + ["CT/abd/b"])
    neighbours = np.array([[0, 1]] * 4)
    m = evaluate(query, index, neighbours, ns=[1], levels=[]).metrics
    assert m["micro/P_at_1"] == pytest.approx(0.75)
    assert m["macro/P_at_1"] == pytest.approx(0.5)


def test_spread_follows_pandas_sample_std():
    index = frame(["CT/abd/a"] * 2 + ["CT/abd/b"] * 2)
    query = frame(["CT/abd/a"] * 3 + ["CT/abd/b"] * 2)
    neighbours = np.array([[0, 2], [2, 0], [0, 1], [2, 3], [0, 2]])
    m = evaluate(query, index, neighbours, ns=[1], levels=[]).metrics
    p1 = pd.Series([1.0, 0.0, 1.0, 1.0, 0.0])
    classes = pd.Series(["a", "a", "a", "b", "b"])
    assert m["micro_std/P_at_1"] == pytest.approx(p1.std())
    assert m["macro_std/P_at_1"] == pytest.approx(p1.groupby(classes).std().mean())


def test_levels_count_coarser_matches():
    index = frame(["CT/abd/x", "CT/head/x", "MR/abd/x"])
    query = frame(["CT/abd/y"])
    # the nearest row shares modality and anatomy but not the finding
    result = evaluate(query, index, np.array([[0, 1, 2]]), ns=[1], levels=["modality", "anatomy"])
    m = result.metrics
    assert result.n_excluded == 1  # class CT/abd/y has no index row
    assert m["level/anatomy/micro/P_at_1"] == 1.0
    assert m["level/modality/micro/P_at_1"] == 1.0
    result = evaluate(query, index, np.array([[1, 0, 2]]), ns=[1, 2], levels=["modality", "anatomy"])
    assert result.metrics["level/anatomy/micro/P_at_1"] == 0.0  # CT/head is the wrong anatomy
    assert result.metrics["level/modality/micro/P_at_1"] == 1.0
    # CT has 2 index rows: P@2 at modality level = both of the first 2 are CT
    assert result.metrics["level/modality/micro/P_at_2"] == 1.0


def test_query_in_index_is_not_counted_as_relevant_to_itself():
    # the query is index row 0; its class has one other index row (row 1)
    index = frame(["CT/abd/a", "CT/abd/a", "CT/abd/b"])
    query = frame(["CT/abd/a"])
    neighbours = np.array([[1, 2]])  # search already removed the query itself
    m = evaluate(query, index, neighbours, query_in_index=np.array([0]), ns=[1, 2], levels=[]).metrics
    assert m["micro/P_at_1"] == 1.0
    # n = min(2, 2 - 1) = 1, so P@2 looks at the first neighbour only (0.5 if self were counted)
    assert m["micro/P_at_2"] == 1.0


def test_per_modality_breakdown_and_per_class_table():
    index = frame(["CT/abd/a", "CT/abd/a", "XR/chest/b", "XR/chest/c"])
    query = frame(["CT/abd/a", "XR/chest/b", "XR/chest/b"])
    neighbours = np.array([[0, 1], [2, 3], [3, 2]])
    result = evaluate(query, index, neighbours, ns=[1], levels=[])
    m = result.metrics
    assert m["modality/CT/micro/P_at_1"] == 1.0
    assert m["modality/XR/micro/P_at_1"] == 0.5
    assert m["anatomy/chest/micro/P_at_1"] == 0.5
    table = result.per_class.set_index("class")
    assert table.loc["XR/chest/b", "queries"] == 2
    assert table.loc["XR/chest/b", "n_index"] == 1
    assert table.loc["XR/chest/b", "most_confused"] == "XR/chest/c"
    assert table.loc["CT/abd/a", "P@1"] == 1.0


def test_curve_equals_pointwise_precision():
    rng = np.random.default_rng(0)
    labels = [f"CT/abd/{c}" for c in "abcde"]
    index = frame(list(rng.choice(labels, 60)))
    query = frame(list(rng.choice(labels, 40)))
    neighbours = np.stack([rng.permutation(60)[:20] for _ in range(40)])
    curve = precision_curve(query, index, neighbours, np.full(40, -1), k=20, chunk=7)
    full = evaluate(query, index, neighbours, ns=range(1, 21), levels=[]).metrics
    for n in (1, 5, 20):
        assert curve.loc[n - 1, "micro"] == pytest.approx(full[f"micro/P_at_{n}"])
        assert curve.loc[n - 1, "macro"] == pytest.approx(full[f"macro/P_at_{n}"])


def test_curve_leaves_out_a_query_whose_class_the_index_lacks():
    """The absent class sorts last (the highest class code, no index row): excluded, as in evaluate."""
    index = frame(["CT/abd/a", "CT/abd/a", "CT/abd/b"])
    query = frame(["CT/abd/a", "CT/abd/b", "CT/abd/z"])
    neighbours = np.array([[0, 2, 1], [0, 2, 1], [2, 0, 1]])
    curve = precision_curve(query, index, neighbours, np.full(3, -1), k=3)
    # a: hits 1,0,1 with n_c=2 -> P@1 1, P@2 1/2, P@3 1/2 (first 2 only); b: hits 0,1,0, n_c=1 -> 0, 0, 0
    assert curve["micro"].tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert curve["macro"].tolist() == pytest.approx([0.5, 0.25, 0.25])
    full = evaluate(query, index, neighbours, ns=[1, 2, 3], levels=[]).metrics
    assert [full[f"micro/P_at_{n}"] for n in (1, 2, 3)] == pytest.approx(curve["micro"].tolist())


def test_curve_with_self_matches_and_padding_equals_pointwise_precision():
    """Overlapping splits (own index positions, 0 among them) and fewer index rows than k (-1 padding)."""
    index = frame(["CT/abd/a", "CT/abd/b", "CT/abd/b", "CT/abd/a"])
    query = frame(["CT/abd/a", "CT/abd/b", "CT/abd/b", "CT/abd/a"])
    own = np.array([0, 1, -1, 3])  # the third query is not an index row
    neighbours = np.array([[3, 1, 2, -1], [2, 0, 3, -1], [1, 2, 0, 3], [0, 2, 1, -1]])
    curve = precision_curve(query, index, neighbours, own, k=4)
    full = evaluate(query, index, neighbours, own, ns=[1, 2, 3, 4], levels=[]).metrics
    assert curve["micro"].tolist() == pytest.approx([full[f"micro/P_at_{n}"] for n in (1, 2, 3, 4)])
    assert curve["macro"].tolist() == pytest.approx([full[f"macro/P_at_{n}"] for n in (1, 2, 3, 4)])
    # by hand: n_c = 1, 1, 2, 1 -> P@1 = 1, 1, 1, 1 and P@4 = 1, 1, 2/2, 1
    assert curve["micro"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_matches_the_study_formula_on_random_data():
    """Reimplementation of the study's per-query loop (pandas apply) on random rankings."""
    rng = np.random.default_rng(1)
    labels = np.array([f"CT/abd/{c}" for c in "abcdefg"])
    index = frame(list(rng.choice(labels, 50, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])))
    query = frame(list(rng.choice(labels, 80)))
    neighbours = np.stack([rng.permutation(50)[:10] for _ in range(80)])
    result = evaluate(query, index, neighbours, ns=[1, 3, 5, 10], levels=[]).metrics
    occurrences = index["label"].value_counts()
    retrieved = index["label"].to_numpy()[neighbours]
    for n_value in (1, 3, 5, 10):
        per_query = []
        for q in range(80):
            c = query["label"][q]
            n = min(n_value, occurrences.get(c, 0))
            if n == 0:
                continue
            per_query.append((sum(retrieved[q, :n] == c) / n, c))
        s = pd.Series([v for v, _ in per_query])
        cls = pd.Series([c for _, c in per_query])
        assert result[f"micro/P_at_{n_value}"] == pytest.approx(s.mean())
        assert result[f"macro/P_at_{n_value}"] == pytest.approx(s.groupby(cls).mean().mean())


# Five index rows and five queries worked out by hand, with every output of evaluate checked:
# query 0's patient also has index rows 1 (its class) and 2 (another class) which the search left
# out (removed_pairs), and query 3's class has no index row.
HAND_INDEX = ["CT/abd/a", "CT/abd/a", "CT/abd/b", "MR/head/c", "CT/chest/d"]
HAND_QUERY = ["CT/abd/a", "CT/abd/b", "MR/head/c", "MR/head/e", "CT/abd/a"]
HAND_NEIGHBOURS = np.array([[0, 3, 4], [0, 1, 2], [4, 3, 0], [3, 0, 1], [2, 0, 1]])
HAND_REMOVED = (np.array([0, 0]), np.array([1, 2]))


def hand_evaluate(**options):
    return evaluate(
        frame(HAND_QUERY),
        frame(HAND_INDEX),
        HAND_NEIGHBOURS,
        ns=[2, 1],
        levels=("modality", "anatomy"),
        removed_pairs=HAND_REMOVED,
        **options,
    )


def test_every_metric_of_a_hand_worked_run_with_removed_rows():
    result = hand_evaluate()
    # class level, n_c without the removed rows of the query's class: 1, 1, 1, 0 (excluded), 2
    p1 = [1.0, 0.0, 0.0, 0.0]  # queries 0, 1, 2, 4
    p2 = [1.0, 0.0, 0.0, 0.5]  # n = min(2, n_c): 1, 1, 1, 2
    expected = {
        "micro/P_at_1": 1 / 4,
        "macro/P_at_1": (0.5 + 0 + 0) / 3,  # a: (1 + 0) / 2, b: 0, c: 0
        "micro_std/P_at_1": np.std(p1, ddof=1),
        "macro_std/P_at_1": np.std([1.0, 0.0], ddof=1),  # b and c have one query: no spread
        "micro/P_at_2": 3 / 8,
        "macro/P_at_2": (0.75 + 0 + 0) / 3,
        "micro_std/P_at_2": np.std(p2, ddof=1),
        "macro_std/P_at_2": np.std([1.0, 0.5], ddof=1),
        # per query modality / anatomy (over class codes): CT = queries 0, 1, 4; MR = 2 (3 excluded)
        "modality/CT/micro/P_at_1": 1 / 3,
        "modality/CT/macro/P_at_1": (0.5 + 0) / 2,
        "modality/CT/micro/P_at_2": 1.5 / 3,
        "modality/CT/macro/P_at_2": (0.75 + 0) / 2,
        "modality/MR/micro/P_at_1": 0.0,
        "modality/MR/macro/P_at_1": 0.0,
        "modality/MR/micro/P_at_2": 0.0,
        "modality/MR/macro/P_at_2": 0.0,
        "anatomy/abd/micro/P_at_1": 1 / 3,
        "anatomy/abd/macro/P_at_1": 0.25,
        "anatomy/abd/micro/P_at_2": 0.5,
        "anatomy/abd/macro/P_at_2": 0.375,
        "anatomy/head/micro/P_at_1": 0.0,
        "anatomy/head/macro/P_at_1": 0.0,
        "anatomy/head/micro/P_at_2": 0.0,
        "anatomy/head/macro/P_at_2": 0.0,
        # modality level: CT has 4 index rows, 2 of them removed for query 0 -> n_c 2, 4, 1, 1, 4
        "level/modality/micro/P_at_1": 4 / 5,
        "level/modality/macro/P_at_1": (1 + 0.5) / 2,
        "level/modality/micro/P_at_2": (0.5 + 1 + 0 + 1 + 1) / 5,
        "level/modality/macro/P_at_2": ((0.5 + 1 + 1) / 3 + 0.5) / 2,
        # modality/anatomy level: CT/abd has 3 index rows, 2 removed for query 0 -> n_c 1, 3, 1, 1, 3
        "level/anatomy/micro/P_at_1": 4 / 5,
        "level/anatomy/macro/P_at_1": (1 + 0.5) / 2,
        "level/anatomy/micro/P_at_2": 4 / 5,
        "level/anatomy/macro/P_at_2": (1 + 0.5) / 2,
        "queries/total": 5.0,
        "queries/excluded": 1.0,
        "index/size": 5.0,
        "index/classes": 4.0,
        "index/max_per_class": 2.0,
    }
    assert result.metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value), name
    assert (result.n_queries, result.n_excluded, result.excluded_classes) == (5, 1, ["MR/head/e"])

    per_query = result.per_query
    assert list(per_query.columns) == ["class", "modality", "anatomy", "first", "P@1", "P@2"]
    assert per_query["class"].tolist() == HAND_QUERY
    assert per_query["modality"].tolist() == ["CT", "CT", "MR", "MR", "CT"]
    assert per_query["anatomy"].tolist() == ["abd", "abd", "head", "head", "abd"]
    assert per_query["first"].tolist() == [0, 0, 4, 3, 2]
    assert per_query["P@1"].tolist() == pytest.approx([1.0, 0.0, 0.0, np.nan, 0.0], nan_ok=True)
    assert per_query["P@2"].tolist() == pytest.approx([1.0, 0.0, 0.0, np.nan, 0.5], nan_ok=True)

    table = result.per_class
    assert list(table.columns) == [
        "class",
        "modality",
        "anatomy",
        "queries",
        "n_index",
        "P@1",
        "P@2",
        "most_confused",
        "most_confused_count",
    ]
    assert table["class"].tolist() == ["CT/abd/a", "CT/abd/b", "MR/head/c", "MR/head/e"]
    assert table["modality"].tolist() == ["CT", "CT", "MR", "MR"]
    assert table["anatomy"].tolist() == ["abd", "abd", "head", "head"]
    assert table["queries"].tolist() == [2, 1, 1, 1]
    assert table["n_index"].tolist() == [2, 1, 1, 0]
    assert table["P@1"].tolist() == pytest.approx([0.5, 0.0, 0.0, np.nan], nan_ok=True)
    assert table["P@2"].tolist() == pytest.approx([0.75, 0.0, 0.0, np.nan], nan_ok=True)
    # the nearest row of a wrong first neighbour: query 4 -> b, 1 -> a, 2 -> d, 3 -> c
    assert table["most_confused"].tolist() == ["CT/abd/b", "CT/abd/a", "CT/chest/d", "MR/head/c"]
    assert table["most_confused_count"].tolist() == [1, 1, 1, 1]

    # no curve unless asked for
    assert result.curve.empty and list(result.curve.columns) == ["N", "micro", "macro"]


def test_curve_counts_n_c_without_the_removed_rows():
    assert hand_evaluate(curve_k=1).curve["micro"].tolist() == [1 / 4]
    curve = hand_evaluate(curve_k=2).curve
    assert curve["N"].tolist() == [1, 2]
    assert curve["micro"].tolist() == pytest.approx([1 / 4, 3 / 8])
    assert curve["macro"].tolist() == pytest.approx([1 / 6, 1 / 4])
    # N stops at the 3 neighbours searched; n = min(3, n_c) is n = min(2, n_c) for every query here
    curve = hand_evaluate(curve_k=10).curve
    assert curve["N"].tolist() == [1, 2, 3]
    assert curve["micro"].tolist() == pytest.approx([1 / 4, 3 / 8, 3 / 8])
    # one query: the mean of one value
    index = frame(["CT/abd/b", "CT/abd/a", "CT/abd/a"])
    one = precision_curve(frame(["CT/abd/a"]), index, np.array([[0, 1]]), np.full(1, -1), k=2)
    assert one["micro"].tolist() == [0.0, 0.5] and one["macro"].tolist() == [0.0, 0.5]


def test_spread_of_two_queries_and_of_one():
    two = evaluate(frame(["CT/abd/a", "CT/abd/b"]), frame(["CT/abd/a", "CT/abd/b"]), np.array([[0], [0]]), ns=[1])
    assert two.metrics["micro_std/P_at_1"] == pytest.approx(np.sqrt(0.5))  # P@1 = 1, 0
    assert np.isnan(two.metrics["macro_std/P_at_1"])  # each class has one query
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no spread of one value is taken (numpy would warn)
        one = evaluate(frame(["CT/abd/a"]), frame(["CT/abd/a"]), np.array([[0]]), ns=[1], levels=[])
    assert one.metrics["micro/P_at_1"] == 1.0 and np.isnan(one.metrics["micro_std/P_at_1"])


def test_too_few_neighbours_for_n_is_an_error_naming_both_counts():
    hits = np.array([[1, 0], [0, 0]], bool)
    # the first query's class has 5 rows: P@3 needs 3 neighbours; the second's has none (excluded)
    with pytest.raises(ValueError, match=r"P@3 needs 3 neighbours, search returned 2"):
        modified_precision(hits, np.array([5, 0]), [1, 3])
    # a class of 2 rows needs only 2 neighbours for any N
    assert modified_precision(hits, np.array([2, 0]), [3])[0, 0] == pytest.approx(0.5)


def test_no_neighbours_searched_gives_no_first_row():
    """Every query's class is absent from the index: nothing to retrieve, every query excluded."""
    result = evaluate(frame(["CT/abd/z", "MR/head/y"]), frame(["CT/abd/a"]), np.zeros((2, 0), int), ns=[1], levels=[])
    assert result.per_query["first"].tolist() == [-1, -1]
    assert result.per_class["most_confused"].tolist() == ["", ""]
    assert result.per_class["most_confused_count"].tolist() == [0, 0]
    assert result.n_excluded == 2 and np.isnan(result.metrics["micro/P_at_1"])


def test_no_n_gives_only_the_counts():
    nothing = evaluate(frame(["CT/abd/a"]), frame(["CT/abd/a"]), np.array([[0]]), ns=[], levels=[])
    assert nothing.n_excluded == 0 and nothing.excluded_classes == []
    assert set(nothing.metrics) == {
        "queries/total",
        "queries/excluded",
        "index/size",
        "index/classes",
        "index/max_per_class",
    }


def test_per_class_table_is_sorted_by_class_with_integer_counts():
    index = frame(["CT/y/a", "MR/x/b", "MR/x/b"])
    result = evaluate(frame(["MR/x/b", "CT/y/a", "MR/x/b"]), index, np.array([[0], [1], [1]]), ns=[1], levels=[])
    table = result.per_class
    assert table["class"].tolist() == ["CT/y/a", "MR/x/b"]
    assert table["n_index"].tolist() == [1, 2] and table["n_index"].dtype.kind == "i"
    assert table["most_confused_count"].tolist() == [1, 1] and table["most_confused_count"].dtype.kind == "i"
