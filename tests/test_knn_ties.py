"""k-NN ties with the study's splits: the study's arg-max over its CSV's class columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import compose

from cbir.data.study_splits import StudySplitsDataset
from cbir.evaluate import tasks
from cbir.study.format import write_split_csv

CSV_ORDER = [
    "XR/chest/No Finding",
    "XR/chest/Atelectasis",
    "XR/chest/Edema",
]  # not sorted by name


def study_csv(folder) -> tuple:
    """Two index rows of each class; one test query whose two nearest rows are one No Finding and
    one Atelectasis row at the same cosine (a 1-1 tie at k=2), and one clear Edema query."""
    rows = [
        ("train", "XR/chest/Atelectasis"),
        ("train", "XR/chest/No Finding"),
        ("train", "XR/chest/Edema"),
        ("train", "XR/chest/Atelectasis"),
        ("train", "XR/chest/No Finding"),
        ("train", "XR/chest/Edema"),
        ("test", "XR/chest/Atelectasis"),
        ("test", "XR/chest/Edema"),
    ]
    table = pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(len(rows))],
            "dataset": "nih14",
            "split": [s for s, _ in rows],
            "modality": "XR",
            "anatomy": "chest",
            "label": [c for _, c in rows],
        }
    )
    csv = write_split_csv(table, folder / "nih14.csv", classes=CSV_ORDER)
    e = np.eye(4, dtype=np.float32)
    embeddings = np.stack(
        [
            e[0] + e[1],
            e[0] - e[1],
            e[2],
            -e[0] + e[3],
            -e[0] - e[3],
            e[2] + 0.1 * e[3],
            e[0],
            e[2],
        ]
    )  # query 6 is equally close to rows 0 and 1
    return csv, embeddings


def study_argmax(csv, index_rows, neighbour_rows, k: int) -> str:
    """The study's rule: mean one-hot over the CSV's class columns of the first k neighbours, np.argmax."""
    onehot = pd.read_csv(csv)[CSV_ORDER].to_numpy(np.float64)
    votes = onehot[index_rows[neighbour_rows[:k]]].mean(axis=0)
    return CSV_ORDER[int(np.argmax(votes))]


def test_study_split_ties_go_to_the_first_csv_column(tmp_path):
    csv, embeddings = study_csv(tmp_path)
    cfg = compose(
        "dataset=study_splits",
        f"dataset.files=[{csv}]",
        f"dataset.root={tmp_path}",
        "dataset.missing=keep",
        "task=knn_classification",
        "task.knn.select_k=false",
        "task.knn.k=2",
        "task.knn.mode=plain",
    )
    table = StudySplitsDataset(tmp_path, files=[csv], missing="keep").load_manifest().table
    valid = np.ones(len(table), bool)
    output = tasks.run_knn(cfg, table, embeddings, valid)
    records = output.records.set_index("row")
    index_rows = np.flatnonzero(table["split"] == "train")
    similarity = embeddings[6] @ embeddings[index_rows].T / np.linalg.norm(embeddings[index_rows], axis=1)
    assert similarity[0] == similarity[1] and similarity[0] > np.sort(similarity)[-3]  # a real tie at k=2
    expected = study_argmax(csv, index_rows, np.array([0, 1]), 2)
    assert expected == "XR/chest/No Finding"  # sorted names would say Atelectasis
    assert records.loc[6, "knn_predicted"] == expected
    assert records.loc[7, "knn_predicted"] == "XR/chest/Edema"
    # elsewhere (any other dataset) the documented rule stays: first by sorted name
    other = compose(
        "task=knn_classification",
        "task.knn.select_k=false",
        "task.knn.k=2",
        "task.knn.mode=plain",
    )
    plain = tasks.run_knn(other, table, embeddings, valid).records.set_index("row")
    assert plain.loc[6, "knn_predicted"] == "XR/chest/Atelectasis"
