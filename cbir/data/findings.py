"""Finding sets of multi-label manifests (`dataset.labels=multi`).

In multi mode a manifest keeps every image with its set of findings: the `findings` column
holds the finding names (without modality/anatomy) sorted and joined by `|`, e.g.
`Edema|Pleural Effusion`, and `label` is `<MODALITY>/<anatomy>/<findings>` (the exact set,
e.g. `XR/chest/Edema|Pleural Effusion`), so that everything keyed by `label` (index subset
per class, per-class table, class counts) works per finding combination. An image with one
finding has the same `label` as in single mode. Single mode writes no `findings` column; a
row without findings (single-label data, or RadImageNet inside the combined set) has the one
finding of its `label`.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from cbir.data.manifest import ManifestError, class_name

LABEL_MODES = ("single", "multi")
SEPARATOR = "|"


def check_labels_mode(value: str) -> str:
    if value not in LABEL_MODES:
        raise ManifestError(
            f"dataset.labels={value!r}: choose one of {list(LABEL_MODES)} "
            "(single: the study's single-finding images; multi: every image with its findings)"
        )
    return value


def join_findings(findings: Iterable[str]) -> str:
    """The canonical `findings` cell: unique names, sorted, joined by `|`."""
    return SEPARATOR.join(sorted({str(f).strip() for f in findings if str(f).strip()}))


def multi_label(modality: str, anatomy: str, findings: Iterable[str]) -> str:
    return class_name(modality, anatomy, join_findings(findings))


def label_columns(modality: str, anatomy: str, finding_lists, labels: str) -> dict[str, list[str]]:
    """`label` (and in multi mode `findings`) of rows with these findings."""
    lists = [list(f) for f in finding_lists]
    if labels == "single":
        return {"label": [class_name(modality, anatomy, f[0]) for f in lists]}
    return {"label": [multi_label(modality, anatomy, f) for f in lists], "findings": [join_findings(f) for f in lists]}


def positive_lists(positive: pd.DataFrame) -> pd.Series:
    """Column names holding True, per row, of a boolean frame (one finding column each)."""
    joined = positive.astype(int).dot(pd.Index([f"{c}{SEPARATOR}" for c in positive.columns]).astype(object))
    return joined.map(lambda cell: [f for f in str(cell).split(SEPARATOR) if f])


def row_findings(table: pd.DataFrame) -> pd.Series:
    """Each row's finding names (sorted list): the `findings` column where it is filled,
    else the finding part of `label` (`<MODALITY>/<anatomy>/<finding>`)."""
    from_label = table["label"].astype(str).str.split("/", n=2).str[2].fillna("")
    if "findings" in table.columns:
        given = table["findings"].fillna("").astype(str)
        cells = given.where(given.str.strip() != "", from_label)
    else:
        cells = from_label
    return cells.map(lambda cell: sorted({f.strip() for f in cell.split(SEPARATOR) if f.strip()}))


def fill_findings(table: pd.DataFrame) -> pd.DataFrame:
    """`findings` filled for every row (rows without one get their label's finding)."""
    return table.assign(findings=row_findings(table).map(join_findings))
