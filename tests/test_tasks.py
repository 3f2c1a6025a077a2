"""k-NN classification and linear probe as run on a manifest and its embeddings: compared with
a brute-force recomputation, the probe's epoch selection, the up-front errors."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn import metrics as skm
from test_classification import study_evaluate

from cbir.evaluate import classification, probe, retrieval, tasks
from cbir.job.checks import ConfigError, DataError


def make_cfg(**task):
    return OmegaConf.create(
        {
            "seed": 0,
            "index": {"type": "flat", "per_class": None, "split": "train", "seed": 0, "use_gpu": False, "params": {}},
            "eval": {"query_split": "test", "search_batch_size": 7, "n": [1], "curve_k": 0, "levels": []},
            "task": {
                "name": "all",
                "evaluations": ["retrieval", "knn_classification", "linear_probe"],
                "knn": {
                    "mode": "study",
                    "select_k": True,
                    "k_max": 9,
                    "k": 3,
                    "val_split": "val",
                    **task.get("knn", {}),
                },
                "probe": {
                    "lr": 0.05,
                    "weight_decay": 0.01,
                    "batch_size": 16,
                    "max_epochs": 30,
                    "patience": 5,
                    "init_std": 0.01,
                    "normalise": True,
                    "accelerator": "cpu",
                    "val_split": "val",
                    "cpu_threads": 1,
                    **task.get("probe", {}),
                },
            },
        }
    )


def make_data(seed=0, dim=6, val=True):
    """Train classes A, B, C; val has no C; test has A, B, C and D (absent from the index)."""
    rng = np.random.default_rng(seed)
    centres = {c: rng.normal(size=dim) for c in "ABCD"}
    rows = []
    for split, per_class in (
        ("train", {"A": 12, "B": 8, "C": 5}),
        ("val", {"A": 5, "B": 4}),
        ("test", {"A": 6, "B": 5, "C": 4, "D": 3}),
    ):
        if split == "val" and not val:
            continue
        for c, n in per_class.items():
            rows += [{"split": split, "label": f"XR/chest/{c}", "modality": "XR" if c in "AB" else "CT"}] * n
    table = pd.DataFrame(rows)
    table["path"] = [f"img{i}.png" for i in range(len(table))]
    table["anatomy"] = "chest"
    embeddings = np.stack([centres[label[-1]] for label in table["label"]]) + 1.2 * rng.normal(size=(len(table), dim))
    return table, embeddings.astype(np.float32), np.ones(len(table), dtype=bool)


def brute_force_knn(table, embeddings, k_max, mode="study"):
    """Expected k and test metrics: cosine similarities sorted by hand, votes counted by hand."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    train = np.flatnonzero(table["split"] == "train")
    classes = sorted(table.loc[train, "label"].unique())
    train_labels = table["label"].to_numpy()[train]

    def probabilities(rows, k):
        out, truth = [], []
        for q in rows:
            label = table["label"][q]
            if label not in classes:
                continue
            order = sorted(range(len(train)), key=lambda i: (-float(unit[q] @ unit[train[i]]), i))
            n = min(k, int((train_labels == label).sum())) if mode == "study" else k
            votes = [train_labels[i] for i in order[:n]]
            out.append([votes.count(c) / n for c in classes])
            truth.append(classes.index(label))
        return np.array(truth), np.array(out)

    val = np.flatnonzero(table["split"] == "val")
    f1 = []
    for k in range(1, k_max + 1):
        truth, probs = probabilities(val, k)
        f1.append(skm.f1_score(truth, probs.argmax(1), average="micro"))
    best = int(np.argmax(f1)) + 1
    truth, probs = probabilities(np.flatnonzero(table["split"] == "test"), best)
    return best, study_evaluate(np.eye(len(classes))[truth], probs)


@pytest.mark.parametrize("mode", ["study", "plain"])
def test_knn_matches_a_brute_force_recomputation(mode):
    table, embeddings, valid = make_data()
    out = tasks.run_knn(make_cfg(knn={"mode": mode}), table, embeddings, valid)
    best, expected = brute_force_knn(table, embeddings, 9, mode)
    assert out.counts["k"] == best
    for name in classification.METRICS:
        assert out.result.metrics[name] == pytest.approx(expected[name]), name
    # the D queries (class absent from the index) are left out and counted; C has no val query
    assert out.counts["excluded_queries"] == 3 and out.counts["queries"] == 15 and out.counts["val_queries"] == 9
    assert out.history["k"].tolist() == list(range(1, 10))
    assert set(out.result.per_class["class"]) == {"XR/chest/A", "XR/chest/B", "XR/chest/C"}
    assert "modality/CT/accuracy" in out.result.metrics


def test_knn_reuses_the_retrieval_search_with_the_same_result():
    table, embeddings, valid = make_data(seed=3)
    cfg = make_cfg()
    setup = retrieval.choose_rows(table, valid, "train", "test", None, 0)
    _, search = retrieval.run_retrieval(table, embeddings, setup, cfg.index, [1, 3], 20, [], 7, return_search=True)
    shared = tasks.run_knn(cfg, table, embeddings, valid, search)
    alone = tasks.run_knn(cfg, table, embeddings, valid)
    np.testing.assert_equal(shared.result.metrics, alone.result.metrics)  # NaN == NaN here
    assert shared.counts == alone.counts


def test_knn_without_a_val_split_says_so_and_takes_k_from_the_config(caplog):
    table, embeddings, valid = make_data(val=False)
    with caplog.at_level(logging.WARNING):
        out = tasks.run_knn(make_cfg(knn={"k": 4}), table, embeddings, valid)
    assert out.counts["k"] == 4 and out.history.empty
    assert "no 'val' split" in caplog.text and "task.knn.k=4" in caplog.text
    # val rows exist, but none of a class in the index
    table, embeddings, valid = make_data()
    table.loc[table["split"] == "val", "label"] = "XR/chest/E"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = tasks.run_knn(make_cfg(knn={"k": 2}), table, embeddings, valid)
    assert out.counts["k"] == 2 and out.counts["val_queries"] == 0 and "task.knn.k=2" in caplog.text


def test_probe_restores_the_torch_settings_it_changes():
    import torch

    table, embeddings, valid = make_data()
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    tasks.run_probe(make_cfg(probe={"max_epochs": 1}), table, embeddings, valid)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_probe_keeps_the_best_val_epoch_stops_on_patience_and_is_deterministic():
    table, embeddings, valid = make_data()
    cfg = make_cfg(probe={"max_epochs": 200, "patience": 4})
    first = tasks.run_probe(cfg, table, embeddings, valid)
    second = tasks.run_probe(cfg, table, embeddings, valid)
    history = first.history
    pd.testing.assert_frame_equal(history, second.history)
    np.testing.assert_equal(first.result.metrics, second.result.metrics)
    assert list(history.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    best = int(np.argmax(history["val_acc"].to_numpy()))  # first maximum: later ties do not win
    assert first.counts["best_epoch"] == best
    assert len(history) == best + 4 + 1 < 200  # stopped 4 epochs without a better val accuracy
    assert first.counts["excluded_queries"] == 3 and first.counts["queries"] == 15


def test_probe_test_metrics_come_from_the_selected_weights():
    table, embeddings, _ = make_data(seed=1)
    cfg = make_cfg(probe={"max_epochs": 60, "patience": 60}).task.probe
    train = np.flatnonzero(table["split"] == "train")
    classes, codes = np.unique(table["label"].to_numpy()[train], return_inverse=True)
    val = np.flatnonzero(table["split"] == "val")
    val_codes = np.searchsorted(classes, table["label"].to_numpy()[val])
    module, history, epoch = probe.fit(embeddings, (train, codes), (val, val_codes), len(classes), cfg, seed=0)
    probabilities = probe.predict(module, embeddings, val)
    assert probabilities.sum(1) == pytest.approx(np.ones(len(val)), abs=1e-5)
    assert (probabilities.argmax(1) == val_codes).mean() == pytest.approx(history["val_acc"][epoch])
    # separable enough to learn: training accuracy far above chance
    assert history["train_acc"].max() > 0.8


def test_probe_without_val_keeps_the_last_epoch():
    table, embeddings, valid = make_data(val=False)
    out = tasks.run_probe(make_cfg(probe={"max_epochs": 3}), table, embeddings, valid)
    assert out.counts["best_epoch"] == 2 and out.counts["epochs"] == 3
    assert out.history["val_acc"].isna().all() if "val_acc" in out.history else True


def test_errors_before_any_work():
    table = make_data()[0]
    cfg = make_cfg()
    tasks.check_config(cfg)
    tasks.check_data(cfg, table, "hand.csv")
    with pytest.raises(DataError, match=r"task=all: hand.csv has no 'train' rows to train on"):
        tasks.check_data(cfg, table[table["split"] != "train"], "hand.csv")
    with pytest.raises(ConfigError, match=r"task.knn.k_max=30: k is larger than the index \(25 rows"):
        tasks.check_data(make_cfg(knn={"k_max": 30}), table, "hand.csv")
    with pytest.raises(ConfigError, match=r"task.knn.k=26"):
        tasks.check_data(make_cfg(knn={"select_k": False, "k": 26}), table, "hand.csv")
    one_class = table[(table["label"] == "XR/chest/A") | (table["split"] != "train")]
    with pytest.raises(DataError, match=r"single class \(XR/chest/A\)"):
        tasks.check_data(make_cfg(), one_class, "hand.csv")
    with pytest.raises(ConfigError, match=r"task.evaluations=\['knn'\]"):
        tasks.check_config(OmegaConf.merge(cfg, {"task": {"evaluations": ["knn"]}}))
    with pytest.raises(ConfigError, match="task.knn.mode=vote"):
        tasks.check_config(make_cfg(knn={"mode": "vote"}))


def test_report_tables_keep_each_task_to_its_own_table():
    from cbir.report import from_runs as report

    runs = pd.DataFrame(
        [
            {
                "encoder": "a",
                "dataset": "d",
                "index_type": "flat",
                "per_class": "all",
                "task": "retrieval",
                "micro/P_at_1": 0.5,
                "macro/P_at_1": 0.4,
            },
            {
                "encoder": "a",
                "dataset": "d",
                "index_type": "flat",
                "per_class": "all",
                "task": "knn_classification",
                "knn/accuracy": 0.7,
                "knn/macro_f1": 0.6,
                "knn/k": 5.0,
                "knn/modality/CT/accuracy": 0.8,
            },
            {
                "encoder": "b",
                "dataset": "d",
                "index_type": "flat",
                "per_class": "all",
                "task": "knn_classification",
                "knn/accuracy": 0.2,
                "knn/macro_f1": 0.1,
                "knn/k": 9.0,
                "knn/modality/CT/accuracy": 0.3,
            },
        ]
    )
    assert report.table1(runs, [1])["encoder"].tolist() == ["a"]
    knn = report.classification_table(runs, "knn")
    assert knn["encoder"].tolist() == ["a", "b"] and knn["k"].tolist() == [5, 9]
    assert knn["macro F1"].tolist() == [0.6, 0.1] and "task" not in knn  # the same task in every row
    assert report.classification_table(runs, "probe").empty
    per_modality = report.classification_per_modality(runs, "knn")
    assert per_modality[["encoder", "modality", "accuracy"]].values.tolist() == [["a", "CT", 0.8], ["b", "CT", 0.3]]
