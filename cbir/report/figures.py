"""Figures and small numeric helpers shared by the experiment scripts (experiments/*.py).

Every plot function takes a tidy table and a path, writes a PNG and returns the path, so the
scripts only decide what to show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def grouped_bars(
    frame: pd.DataFrame,
    category: str,
    group: str,
    value: str,
    path,
    title: str,
    ylabel: str = "modified precision",
    panel: str | None = None,
    error: str | None = None,
) -> Path:
    """Bars of `value`: one cluster per `category`, one bar per `group` within it, one subplot
    per `panel` value (if given). Optional `error` column draws error bars."""
    plt = _plt()
    panels = list(dict.fromkeys(frame[panel])) if panel else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 4.2 * len(panels)), 3.8), squeeze=False)
    groups = list(dict.fromkeys(frame[group]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], panels):
        part = frame if name is None else frame[frame[panel] == name]
        categories = list(dict.fromkeys(part[category]))
        width = 0.8 / max(len(groups), 1)
        x = np.arange(len(categories))
        for i, g in enumerate(groups):
            rows = part[part[group] == g].set_index(category).reindex(categories)
            ax.bar(
                x + (i - (len(groups) - 1) / 2) * width,
                rows[value],
                width,
                label=str(g),
                color=colors[i % len(colors)],
                yerr=None if error is None else rows[error],
                capsize=2 if error else 0,
            )
        ax.set_xticks(
            x,
            [str(c) for c in categories],
            rotation=30 if len(categories) > 5 else 0,
            ha="right" if len(categories) > 5 else "center",
        )
        ax.set_ylim(0, 1.05)
        ax.grid(True, axis="y", alpha=0.3)
        if name is not None:
            ax.set_title(str(name))
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def line_panels(
    frame: pd.DataFrame,
    x: str,
    y: str,
    line: str,
    panel: str,
    path,
    title: str,
    xlabel: str,
    ylabel: str = "modified precision",
    logx: bool = True,
) -> Path:
    """One subplot per `panel` value, one line per `line` value, y against x."""
    plt = _plt()
    panels = list(dict.fromkeys(frame[panel]))
    columns = min(len(panels), 5)
    rows = int(np.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.0 * rows), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = list(dict.fromkeys(frame[line]))
    for ax, name in zip(axes.flat, panels):
        part = frame[frame[panel] == name]
        for i, name_line in enumerate(lines):
            rows_line = part[part[line] == name_line].sort_values(x)
            ax.plot(rows_line[x], rows_line[y], "-o", markersize=3, color=colors[i % len(colors)], label=str(name_line))
        if logx:
            ax.set_xscale("log")
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def scatter_2d(points: np.ndarray, colourings: dict[str, np.ndarray], path, title: str, max_legend: int = 12) -> Path:
    """One panel per colouring (e.g. by modality, by class) of the same 2-D points."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(colourings), figsize=(5.2 * len(colourings), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (name, labels) in zip(axes[0], colourings.items()):
        labels = np.asarray(labels).astype(str)
        names = sorted(set(labels))
        for i, value in enumerate(names):
            mask = labels == value
            ax.scatter(
                points[mask, 0],
                points[mask, 1],
                s=6,
                alpha=0.75,
                color=cmap(i % 20),
                label=value if len(names) <= max_legend else None,
            )
        ax.set_title(f"coloured by {name} ({len(names)})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(names) <= max_legend:
            ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ embedding-space statistics
def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components."""
    from sklearn.decomposition import PCA

    return PCA(n_components=2).fit_transform(np.asarray(x, dtype=np.float64))


def silhouette(vectors: np.ndarray, labels) -> float:
    """Mean silhouette coefficient under cosine distance (scikit-learn); NaN for one class."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(silhouette_score(np.asarray(vectors, dtype=np.float64), labels, metric="cosine"))


def knn_purity(vectors: np.ndarray, labels, k: int = 10) -> float:
    """Mean fraction of each sample's k nearest other samples (cosine, FAISS exact search) that
    share its label."""
    from cbir.evaluate import index as cbir_index

    labels = np.asarray(labels)
    k = min(k, len(labels) - 1)
    if k <= 0:
        return float("nan")
    unit = cbir_index.l2_normalise(vectors)
    index = cbir_index.build_index(unit, "flat", use_gpu=False)
    _, neighbours = cbir_index.search(index, unit, k, exclude=np.arange(len(unit)))  # not itself
    return float((labels[neighbours] == labels[:, None]).mean())


def comparison_bars(frame: pd.DataFrame, path, title: str) -> Path:
    """Grouped bars from a long table (group, per_class, subset, average, value): rows micro and
    macro, one panel per subset ('all' first, then each modality), index sizes on x (numeric
    order, 'all' last), one bar per group (encoder)."""
    plt = _plt()
    subsets = ["all"] + sorted(s for s in frame["subset"].unique() if s != "all")
    sizes = sorted(frame["per_class"].unique(), key=lambda v: float(v) if str(v).isdigit() else float("inf"))
    groups = list(dict.fromkeys(frame["group"]))
    averages = [a for a in ("micro", "macro") if a in set(frame["average"])]
    fig, axes = plt.subplots(
        len(averages),
        len(subsets),
        figsize=(2.6 * len(subsets) + 1, 2.6 * len(averages) + 0.6),
        squeeze=False,
        sharey=True,
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(sizes))
    for r, avg in enumerate(averages):
        for c, subset in enumerate(subsets):
            ax = axes[r, c]
            part = frame[(frame["average"] == avg) & (frame["subset"] == subset)]
            for i, group in enumerate(groups):
                values = part[part["group"] == group].set_index("per_class")["value"].reindex(sizes)
                ax.bar(
                    x + (i - (len(groups) - 1) / 2) * width,
                    values,
                    width,
                    color=colors[i % len(colors)],
                    label=str(group),
                )
            ax.set_xticks(x, [str(s) for s in sizes], fontsize=8)
            ax.set_ylim(0, 1.0)
            ax.grid(True, axis="y", alpha=0.3)
            ax.set_title(f"{avg} P@1 · {'all queries' if subset == 'all' else subset}", fontsize=9)
            if r == len(averages) - 1:
                ax.set_xlabel("index rows per class", fontsize=8)
        axes[r, 0].set_ylabel("modified precision")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    return _save(fig, path)
