"""Retrieval gallery: a few queries with their top-k retrieved images, to look at the results.

One row per query: the query image, then its k neighbours, each captioned with its class and
cosine similarity; a neighbour's border is green when its class equals the query's, red when
not, grey when the query's class is unknown (an outside image given to `cbir.search`).
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

PANEL_INCHES = 1.6  # each image panel is a square of this size
CAPTION_INCHES = 0.42  # room under the panels of a row for two caption lines
TITLE_INCHES = 0.35
DPI = 80
CAPTION_POINTS = 9  # 10 px high at DPI: readable in the MLflow artifact viewer without zooming
CAPTION_CHARS = 22  # longer class names are shortened to fit under a panel
HIT, MISS, UNKNOWN = "#1a9e3a", "#d62728", "#888888"

log = logging.getLogger(__name__)


def figure_size(n_queries: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of a gallery of n_queries rows and k neighbours."""
    width = (k + 1) * PANEL_INCHES
    height = n_queries * (PANEL_INCHES + CAPTION_INCHES) + TITLE_INCHES
    return round(width * DPI), round(height * DPI)


def sample_queries(table: pd.DataFrame, query_rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to n positions into query_rows, taken round-robin over modalities (seeded), so
    every modality shows up even when one dominates the query split."""
    rng = np.random.default_rng(seed)
    modality = table["modality"].astype(str).to_numpy()[query_rows]
    pools = [rng.permutation(np.flatnonzero(modality == m)).tolist() for m in sorted(set(modality))]
    chosen: list[int] = []
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop(0))
    return np.asarray(chosen, dtype=np.int64)


def draw_gallery(
    table: pd.DataFrame,
    root: str | Path,
    query_rows,
    neighbour_rows,
    scores,
    path: str | Path,
    title: str | None = None,
    query_texts=None,
) -> Path:
    """Write the gallery PNG.

    table: manifest-like frame with `path` and `label` (relative paths resolve against root;
    absolute ones stay). query_rows: (Q,) positions into table; neighbour_rows: (Q, k)
    positions into table (-1 = none); scores: (Q, k) similarities. query_texts: text queries
    (cbir.search search.text), drawn as text in the query column; query_rows are then unused."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cbir.data.images import ImageLoadError, load_image

    query_rows = np.asarray(query_rows)
    neighbour_rows = np.atleast_2d(np.asarray(neighbour_rows))
    scores = np.atleast_2d(np.asarray(scores))
    n_queries, k = neighbour_rows.shape
    paths = table["path"].astype(str).to_numpy()
    labels = table["label"].fillna("").astype(str).to_numpy()
    root = Path(root)
    unreadable: dict[int, str] = {}

    def show(ax, row: int, caption: str, color: str | None) -> None:
        ax.set_xticks([])
        ax.set_yticks([])
        try:  # only regular files are opened: a FIFO among the rows is a panel saying so, not a hang
            image = load_image(root / paths[row])
            image.thumbnail((120, 120))
            ax.imshow(np.asarray(image), cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255)
        except ImageLoadError as e:
            unreadable[row] = str(e)
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=CAPTION_POINTS)
        ax.set_xlabel(caption, fontsize=CAPTION_POINTS, labelpad=2)
        for side in ax.spines.values():
            side.set_color(color or "black")
            side.set_linewidth(4 if color else 1)

    width, height = figure_size(n_queries, k)
    fig, axes = plt.subplots(n_queries, k + 1, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for q in range(n_queries):
        if query_texts is not None:  # a text query has no class: neighbours get no hit/miss colour
            query_label = ""
            axes[q, 0].axis("off")
            axes[q, 0].text(
                0.5,
                0.5,
                "QUERY\n" + textwrap.fill(str(query_texts[q]), 18),
                ha="center",
                va="center",
                fontsize=CAPTION_POINTS,
                transform=axes[q, 0].transAxes,
            )
        else:
            query_label = labels[query_rows[q]]
            show(axes[q, 0], query_rows[q], f"QUERY\n{_short(query_label or Path(paths[query_rows[q]]).name)}", None)
        for j in range(k):
            ax = axes[q, j + 1]
            row = neighbour_rows[q, j]
            if row < 0:
                ax.axis("off")
                continue
            color = UNKNOWN if not query_label else (HIT if labels[row] == query_label else MISS)
            show(ax, row, f"{_short(labels[row])}\n#{j + 1}  sim {scores[q, j]:.3f}", color)
    fig.suptitle(
        title or "query (left) and its nearest images; green = same class, red = other class",
        fontsize=CAPTION_POINTS + 1,
        y=1 - 0.06 / (height / DPI),
        va="top",
    )
    inches = height / DPI
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        top=1 - TITLE_INCHES / inches,
        bottom=CAPTION_INCHES / inches,
        wspace=0.06,
        hspace=CAPTION_INCHES / PANEL_INCHES,
    )
    if unreadable:
        log.warning(
            "gallery: %d image(s) shown as 'unreadable', e.g. %s", len(unreadable), next(iter(unreadable.values()))
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays figure_size()
    plt.close(fig)
    return path


def _short(text: str) -> str:
    return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "…"


def neighbour_table(table: pd.DataFrame, query_rows, neighbour_rows, scores) -> pd.DataFrame:
    """Long table: one line per (query, rank) with paths, classes and similarity."""
    rows = []
    for q, query in enumerate(np.asarray(query_rows)):
        for rank, (row, score) in enumerate(zip(neighbour_rows[q], scores[q]), start=1):
            if row < 0:
                continue
            rows.append(
                {
                    "query_path": table["path"].iat[query],
                    "query_label": table["label"].iat[query],
                    "rank": rank,
                    "path": table["path"].iat[row],
                    "label": table["label"].iat[row],
                    "similarity": float(score),
                }
            )
    return pd.DataFrame(rows)


def gallery_for_run(
    table: pd.DataFrame, root, search, n_queries: int, k: int, out_dir: Path, seed: int = 0, title: str | None = None
) -> dict[str, Path]:
    """gallery.png and gallery.csv of a run, from its search output (cbir.evaluate.retrieval.SearchOutput)."""
    setup = search.setup
    k = min(k, search.neighbours.shape[1])
    picked = sample_queries(table, setup.query_rows, n_queries, seed)
    if len(picked) == 0 or k == 0:
        return {}
    positions = search.neighbours[picked, :k]
    rows = np.where(positions >= 0, setup.index_rows[np.clip(positions, 0, None)], -1)
    queries = setup.query_rows[picked]
    scores = search.scores[picked, :k]
    out_dir = Path(out_dir)
    files = {
        "gallery_png": draw_gallery(table, root, queries, rows, scores, out_dir / "gallery.png", title),
        "gallery_csv": out_dir / "gallery.csv",
    }
    neighbour_table(table, queries, rows, scores).to_csv(files["gallery_csv"], index=False)
    return files
