"""What a person sees of a run: the summary table and the files in the job directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from cbir.evaluate.metrics import RetrievalResult, metric_name
from cbir.evaluate.uncertainty import with_interval

console = Console()


def write_job_files(result: RetrievalResult, job_dir: Path) -> dict[str, Path]:
    job_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": job_dir / "metrics.json",
        "per_class": job_dir / "per_class.csv",
        "curve": job_dir / "precision_curve.csv",
    }
    payload = {
        "metrics": result.metrics,
        "queries": result.n_queries,
        "excluded_queries": result.n_excluded,
        "excluded_classes": result.excluded_classes,
    }
    files["metrics"].write_text(json.dumps(payload, indent=1))
    # P@N next to the class name: the first columns the artifact viewer shows
    first = ["class"] + [c for c in result.per_class.columns if str(c).startswith("P@")]
    per_class = result.per_class[
        [c for c in first if c in result.per_class] + [c for c in result.per_class.columns if c not in first]
    ]
    per_class.to_csv(files["per_class"], index=False)
    result.curve.to_csv(files["curve"], index=False)
    return files


def summary_table(result: RetrievalResult, ns, title: str) -> Table:
    """Rows: all queries, each modality, the coarser matching levels; cells: micro / macro."""
    caption = (
        f"micro/macro over {result.n_queries - result.n_excluded} queries; 'by ...' rows count a hit at a coarser level"
    )
    if any(name.endswith("_ci_low") for name in result.metrics):
        caption += "; \\[low, high]: bootstrap interval over queries (eval.ci)"
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("subset")
    for n in ns:
        table.add_column(f"P@{n}", justify="center")
    m = result.metrics

    def cell(prefix: str, n: int) -> str:
        names = [f"{prefix}{avg}/{metric_name(n)}" for avg in ("micro", "macro")]
        if f"{names[0]}_ci_low" in m:  # with intervals: micro above macro, `value [low, high]`
            return "\n".join(with_interval(m, name) for name in names)
        values = [m.get(name) for name in names]
        return "/".join("-" if v is None or v != v else f"{v:.3f}" for v in values)

    def row(label: str, prefix: str) -> None:
        table.add_row(label, *[cell(prefix, n) for n in ns])

    row("all queries", "")
    for mod in sorted({k.split("/")[1] for k in m if k.startswith("modality/")}):
        row(f"  {mod}", f"modality/{mod}/")
    for level in sorted({k.split("/")[1] for k in m if k.startswith("level/")}):
        row("by mod+anatomy" if level == "anatomy" else f"by {level}", f"level/{level}/")
    return table


def print_summary(result: RetrievalResult, ns, title: str) -> None:
    """On the console, and into the job's run.log."""
    from cbir.common.console import to_log_files

    table = summary_table(result, ns, title)
    wide = any(name.endswith("_ci_low") for name in result.metrics)  # `value [low, high]` cells
    (Console(width=max(console.width, 150)) if wide else console).print(table)
    to_log_files(table)
    if result.n_excluded:
        console.print(
            f"[yellow]{result.n_excluded} queries excluded: their class has no row in the index "
            f"({', '.join(result.excluded_classes[:5])}{' ...' if len(result.excluded_classes) > 5 else ''})[/]"
        )


# ------------------------------------------------------------------ saturation curves
def curve_metric_names(ns) -> list[str]:
    return [f"{avg}/{metric_name(n)}" for avg in ("micro", "macro") for n in ns]


def saturation_frame(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """P@N against index size, one row per (group, size), from a table of runs with tags
    encoder/dataset/index_type/per_class and their metrics. `step` is the per-class cap; for
    the whole split (per_class=all) it is the size of the largest class in the index."""
    first = f"micro/{metric_name(min(ns))}"
    # runs of other tasks (k-NN classification, linear probe) have no P@N: no point on a curve
    runs = runs[runs[first].notna()].copy() if first in runs else runs.iloc[:0].copy()
    parts = ["encoder"] + [c for c in ("index_type", "dataset", "labels") if c in runs and runs[c].nunique() > 1]
    runs["group"] = runs[parts].astype(str).agg("/".join, axis=1)
    numeric = pd.to_numeric(runs["per_class"], errors="coerce")
    whole = runs.get("index/max_per_class", pd.Series(np.nan, index=runs.index))
    runs["step"] = numeric.fillna(whole).astype(int)
    columns = [c for c in curve_metric_names(ns) if c in runs]
    table = runs[["group", "per_class", "step"] + columns].sort_values(["group", "step"])
    # task=retrieval and task=all of one config share one search: the same point, drawn once
    return table.drop_duplicates(["group", "step", *columns]).reset_index(drop=True)


def plot_saturation(curves: pd.DataFrame, path: Path, ns) -> Path:
    """saturation_figure as a PNG."""
    import matplotlib.pyplot as plt

    fig = saturation_figure(curves, ns)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def saturation_figure(curves: pd.DataFrame, ns):
    """Micro and macro P@N against rows per class in the index (log x), one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [n for n in (min(ns), max(ns)) if f"micro/{metric_name(n)}" in curves][:2]
    shown = sorted(set(shown))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, avg in zip(axes, ("micro", "macro")):
        for i, (group, frame) in enumerate(curves.groupby("group", sort=True)):
            for n, style in zip(shown, ("-o", "--s")):
                ax.plot(
                    frame["step"],
                    frame[f"{avg}/{metric_name(n)}"],
                    style,
                    color=colors[i % len(colors)],
                    label=f"{group} P@{n}",
                    markersize=4,
                )
        ax.set_xscale("log")
        steps = sorted(curves["step"].unique())
        ax.set_xticks(steps, [f"{v:g}" for v in steps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        # the whole precision scale: a y axis fitted to the data draws 0.301 to 0.305 as a steep fall
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("index rows per class (log)")
        ax.set_title(f"{avg} P@N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("modified precision")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Saturation: retrieval precision against index size")
    fig.tight_layout()
    return fig


def saturation_in_run(sizes, evaluate, ns, group: str) -> pd.DataFrame:
    """Evaluate several index sizes from one set of embeddings (`eval.saturation`)."""
    rows = []
    for size in sizes:
        metrics = evaluate(size).metrics
        rows.append(
            {
                "encoder": group,
                "per_class": "all" if size is None else size,
                **{k: metrics[k] for k in curve_metric_names(ns) + ["index/max_per_class"]},
            }
        )
    return saturation_frame(pd.DataFrame(rows), ns)
