"""The `task` config group: which evaluations a run performs on its embeddings.

`retrieval` (modified P@N, the default), `knn_classification`, `linear_probe`, or `all` (the three
in one job: the k-NN classification then reuses the retrieval index and its test neighbours).
The classification tasks use the index rows (index.split, at most index.per_class per class) for
training, task.*.val_split for choosing k / the best epoch, and eval.query_split as the test split.
Queries whose class has no training row cannot be classified: they are left out and counted.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from rich.table import Table

from cbir.common.errors import ConfigError, DataError
from cbir.evaluate import knn, per_query
from cbir.evaluate.outcome import Outcome

if TYPE_CHECKING:  # imported where used: scikit-learn takes seconds to import
    from cbir.evaluate import classification

log = logging.getLogger(__name__)
EVALUATIONS = ("retrieval", "knn_classification", "linear_probe", "text_retrieval", "zero_shot")


def task_name(cfg: DictConfig) -> str:
    return str(cfg.task.name) if cfg.get("task") is not None else "retrieval"


def evaluations(cfg: DictConfig) -> list[str]:
    task = cfg.get("task")
    return list(task.evaluations) if task is not None else ["retrieval"]


def check_config(cfg: DictConfig) -> None:
    names = evaluations(cfg)
    unknown = sorted(set(names) - set(EVALUATIONS))
    if unknown or not names:
        raise ConfigError(f"task.evaluations={names}: unknown {unknown}; use some of {list(EVALUATIONS)}")
    if "knn_classification" in names:
        k = cfg.task.knn
        if k.mode not in knn.MODES:
            raise ConfigError(f"task.knn.mode={k.mode}: use one of {list(knn.MODES)}")
        for key in ("k", "k_max"):
            if int(k[key]) < 1:
                raise ConfigError(f"task.knn.{key}={k[key]}: must be a positive integer")
    if "linear_probe" in names:
        p = cfg.task.probe
        for key in ("batch_size", "max_epochs", "patience"):
            if int(p[key]) < 1:
                raise ConfigError(f"task.probe.{key}={p[key]}: must be a positive integer")
        if float(p.lr) <= 0:
            raise ConfigError(f"task.probe.lr={p.lr}: must be positive")
    if {"text_retrieval", "zero_shot"} & set(names):
        from cbir.evaluate import text as text_tasks

        text_tasks.check_config(cfg)


def check_data(cfg: DictConfig, table: pd.DataFrame, source: str) -> None:
    """Before extraction: a training split exists, k fits the index, the probe has two classes."""
    from cbir.evaluate.retrieval import per_class_value

    names = [n for n in evaluations(cfg) if n != "retrieval"]
    if not names:
        return
    split = cfg.index.split
    counts = table.loc[table["split"] == split, "label"].value_counts()
    if counts.empty:
        raise DataError(
            f"task={task_name(cfg)}: {source} has no '{split}' rows to train on (index.split={split}; "
            f"its splits are {sorted(table['split'].unique())}); use a dataset with a {split} split"
        )
    cap = per_class_value(cfg.index.per_class)
    size = int(np.minimum(counts.to_numpy(), cap).sum()) if cap else int(counts.sum())
    if "knn_classification" in names:
        key = "k_max" if cfg.task.knn.select_k else "k"
        if int(cfg.task.knn[key]) > size:
            raise ConfigError(
                f"task.knn.{key}={cfg.task.knn[key]}: k is larger than the index ({size} rows of "
                f"split {split}); lower task.knn.{key} or raise index.per_class"
            )
    if "linear_probe" in names and len(counts) < 2:
        raise DataError(
            f"task=linear_probe: {source} has a single class ({counts.index[0]}) in split {split}; "
            "a classifier needs at least two"
        )


@dataclass
class TaskOutput:
    prefix: str  # MLflow metric prefix: knn | probe
    result: classification.ClassificationResult
    counts: dict[str, float]  # k or best epoch, queries, excluded queries, ...
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # stepped values (k on val, epochs)
    step: str = ""  # the history column used as MLflow step
    records: pd.DataFrame = field(default_factory=pd.DataFrame)  # per test query (cbir.evaluate.per_query)
    truth: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # for the intervals
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    modality: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))


def class_codes(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Position of each label in the sorted `classes`, -1 for a label not among them."""
    pos = np.clip(np.searchsorted(classes, labels), 0, max(len(classes) - 1, 0))
    return np.where((len(classes) > 0) & (classes[pos] == labels), pos, -1)


def split_rows(table: pd.DataFrame, valid: np.ndarray, split: str) -> np.ndarray:
    return np.flatnonzero((table["split"].to_numpy() == split) & np.asarray(valid, dtype=bool))


def index_of_job(cfg, table, embeddings, valid, search):
    """(setup, index) of the job's retrieval search when it ran one; otherwise the same rows and
    index type built here (a task without retrieval: k-NN, probe or text tasks alone)."""
    from cbir.evaluate import index as cbir_index
    from cbir.evaluate import retrieval

    if search is not None:
        return search.setup, search.index
    setup = retrieval.rows_of_job(cfg, table, valid, retrieval.per_class_value(cfg.index.per_class))
    index = cbir_index.build_index(
        cbir_index.l2_normalise(embeddings[setup.index_rows]),
        cfg.index.type,
        cfg.index.get("use_gpu", "auto"),
        dict(cfg.index.get("params") or {}),
    )
    return setup, index


def run_knn(cfg: DictConfig, table: pd.DataFrame, embeddings: np.ndarray, valid: np.ndarray, search=None) -> TaskOutput:
    """k-NN classification; `search` (a retrieval SearchOutput of the same index) saves the index
    build and the test search."""
    from cbir.evaluate import classification, retrieval
    from cbir.evaluate import index as cbir_index

    kc = cfg.task.knn
    setup, index = index_of_job(cfg, table, embeddings, valid, search)
    labels = table["label"].astype(str).to_numpy()
    classes, index_codes = np.unique(labels[setup.index_rows], return_inverse=True)
    sorted_classes, rank = classes, np.arange(len(classes))
    if (order := study_class_order(cfg)) is not None:  # ties as the study's arg-max breaks them
        classes, rank = knn.in_column_order(classes, order)
        index_codes = rank[index_codes]
    n_index = np.bincount(index_codes, minlength=len(classes))

    def neighbours(rows: np.ndarray, k: int):
        """Class codes of the first k neighbours, true codes and n_c of the `rows` whose class has
        an index row (other than themselves), and the mask of those rows."""
        own = retrieval.own_positions(setup.index_rows, rows)
        if search is not None and k <= search.neighbours.shape[1] and np.array_equal(rows, setup.query_rows):
            found = search.neighbours[:, :k]
        else:
            queries = cbir_index.l2_normalise(embeddings[rows])
            found = cbir_index.search(index, queries, k, int(cfg.eval.search_batch_size), exclude=own)[1]
        truth = class_codes(labels[rows], sorted_classes)
        truth = np.where(truth >= 0, rank[np.clip(truth, 0, None)], -1)
        n_relevant = np.where(truth >= 0, n_index[np.clip(truth, 0, None)] - (own >= 0), 0)
        keep = n_relevant > 0
        return knn.neighbour_codes(index_codes, found[keep]), truth[keep], n_relevant[keep], keep

    val_rows = split_rows(table, valid, kc.val_split)
    history, k, n_val = pd.DataFrame(), int(kc.k), 0
    if kc.select_k and len(val_rows):
        codes, truth, n_rel, _ = neighbours(val_rows, int(kc.k_max))
        n_val = len(truth)
        if n_val:
            k, history = knn.choose_k(truth, knn.predictions_by_k(codes, n_rel, int(kc.k_max), len(classes), kc.mode))
            log.info(
                "k-NN: k=%d chosen on %d %s queries (best micro-F1 over k=1..%d)", k, n_val, kc.val_split, kc.k_max
            )
        else:
            log.warning("k-NN: no '%s' query has a class in the index; using task.knn.k=%d", kc.val_split, k)
    elif kc.select_k:
        log.warning("k-NN: the dataset has no '%s' split to choose k on; using task.knn.k=%d", kc.val_split, k)
    test_rows = setup.query_rows
    codes, truth, n_rel, keep = neighbours(test_rows, k)
    probabilities = knn.probabilities(codes, n_rel, k, len(classes), kc.mode)
    result = classification.evaluate(
        truth, probabilities, classes, table["modality"].to_numpy()[test_rows[keep]], n_index
    )
    counts = {
        "k": k,
        "queries": len(truth),
        "excluded_queries": int((~keep).sum()),
        "val_queries": n_val,
        "train_rows": len(setup.index_rows),
        "classes": len(classes),
    }
    return TaskOutput(
        "knn",
        result,
        counts,
        history,
        "k",
        per_query.classification_records("knn", test_rows[keep], truth, probabilities, classes),
        truth,
        probabilities,
        table["modality"].to_numpy()[test_rows[keep]],
    )


def study_class_order(cfg: DictConfig) -> list[str] | None:
    """With `dataset=study_splits`, the class columns of its split CSVs (the study's tie order)."""
    dataset = cfg.get("dataset")
    if dataset is None or not str(dataset.get("_target_", "")).endswith("StudySplitsDataset"):
        return None
    from cbir.data.study_splits import StudySplitsDataset
    from cbir.study.format import class_columns

    return class_columns(StudySplitsDataset._find_files(dataset.get("files"), dataset.get("dir")))


def run_probe(cfg: DictConfig, table: pd.DataFrame, embeddings: np.ndarray, valid: np.ndarray) -> TaskOutput:
    from cbir.evaluate import classification, probe, retrieval

    pc = cfg.task.probe
    train_rows = retrieval.rows_of_job(cfg, table, valid, retrieval.per_class_value(cfg.index.per_class)).index_rows
    labels = table["label"].astype(str).to_numpy()
    classes, train_codes = np.unique(labels[train_rows], return_inverse=True)

    def known(split: str):
        rows = split_rows(table, valid, split)
        codes = class_codes(labels[rows], classes)
        return rows[codes >= 0], codes[codes >= 0], int((codes < 0).sum())

    val_rows, val_codes, _ = known(pc.val_split)
    if not len(val_rows):
        log.warning(
            "linear probe: no '%s' rows to select the epoch on; keeping the last of %d epochs",
            pc.val_split,
            pc.max_epochs,
        )
    started = time.perf_counter()
    module, history, epoch = probe.fit(
        embeddings,
        (train_rows, train_codes),
        (val_rows, val_codes) if len(val_rows) else None,
        len(classes),
        pc,
        int(cfg.seed),
    )
    test_rows, test_codes, excluded = known(cfg.eval.query_split)
    probabilities = probe.predict(module, embeddings, test_rows, normalise=bool(pc.get("normalise", True)))
    result = classification.evaluate(
        test_codes,
        probabilities,
        classes,
        table["modality"].to_numpy()[test_rows],
        np.bincount(train_codes, minlength=len(classes)),
    )
    counts = {
        "best_epoch": epoch,
        "epochs": len(history),
        "fit_seconds": round(time.perf_counter() - started, 2),
        "queries": len(test_rows),
        "excluded_queries": excluded,
        "val_queries": len(val_rows),
        "train_rows": len(train_rows),
        "classes": len(classes),
    }
    return TaskOutput(
        "probe",
        result,
        counts,
        history,
        "epoch",
        per_query.classification_records("probe", test_rows, test_codes, probabilities, classes),
        test_codes,
        probabilities,
        table["modality"].to_numpy()[test_rows],
    )


def add_intervals(output: TaskOutput, cfg: DictConfig) -> TaskOutput:
    """Bootstrap intervals (eval.ci) beside the metrics of a task with per-query probabilities."""
    from cbir.evaluate import uncertainty

    resamples, level, seed = per_query.ci_settings(cfg)
    output.result.metrics.update(
        uncertainty.classification_intervals(
            output.truth, output.probabilities, resamples, level, seed, output.modality
        )
    )
    return output


def outcome(output: TaskOutput, out: Path, title: str) -> Outcome:
    """The outcome of one classification task: its files written into `out`, its metrics and
    counts under its prefix, its history (k on val, or the probe's epochs) as step series."""
    p = output.prefix
    steps = []
    for row in output.history.to_dict("records"):
        stage_values = {k: v for k, v in row.items() if k != output.step}
        # probe: train_loss -> probe/train/loss; knn: micro_f1 (on val) -> knn/val/micro_f1
        names = {k: k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else f"val/{k}" for k in stage_values}
        steps.append((int(row[output.step]), {f"{p}/{names[k]}": v for k, v in stage_values.items()}))
    return Outcome(
        output.prefix,
        metrics={f"{p}/{k}": v for k, v in {**output.result.metrics, **output.counts}.items()},
        steps=steps,
        files=write_files(output, out),
        tables=[(summary_table(output, title), 140)],
    )


def write_files(output: TaskOutput, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    p = output.prefix
    files = {
        f"{p}_metrics": out / f"{p}_metrics.json",
        f"{p}_per_class": out / f"{p}_per_class.csv",
        f"{p}_confusion": out / f"{p}_confusion.csv",
    }
    files[f"{p}_metrics"].write_text(json.dumps({"metrics": output.result.metrics, **output.counts}, indent=1))
    per_query.add_shown(files[f"{p}_metrics"])
    output.result.per_class.to_csv(files[f"{p}_per_class"], index=False)
    output.result.confusion.to_csv(files[f"{p}_confusion"], index=False)
    if len(output.history):
        files[f"{p}_history"] = out / f"{p}_{'val_k' if output.step == 'k' else 'epochs'}.csv"
        output.history.to_csv(files[f"{p}_history"], index=False)
    return files


def summary_table(output: TaskOutput, title: str) -> Table:
    """Rows: all test queries and each modality; columns: the metrics."""
    from cbir.evaluate import classification, uncertainty

    m, c = output.result.metrics, output.counts
    chosen = (
        f"k={c['k']}"
        if "k" in c
        else f"best epoch {c['best_epoch'] + 1} of {c['epochs']}"
        if "best_epoch" in c
        else f"{c.get('prompts_per_class', 0)} prompts per class"
    )
    table = Table(
        title=title,
        caption=f"µ micro, M macro; {c['queries']} test queries, {c['excluded_queries']} excluded "
        f"(class not in the training split); {chosen}",
    )
    table.add_column("subset")
    short = {
        "micro_roc_auc": "AUC µ",
        "macro_roc_auc": "AUC M",
        "micro_f1": "F1 µ",
        "macro_f1": "F1 M",
        "macro_precision": "prec M",
        "macro_recall": "rec M",
        "accuracy": "acc",
    }
    for name in classification.METRICS:
        table.add_column(short[name], justify="center")
    modalities = sorted({k.split("/")[1] for k in m if k.startswith("modality/")})
    for label, prefix in [("all queries", "")] + [(f"  {mod}", f"modality/{mod}/") for mod in modalities]:
        table.add_row(label, *[uncertainty.with_interval(m, prefix + name) for name in classification.METRICS])
    return table
