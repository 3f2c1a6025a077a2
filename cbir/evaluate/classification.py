"""Classification metrics shared by the k-NN classification and the linear probe (SPEC section 9).

Inputs: `truth` (Q,) class codes 0..C-1 and `probabilities` (Q, C), one column per class of the
training split (the index). As the study computes them with scikit-learn:

- micro / macro ROC-AUC: one-vs-rest on the probability matrix against the one-hot truth.
  micro pools every (query, class) cell; macro averages the per-class AUCs. A class without
  test queries has no AUC (every cell is negative), so macro leaves it out (the study's call
  would fail there); the number of classes averaged is logged as `roc_auc_classes`.
- micro / macro F1, macro precision, macro recall, accuracy: on the arg-max of the probabilities
  against the true class. Macro averages run over the classes that occur in the truth or the
  prediction (scikit-learn's default); a class never predicted scores 0 precision.
- The arg-max takes the first class in class order when several tie: sorted names, or the split
  CSV's class columns with dataset=study_splits (cbir.evaluate.knn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)

METRICS = ("micro_roc_auc", "macro_roc_auc", "micro_f1", "macro_f1", "macro_precision", "macro_recall", "accuracy")
LABELS = {
    "micro_roc_auc": "micro ROC-AUC",
    "macro_roc_auc": "macro ROC-AUC",
    "micro_f1": "micro F1",
    "macro_f1": "macro F1",
    "macro_precision": "macro precision",
    "macro_recall": "macro recall",
    "accuracy": "accuracy",
}  # as tables show them


def one_hot(codes: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(codes), n_classes), dtype=np.int8)
    out[np.arange(len(codes)), codes] = 1
    return out


def predicted(probabilities: np.ndarray) -> np.ndarray:
    """Arg-max class per row, the first (lowest code) on ties."""
    return np.asarray(probabilities).argmax(axis=1)


def scores(truth: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """The seven metrics of one set of queries (NaN where undefined, e.g. no queries)."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(truth) == 0:
        return {**{name: float("nan") for name in METRICS}, "roc_auc_classes": 0}
    n_classes = probabilities.shape[1]
    y_true = one_hot(truth, n_classes)
    y_pred = predicted(probabilities)
    present = np.flatnonzero(y_true.any(axis=0) & ~y_true.all(axis=0))  # classes with both outcomes
    out = {
        "micro_roc_auc": roc_auc_score(y_true, probabilities, average="micro") if n_classes > 1 else float("nan"),
        "macro_roc_auc": (
            roc_auc_score(y_true[:, present], probabilities[:, present], average="macro")
            if len(present)
            else float("nan")
        ),
        "micro_f1": f1_score(truth, y_pred, average="micro"),
        "macro_f1": f1_score(truth, y_pred, average="macro", zero_division=0),
        "macro_precision": precision_score(truth, y_pred, average="macro", zero_division=0),
        "macro_recall": recall_score(truth, y_pred, average="macro", zero_division=0),
        "accuracy": accuracy_score(truth, y_pred),
        "roc_auc_classes": len(present),
    }
    return {k: float(v) for k, v in out.items()}


@dataclass
class ClassificationResult:
    metrics: dict[str, float]  # overall and per modality (`modality/<M>/<metric>`), no task prefix
    per_class: pd.DataFrame  # class, queries, train_rows, precision, recall, f1, most_confused_with
    confusion: pd.DataFrame  # long form: true, predicted, count (non-zero cells only)


def evaluate(
    truth: np.ndarray, probabilities: np.ndarray, classes, modality=None, train_counts=None
) -> ClassificationResult:
    """Metrics over all queries, per modality of the query (full-class matching, columns of
    every class), the per-class table and the confusion table."""
    classes = [str(c) for c in classes]
    truth = np.asarray(truth, dtype=np.int64)
    metrics = scores(truth, probabilities)
    if modality is not None:
        modality = np.asarray(modality).astype(str)
        for mod in sorted(set(modality)):
            rows = modality == mod
            metrics.update(
                {f"modality/{mod}/{k}": v for k, v in scores(truth[rows], probabilities[rows]).items() if k in METRICS}
            )
    y_pred = predicted(probabilities)
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(truth, y_pred, labels=labels, zero_division=0)
    matrix = confusion_matrix(truth, y_pred, labels=labels)
    off_diagonal = matrix - np.diag(np.diag(matrix))
    confused = np.where(off_diagonal.max(axis=1) > 0, off_diagonal.argmax(axis=1), -1)
    per_class = pd.DataFrame(
        {
            "class": classes,
            "queries": support,
            "train_rows": np.zeros(len(classes), dtype=int) if train_counts is None else np.asarray(train_counts),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "most_confused_with": [classes[c] if c >= 0 else "" for c in confused],
        }
    )
    true_idx, pred_idx = np.nonzero(matrix)
    confusion = pd.DataFrame(
        {
            "true": np.asarray(classes)[true_idx],
            "predicted": np.asarray(classes)[pred_idx],
            "count": matrix[true_idx, pred_idx],
        }
    )
    return ClassificationResult(metrics=metrics, per_class=per_class, confusion=confusion)
