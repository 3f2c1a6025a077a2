"""Multi-label metrics (cbir/evaluate/multilabel.py) against independent computations:
sklearn's ndcg_score / average_precision_score per query, plain loops, hand-worked cases, and
the single-label modified P@N of cbir.evaluate.metrics."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from cbir.evaluate.metrics import evaluate
from cbir.evaluate.multilabel import (
    evaluate_multilabel,
    evaluate_search,
    labels_mode,
    per_query,
    report_table,
    summary_table,
)
from cbir.evaluate.retrieval import RetrievalSetup, SearchOutput

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def frame(rows):
    """rows: "MOD/anatomy/f1|f2" -> a manifest-like frame (label = the exact set)."""
    parts = [r.split("/", 2) for r in rows]
    return pd.DataFrame(
        {
            "modality": [p[0] for p in parts],
            "anatomy": [p[1] for p in parts],
            "label": rows,
            "findings": [p[2] for p in parts],
        }
    )


def finding_sets(table):
    return [
        {f"{m}/{a}/{f}" for f in fs.split("|")}
        for m, a, fs in zip(table["modality"], table["anatomy"], table["findings"])
    ]


def random_case(rng, n_index=40, n_query=25, findings="abcde"):
    def draw():
        modality = rng.choice(["CT", "XR"])
        k = rng.choice([1, 1, 2, 3])
        return f"{modality}/x/" + "|".join(sorted(rng.choice(list(findings), k, replace=False)))

    return frame([draw() for _ in range(n_index)]), frame([draw() for _ in range(n_query)])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_ndcg_and_ap_equal_sklearn_per_query_on_full_rankings():
    rng = np.random.default_rng(0)
    index, query = random_case(rng)
    n = len(index)
    neighbours = np.stack([rng.permutation(n) for _ in range(len(query))])
    values, _, n_rel = per_query(query, index, neighbours, ns=[3, 10, n])
    qs, ix = finding_sets(query), finding_sets(index)
    checked = 0
    for q in range(len(query)):
        gains = np.array([jaccard(qs[q], ix[i]) for i in range(n)])
        score = np.empty(n)
        score[neighbours[q]] = -np.arange(n)  # our ranking as strictly decreasing scores
        if gains.sum() == 0:
            assert np.isnan(values[f"nDCG_at_{n}"][q]) and n_rel[q] == 0
            continue
        checked += 1
        for k in (3, 10, n):
            expected = sklearn_metrics.ndcg_score(gains[None], score[None], k=k)
            assert values[f"nDCG_at_{k}"][q] == pytest.approx(expected, abs=1e-12)
        ap = sklearn_metrics.average_precision_score(gains > 0, score)
        assert values[f"mAP_at_{n}"][q] == pytest.approx(ap, abs=1e-12)
        assert n_rel[q] == (gains > 0).sum()
    assert checked > 15


def test_truncated_ap_precision_and_r_precision_equal_plain_loops():
    rng = np.random.default_rng(1)
    index, query = random_case(rng, n_index=60, n_query=30)
    neighbours = np.stack([rng.permutation(60)[:12] for _ in range(len(query))])
    values, _, _ = per_query(query, index, neighbours, ns=[1, 5, 10])
    qs, ix = finding_sets(query), finding_sets(index)
    for q in range(len(query)):
        relevant_rows = [i for i in range(60) if qs[q] & ix[i]]
        rel = [1 if qs[q] & ix[i] else 0 for i in neighbours[q]]
        r = len(relevant_rows)
        if r == 0:
            continue
        for big_n in (1, 5, 10):
            n = min(big_n, r)
            assert values[f"P_at_{big_n}"][q] == pytest.approx(sum(rel[:n]) / n)
            ap = sum(rel[i] * sum(rel[: i + 1]) / (i + 1) for i in range(big_n)) / min(big_n, r)
            assert values[f"mAP_at_{big_n}"][q] == pytest.approx(ap)
        depth = min(r, 12)  # R-precision: P@R, R capped at the 12 neighbours searched
        assert values["R_precision"][q] == pytest.approx(sum(rel[:depth]) / depth)


def test_tied_similarities_through_the_real_search():
    """Duplicate embeddings tie in similarity; the search orders them by index row and the
    metrics score that order (checked against sklearn fed with the independently sorted order)."""
    from cbir.evaluate.index import build_index, l2_normalise, search

    rng = np.random.default_rng(2)
    index, query = random_case(rng, n_index=30, n_query=12, findings="abc")
    base = l2_normalise(rng.normal(size=(5, 8)))
    vectors = base[rng.integers(0, 5, size=30)]  # only 5 distinct vectors: many ties
    queries = base[rng.integers(0, 5, size=12)]
    _, neighbours = search(build_index(vectors, use_gpu=False), queries, 30)
    values, _, _ = per_query(query, index, neighbours, ns=[5, 30])
    qs, ix = finding_sets(query), finding_sets(index)
    for q in range(12):
        similarity = (vectors @ queries[q]).round(5)
        order = np.lexsort((np.arange(30), -similarity))  # score descending, then index row
        assert list(neighbours[q]) == list(order)
        gains = np.array([jaccard(qs[q], ix[i]) for i in range(30)])
        if gains.sum() == 0:
            continue
        score = np.empty(30)
        score[order] = -np.arange(30)
        for k in (5, 30):
            assert values[f"nDCG_at_{k}"][q] == pytest.approx(sklearn_metrics.ndcg_score(gains[None], score[None], k=k))
        assert values["mAP_at_30"][q] == pytest.approx(sklearn_metrics.average_precision_score(gains > 0, score))


def test_query_in_index_leaves_itself_out_of_relevant_and_ideal():
    index = frame(["XR/chest/A|B", "XR/chest/A", "XR/chest/C"])
    query = frame(["XR/chest/A|B"])
    # the query is index row 0; the search removed it: neighbours A, C
    result = evaluate_multilabel(query, index, np.array([[1, 2]]), query_in_index=np.array([0]), ns=[1, 2])
    m = result.metrics
    assert m["ml/micro/P_at_1"] == 1.0 and m["ml/micro/P_at_2"] == 1.0  # n_rel = 1 (itself not counted)
    assert m["ml/micro/nDCG_at_2"] == pytest.approx(1.0)  # ideal without itself: 0.5 first
    assert m["ml/micro/R_precision"] == 1.0


def test_graded_gain_is_jaccard_and_per_finding_means_queries_that_have_it():
    index = frame(["XR/chest/A", "XR/chest/A|B", "XR/chest/B", "CT/chest/A"])
    query = frame(["XR/chest/A|B", "XR/chest/B", "CT/chest/B"])
    neighbours = np.array([[0, 2, 1, 3], [3, 1, 2, 0], [0, 1, 2, 3]])
    result = evaluate_multilabel(query, index, neighbours, ns=[1, 2])
    m = result.metrics
    # q0 {A,B}: rows 0 (A), 2 (B), 1 (A,B) are relevant (CT/chest/A is another modality): P@2 = 1
    # nDCG@2: gains 0.5, 0.5 vs ideal 1, 0.5
    d = 1 / np.log2(3)
    q0 = (0.5 + 0.5 * d) / (1 + 0.5 * d)
    # q1 {B}: CT row, then A|B (gain 0.5), ideal B (1) then A|B (0.5)
    q1 = (0.5 * d) / (1 + 0.5 * d)
    assert m["ml/micro/nDCG_at_2"] == pytest.approx((q0 + q1) / 2)
    assert m["ml/queries/excluded"] == 1  # CT/chest/B shares nothing with the index
    assert m["ml/micro/P_at_1"] == pytest.approx(0.5)  # q0 hit, q1 miss
    table = result.per_finding.set_index("finding")
    assert table.loc["XR/chest/A", "queries"] == 1 and table.loc["XR/chest/B", "queries"] == 2
    assert table.loc["XR/chest/B", "P@1"] == pytest.approx(0.5)  # mean of q0 (1) and q1 (0)
    assert table.loc["XR/chest/A", "n_index"] == 2 and table.loc["XR/chest/B", "n_index"] == 2
    # macro over findings: A -> 1.0, B -> 0.5
    assert m["ml/macro/P_at_1"] == pytest.approx(0.75)
    assert m["ml/queries/multi_finding"] == 1 and m["ml/index/multi_finding"] == 1


def test_single_label_data_gives_todays_modified_precision_exactly():
    rng = np.random.default_rng(3)
    labels = np.array([f"CT/abd/{c}" for c in "abcdefg"] + ["XR/chest/a", "XR/chest/No Finding"])

    def single(n):
        rows = list(rng.choice(labels, n, p=[0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]))
        parts = [r.split("/") for r in rows]
        return pd.DataFrame({"label": rows, "modality": [p[0] for p in parts], "anatomy": [p[1] for p in parts]})

    index, query = single(80), single(60)
    neighbours = np.stack([rng.permutation(80)[:10] for _ in range(60)])
    ns = [1, 3, 5, 10]
    today = evaluate(query, index, neighbours, ns=ns, levels=[]).metrics
    multi = evaluate_multilabel(query, index, neighbours, ns=ns).metrics
    for key, value in today.items():
        if "P_at_" in key and "_std" not in key and not key.startswith("level/"):
            assert multi["ml/" + key] == value, key  # bit for bit, not approximately


def test_blocks_and_chunks_do_not_change_the_values():
    """More than 256 distinct query sets (the overlap is computed in blocks) and query chunks."""
    rng = np.random.default_rng(4)
    index, query = random_case(rng, n_index=300, n_query=1500, findings="abcdefghijklmno")
    neighbours = np.stack([rng.permutation(300)[:10] for _ in range(1500)])
    whole, sets, n_rel = per_query(query, index, neighbours, ns=[1, 10])
    assert len(np.unique(sets.query_combo)) > 2 * 256  # a third block
    chunked, _, _ = per_query(query, index, neighbours, ns=[1, 10], chunk=7)
    for name in whole:
        np.testing.assert_array_equal(whole[name], chunked[name])
    qs, ix = finding_sets(query), finding_sets(index)
    assert list(n_rel) == [sum(bool(q & i) for i in ix) for q in qs]


def test_per_finding_means_are_computed_once_per_subset_and_feed_both_macro_and_the_table(monkeypatch):
    from cbir.evaluate import multilabel as metrics_multilabel

    calls = []

    def counted(values, pairs, mask):
        calls.append(mask)
        return finding_means(values, pairs, mask)

    finding_means = metrics_multilabel._finding_means
    monkeypatch.setattr(metrics_multilabel, "_finding_means", counted)
    rng = np.random.default_rng(5)
    index, query = random_case(rng)  # two modalities, one anatomy
    neighbours = np.stack([rng.permutation(40)[:10] for _ in range(25)])
    result = evaluate_multilabel(query, index, neighbours, ns=[1, 10])
    names = list(result.per_query)
    assert len(calls) == len(names) * (1 + 2 + 1)  # all queries, each modality, the anatomy
    for name in names:  # macro = mean over the findings of the table's column, bit for bit
        assert result.metrics[f"ml/macro/{name}"] == result.per_finding[name.replace("_at_", "@")].mean(), name


def hand_worked_result():
    """Two searched neighbours; q0 has more relevant rows than that (R capped), q2 and q4 share
    nothing with the index (excluded), MR holds only an excluded query."""
    index = frame(["XR/chest/A", "XR/chest/A|B", "XR/chest/B", "CT/head/C"])
    query = frame(["XR/chest/A|B", "XR/chest/B", "CT/head/D", "CT/head/C", "MR/knee/E"])
    neighbours = np.array([[2, 3], [0, 1], [3, 0], [0, 3], [0, 1]])
    return evaluate_multilabel(query, index, neighbours, ns=[2, 1])


def test_every_output_of_a_hand_worked_run():
    result = hand_worked_result()
    d = 1 / np.log2(3)
    nan = float("nan")
    # per query (q0, q1, q3), each by hand: relevant flags q0 1 0 (n_rel 3), q1 0 1 (n_rel 2), q3 0 1 (n_rel 1)
    by_hand = {
        "P_at_1": [1, 0, 0],
        "P_at_2": [0.5, 0.5, 0],  # q3: n = min(2, 1) = 1
        "mAP_at_1": [1, 0, 0],
        "mAP_at_2": [0.5, 0.25, 0.5],
        "nDCG_at_1": [0.5, 0, 0],  # q0's first neighbour B has Jaccard 1/2 with {A, B}
        "nDCG_at_2": [0.5 / (1 + 0.5 * d), 0.5 * d / (1 + 0.5 * d), d],
        "R_precision": [0.5, 0.5, 0],  # q0: R = 3 capped at the 2 neighbours searched
    }
    assert list(result.per_query) == list(by_hand)  # P, mAP, nDCG, R-precision, N ascending
    m = result.metrics
    for name, (v0, v1, v3) in by_hand.items():
        np.testing.assert_allclose(result.per_query[name], [v0, v1, nan, v3, nan], atol=1e-12)
        # macro over findings: A (q0), B (q0, q1), C (q3); D and E have only excluded queries
        expected = {
            "micro": np.mean([v0, v1, v3]),
            "macro": np.mean([v0, (v0 + v1) / 2, v3]),
            "modality/XR/micro": (v0 + v1) / 2,
            "modality/XR/macro": (v0 + (v0 + v1) / 2) / 2,
            "modality/CT/micro": v3,
            "modality/CT/macro": v3,
            "anatomy/chest/micro": (v0 + v1) / 2,
            "anatomy/head/macro": v3,
        }
        for prefix, value in expected.items():
            assert m[f"ml/{prefix}/{name}"] == pytest.approx(value, abs=1e-12), (prefix, name)
        for prefix in ("modality/MR/micro", "modality/MR/macro", "anatomy/knee/micro", "anatomy/knee/macro"):
            assert np.isnan(m[f"ml/{prefix}/{name}"]), (prefix, name)
    counts = {k: v for k, v in m.items() if "/" in k and k.split("/")[1] in ("queries", "index", "R_precision")}
    assert counts == {
        "ml/queries/total": 5,
        "ml/queries/excluded": 2,
        "ml/queries/multi_finding": 1,
        "ml/index/multi_finding": 1,
        "ml/index/findings": 3,  # A, B, C
        "ml/R_precision/capped": 1,
    }
    assert len(m) == 7 * 2 * (1 + 3 + 3) + 6  # micro and macro of each metric, all and per subset, counts
    assert (result.n_queries, result.n_excluded) == (5, 2)
    table = result.per_finding  # findings with a scored query, in key order
    assert list(table.columns) == ["finding", "modality", "anatomy", "queries", "n_index"] + [
        n.replace("_at_", "@") for n in by_hand
    ]
    assert list(table.index) == [0, 1, 2]
    assert table["finding"].tolist() == ["CT/head/C", "XR/chest/A", "XR/chest/B"]
    assert table["modality"].tolist() == ["CT", "XR", "XR"] and table["anatomy"].tolist() == ["head", "chest", "chest"]
    assert table["queries"].tolist() == [1, 1, 2] and table["n_index"].tolist() == [1, 2, 2]
    assert table["n_index"].dtype.kind == "i"
    for name, (v0, v1, v3) in by_hand.items():
        np.testing.assert_allclose(table[name.replace("_at_", "@")], [v3, v0, (v0 + v1) / 2], atol=1e-12)


def test_more_findings_than_one_bitset_word():
    """130 finding keys need three 64-bit words (two of 65 bits would do): sharing, Jaccard and
    the table per finding against plain sets."""
    rng = np.random.default_rng(6)
    names = [f"f{i:03d}" for i in range(65)]
    index, query = random_case(rng, n_index=80, n_query=40, findings=names)
    index = pd.concat([index, frame([f"{m}/x/{f}" for m in ("CT", "XR") for f in names])], ignore_index=True)
    neighbours = np.stack([rng.permutation(len(index)) for _ in range(40)])
    values, sets, n_rel = per_query(query, index, neighbours, ns=[5, 20])
    assert len(sets.keys) == 130 and sets.combo_bits.shape[1] == 3
    qs, ix = finding_sets(query), finding_sets(index)
    assert list(n_rel) == [sum(bool(q & i) for i in ix) for q in qs]
    member = sets.membership()
    assert [set(sets.keys[member[c]]) for c in sets.index_combo] == ix
    assert [set(sets.keys[member[c]]) for c in sets.query_combo] == qs
    for q in range(40):
        gains = np.array([jaccard(qs[q], ix[i]) for i in range(len(index))])
        score = np.empty(len(index))
        score[neighbours[q]] = -np.arange(len(index))
        for k in (5, 20):
            expected = sklearn_metrics.ndcg_score(gains[None], score[None], k=k)
            assert values[f"nDCG_at_{k}"][q] == pytest.approx(expected, abs=1e-12)
    table = evaluate_multilabel(query, index, neighbours, ns=[5]).per_finding.set_index("finding")
    for key, row in table.iterrows():
        assert row["n_index"] == sum(key in i for i in ix)
        assert row["queries"] == sum(key in q for q in qs)


def test_rows_are_told_apart_by_findings_and_by_label_where_findings_are_blank():
    """The same label with other findings, and blank findings (the label's finding counts)."""
    index = pd.DataFrame(
        {
            "modality": ["XR"] * 4,
            "anatomy": ["chest"] * 4,
            "label": ["XR/chest/A", "XR/chest/A", "XR/chest/B", "XR/chest/C"],
            "findings": ["A", "A|B", "", ""],
        }
    )
    query = index.iloc[[1, 3]]
    _, sets, n_rel = per_query(query, index, np.array([[0, 1, 2, 3]] * 2), ns=[1])
    member = sets.membership()
    assert [sorted(sets.keys[member[c]]) for c in sets.index_combo] == [
        ["XR/chest/A"],
        ["XR/chest/A", "XR/chest/B"],
        ["XR/chest/B"],
        ["XR/chest/C"],
    ]
    assert list(n_rel) == [3, 1]


def test_padded_neighbours_and_a_query_that_is_an_index_row():
    """Four neighbours asked of three index rows (-1 pads the list); the second query is index
    row 0, removed from its neighbours, its relevant rows and its ideal ranking."""
    index = frame(["XR/chest/A|B", "XR/chest/B", "XR/chest/A"])  # A|B first: padding must not take its gain
    query = frame(["XR/chest/A", "XR/chest/A"])
    neighbours = np.array([[0, 2, 1, -1], [0, 1, -1, -1]])
    values, _, n_rel = per_query(query, index, neighbours, query_in_index=np.array([-1, 2]), ns=[1, 4])
    d = 1 / np.log2(3)
    assert list(n_rel) == [2, 1]
    # q0: gains 1/2, 1, 0, 0 against the ideal 1, 1/2, 0, 0; q1: 1/2 against the ideal 1/2
    expected = {
        "P_at_1": [1, 1],
        "P_at_4": [1, 1],
        "mAP_at_1": [1, 1],
        "mAP_at_4": [1, 1],
        "nDCG_at_1": [0.5, 1],
        "nDCG_at_4": [(0.5 + d) / (1 + 0.5 * d), 1],
        "R_precision": [1, 1],
    }
    for name, value in expected.items():
        np.testing.assert_allclose(values[name], value, atol=1e-12, err_msg=name)


def test_too_few_neighbours_for_the_deepest_n_is_an_error():
    index, query = frame(["XR/chest/A"] * 6), frame(["XR/chest/A"])
    with pytest.raises(ValueError, match=r"^metrics up to N=10 need 10 neighbours, search returned 5$"):
        per_query(query, index, np.arange(5)[None], ns=[1, 10])
    values, _, _ = per_query(query, index, np.arange(5)[None], ns=[5])
    assert values["P_at_5"][0] == 1.0
    values, _, _ = per_query(query, index, np.arange(1)[None], ns=[1])  # one neighbour is enough for N=1
    assert values["P_at_1"][0] == 1.0


def test_console_table_of_the_hand_worked_run():
    result = hand_worked_result()
    result.metrics["ml/micro/P_at_1_ci_low"], result.metrics["ml/micro/P_at_1_ci_high"] = 0.05, 0.75
    result.metrics["ml/modality/MR/micro/P_at_1_ci_low"] = result.metrics["ml/modality/MR/micro/P_at_1_ci_high"] = (
        np.nan
    )
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(summary_table(result, [2, 1], "the title"))
    text = console.export_text()
    header = [line for line in text.splitlines() if line.startswith("┃")]
    assert [c.strip() for c in header[0].split("┃")[1:-1]] == ["subset", "P@1", "P@2", "mAP@2", "nDCG@2", "R-prec"]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    d = 1 / np.log2(3)
    ndcg = (0.5 / (1 + 0.5 * d) + 0.5 * d / (1 + 0.5 * d) + d) / 3
    ndcg_macro = (0.5 / (1 + 0.5 * d) + (0.5 / (1 + 0.5 * d) + 0.5 * d / (1 + 0.5 * d)) / 2 + d) / 3
    # micro P@1 with its interval, its macro on the next line; the rest micro/macro
    assert cells[0] == [
        "all queries",
        "0.333 [0.05, 0.75]",
        "0.333/0.333",
        "0.417/0.458",
        f"{ndcg:.3f}/{ndcg_macro:.3f}",
        "0.333/0.333",
    ]
    assert cells[1] == ["", "0.500", "", "", "", ""]
    assert cells[2][:2] == ["CT", "0.000/0.000"] and cells[3] == ["MR", "-", "-/-", "-/-", "-/-", "-/-"]
    assert cells[4] == ["", "-", "", "", "", ""]  # MR's macro P@1 under its micro
    assert cells[5][:3] == ["XR", "0.500/0.750", "0.500/0.500"] and len(cells) == 6
    assert "the title" in text
    assert (
        "micro/macro over 3 queries (macro: over findings); relevant = shares a finding, nDCG gain = Jaccard"
        in " ".join(text.split())
    )


def test_report_table_lists_the_runs_with_multilabel_metrics():
    runs = pd.DataFrame(
        {
            "encoder": ["b", "a", "c"],
            "ml/micro/P_at_1": [0.5, 0.25, np.nan],
            "ml/micro/P_at_10": [0.4, 0.2, np.nan],
            "ml/macro/P_at_1": [0.3, 0.1, np.nan],
            "ml/macro/P_at_10": [0.35, 0.15, np.nan],
            "ml/micro/mAP_at_10": [0.6, 0.7, np.nan],
            "ml/micro/nDCG_at_10": [0.8, 0.9, np.nan],
            "ml/micro/R_precision": [0.45, 0.55, np.nan],
            "ml/micro/mAP_at_1": [0.0, 0.0, np.nan],  # not at the largest N: not shown
            "ml/micro/P_at_1_ci_low": [0.4, 0.2, np.nan],
            "ml/micro/P_at_1_ci_high": [0.6, 0.3, np.nan],
            "micro/P_at_1": [0.9, 0.8, 0.7],
        }
    )
    table = report_table(runs, [10, 1], lambda frame: [c for c in ("encoder", "dataset") if c in frame])
    assert list(table.columns) == [
        "encoder",
        "micro P@10",
        "micro P@1",
        "macro P@10",
        "macro P@1",
        "micro mAP@10",
        "micro nDCG@10",
        "micro R-precision",
        "micro P@1 low",
        "micro P@1 high",
    ]
    assert table["encoder"].tolist() == ["a", "b"] and list(table.index) == [0, 1]  # c has no ml/ metrics
    assert table.iloc[0].tolist()[1:] == [0.2, 0.25, 0.15, 0.1, 0.7, 0.9, 0.55, 0.2, 0.3]
    assert report_table(runs.drop(columns="ml/micro/P_at_1"), [1, 10], lambda frame: ["encoder"]).empty
    assert report_table(runs.iloc[2:], [1, 10], lambda frame: ["encoder"]).empty


def test_search_output_of_overlapping_splits_leaves_each_query_out_of_its_relevant_rows():
    """Queries that are index rows: the search removed them, and n_rel must not count them."""
    table = frame(["XR/chest/A", "XR/chest/A", "XR/chest/B", "XR/chest/B"])
    table["path"] = [f"{i}.png" for i in range(4)]
    setup = RetrievalSetup(index_rows=np.arange(4), query_rows=np.array([0, 2]))
    # row 0 (A) retrieves B, A, B; row 2 (B) retrieves A, B, A: each has one relevant row, ranked second
    search = SearchOutput(setup, None, np.zeros((2, 3)), np.array([[2, 1, 3], [0, 3, 1]]))
    m = evaluate_search(table, search, [1, 2]).metrics
    assert m["ml/micro/P_at_1"] == 0 and m["ml/micro/P_at_2"] == 0  # n = min(2, n_rel = 1) = 1
    assert m["ml/micro/R_precision"] == 0 and m["ml/micro/mAP_at_2"] == 0.5
    assert m["ml/micro/nDCG_at_2"] == pytest.approx(1 / np.log2(3))


def test_labels_mode_defaults_to_single():
    from omegaconf import OmegaConf

    assert labels_mode(OmegaConf.create({"dataset": {}})) == "single"
    assert labels_mode(OmegaConf.create({"dataset": {"labels": None}})) == "single"
    assert labels_mode(OmegaConf.create({"dataset": {"labels": "multi"}})) == "multi"


def test_a_query_set_the_index_lacks_numbered_last():
    """Distinct sets are numbered queries first: here the highest number belongs to no index row."""
    index, query = frame(["XR/chest/A", "XR/chest/A"]), frame(["XR/chest/A", "XR/chest/B"])
    result = evaluate_multilabel(query, index, np.array([[0, 1], [0, 1]]), ns=[1])
    assert result.per_query["P_at_1"][0] == 1 and np.isnan(result.per_query["P_at_1"][1])
    assert result.per_finding["n_index"].tolist() == [2] and result.n_excluded == 1


def test_a_finding_name_with_a_slash_keeps_modality_and_anatomy():
    index, query = frame(["XR/chest/A/B", "XR/chest/C"]), frame(["XR/chest/A/B"])
    table = evaluate_multilabel(query, index, np.array([[0, 1]]), ns=[1]).per_finding
    assert table[["finding", "modality", "anatomy"]].values.tolist() == [["XR/chest/A/B", "XR", "chest"]]
