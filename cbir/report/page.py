"""The comparison page: one self-contained interactive HTML file per sweep or report.

It answers "which encoder wins, where, and by how much" in one place: a plain-words answer, a
sortable leaderboard with intervals and "tied for best", P@N against index size with every
encoder on one axis (interval bands), an encoder × modality heat map, the k-NN / linear-probe
results when the runs have them, and a per-class table to filter. plotly's JavaScript is embedded
(no network needed), so the file opens offline and inside MLflow's artifact viewer.

Input is a table of runs as `cbir.report.from_runs.load_runs` returns it (tags + final metrics).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from cbir.evaluate import classification, uncertainty
from cbir.evaluate.metrics import metric_name

PAGE_NAME = "comparison.html"
SEPARATOR = " · "
IDENTITY = ["encoder", "dataset", "labels", "index_type", "per_class", "task"]


def _size_key(value) -> float:
    """Index sizes as numbers, `all` last."""
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return float("inf") if pd.isna(number) else float(number)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def retrieval_rows(runs: pd.DataFrame, ns) -> pd.DataFrame:
    first = f"micro/{metric_name(min(ns))}"
    return runs[runs[first].notna()] if first in runs else runs.iloc[:0]


def best_line(runs: pd.DataFrame, tied: dict[str, str] | None = None) -> str:
    """`best micro P@1: <run> 0.409 [0.37, 0.45]; tied: <run> 0.401, ...` (tied from the paired tests)."""
    metric = f"micro/{metric_name(1)}"
    if metric not in runs or runs[metric].notna().sum() == 0:
        return ""
    ranked = runs[runs[metric].notna()].sort_values(metric, ascending=False)
    best = ranked.iloc[0]
    line = f"best micro P@1: {best['run']} {uncertainty.with_interval(best, metric)}"
    if tied is not None:
        # tied only among runs that answered the same queries (the paired test compares nothing else)
        same = ranked["query_set"] == best["query_set"] if "query_set" in ranked else True
        others = [
            f"{row['run']} {row[metric]:.3f}"
            for _, row in ranked[same].iloc[1:].iterrows()
            if "µP@1" in (tied.get(row["run"]) or "").split()
        ]
        line += "; tied: " + (
            ", ".join(others) if others else "none (ahead of every run that answered the same queries)"
        )
    return line


def _leaderboard(runs: pd.DataFrame, ns, tied: dict[str, str] | None) -> str:
    varying = [c for c in IDENTITY[1:] if c in runs and runs[c].astype(str).nunique() > 1]
    metrics = [f"{avg}/{metric_name(n)}" for avg in ("micro", "macro") for n in ns]
    metrics = [m for m in metrics if m in runs]
    head = ["run", "encoder", *varying, *(m.replace("/P_at_", " P@") for m in metrics)]
    if tied is not None:
        head.append("tied for best")
    rows = []
    for _, run in runs.sort_values(metrics[0], ascending=False).iterrows():
        cells = [
            (str(run["run"]), str(run["run"])),
            (str(run["encoder"]), str(run["encoder"])),
        ]
        cells += [(str(run[c]), _size_key(run[c]) if c == "per_class" else str(run[c])) for c in varying]
        cells += [(uncertainty.with_interval(run, m), run[m] if run[m] == run[m] else -1) for m in metrics]
        if tied is not None:
            cells.append((tied.get(run["run"], ""), tied.get(run["run"], "")))
        rows.append(cells)
    return _table(
        "leaderboard",
        head,
        rows,
        "click a column header to sort; [low, high]: bootstrap interval "
        "(eval.ci.level); tied for best: not distinguishable from the best (paired sign-flip test, "
        "Holm-adjusted p >= 0.05; µ micro, M macro)",
    )


def _table(
    table_id: str,
    head: list[str],
    rows: list[list[tuple[str, object]]],
    caption: str,
    filter_box: bool = False,
) -> str:
    def sort_value(value) -> str:
        return html.escape(
            json.dumps(None if _missing(value) else getattr(value, "item", lambda: value)()),
            quote=True,
        )

    body = "\n".join(
        "<tr>" + "".join(f'<td data-sort="{sort_value(key)}">{html.escape(text)}</td>' for text, key in row) + "</tr>"
        for row in rows
    )
    box = (
        f'<input class="filter" data-table="{table_id}" placeholder="filter rows (class, run, ...)">'
        if filter_box
        else ""
    )
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        f'{box}<table id="{table_id}" class="sortable"><caption>{html.escape(caption)}</caption>'
        f"<thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
    )


def _group_label(run: pd.Series, varying: list[str]) -> str:
    return SEPARATOR.join(str(run[c]) for c in ["encoder", *varying])


def _saturation_figure(runs: pd.DataFrame, ns):
    """P@N against index size, one line per encoder (and whatever else varies), interval bands."""
    import plotly.graph_objects as go

    if "per_class" not in runs or runs["per_class"].astype(str).nunique() < 2:
        return None
    varying = [c for c in ("dataset", "labels", "index_type") if c in runs and runs[c].astype(str).nunique() > 1]
    sizes = sorted(runs["per_class"].astype(str).unique(), key=_size_key)
    fig = go.Figure()
    colours = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    for n_index, n in enumerate(ns):
        metric = f"micro/{metric_name(n)}"
        if metric not in runs:
            continue
        for g_index, (group, members) in enumerate(runs.groupby(runs.apply(_group_label, axis=1, args=(varying,)))):
            members = members.assign(_x=members["per_class"].astype(str)).drop_duplicates("_x")
            members = members.sort_values("_x", key=lambda s: s.map(_size_key))
            colour = colours[g_index % len(colours)]
            visible = True if n_index == 0 else "legendonly"
            if f"{metric}_ci_low" in members and members[f"{metric}_ci_low"].notna().all():
                fig.add_trace(
                    go.Scatter(
                        x=list(members["_x"]) + list(members["_x"])[::-1],
                        y=list(members[f"{metric}_ci_high"]) + list(members[f"{metric}_ci_low"])[::-1],
                        fill="toself",
                        fillcolor=colour,
                        opacity=0.15,
                        line={"width": 0},
                        hoverinfo="skip",
                        legendgroup=f"{group} P@{n}",
                        showlegend=False,
                        visible=visible,
                    )
                )
            fig.add_trace(
                go.Scatter(
                    x=members["_x"],
                    y=members[metric],
                    mode="lines+markers",
                    name=f"{group} · micro P@{n}",
                    legendgroup=f"{group} P@{n}",
                    line={"color": colour, "dash": "solid" if n_index == 0 else "dot"},
                    visible=visible,
                )
            )
    fig.update_xaxes(
        title_text="index size (rows per class in the index; all = every row)",
        type="category",
        categoryorder="array",
        categoryarray=sizes,
    )
    fig.update_yaxes(title_text="micro P@N (modified)", rangemode="tozero")
    fig.update_layout(
        title="P@N against index size (bands: bootstrap interval; click the legend to show other N)",
        height=460,
        margin={"t": 60},
    )
    return fig


def _heatmap_figure(runs: pd.DataFrame):
    """micro P@1 per modality: rows the runs at their largest index size, columns the modalities."""
    import plotly.graph_objects as go

    metric = metric_name(1)
    modalities = sorted(
        {
            str(k).split("/")[1]
            for k in runs.columns
            if str(k).startswith("modality/") and str(k).endswith(f"/micro/{metric}")
        }
    )
    if not modalities:
        return None
    largest = max(runs["per_class"].astype(str).unique(), key=_size_key) if "per_class" in runs else None
    rows = runs if largest is None else runs[runs["per_class"].astype(str) == largest]
    rows = rows.sort_values(f"micro/{metric}", ascending=False)
    values = [[row.get(f"modality/{m}/micro/{metric}") for m in modalities] for _, row in rows.iterrows()]
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=modalities,
            y=list(rows["run"]),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            text=[[("" if _missing(v) else f"{v:.3f}") for v in line] for line in values],
            texttemplate="%{text}",
            colorbar={"title": "micro P@1"},
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=f"micro P@1 by modality (index size {largest})",
        height=160 + 36 * len(rows),
        margin={"t": 60},
    )
    return fig


def _classification_section(runs: pd.DataFrame) -> str:
    import plotly.graph_objects as go

    parts = []
    for prefix, title in (
        ("knn", "k-NN classification (test split; k chosen on val)"),
        ("probe", "Linear probe (test split; epoch chosen on val)"),
        ("zero_shot", "Zero-shot classification (test split; class prompts of the text tower)"),
    ):
        if f"{prefix}/accuracy" not in runs:
            continue
        done = runs[runs[f"{prefix}/accuracy"].notna()].sort_values(f"{prefix}/accuracy", ascending=False)
        if done.empty:
            continue
        head = ["run", *(classification.LABELS[m] for m in classification.METRICS)]
        rows = [
            [
                (str(r["run"]), str(r["run"])),
                *(
                    (
                        uncertainty.with_interval(r, f"{prefix}/{m}"),
                        r.get(f"{prefix}/{m}", -1),
                    )
                    for m in classification.METRICS
                ),
            ]
            for _, r in done.iterrows()
        ]
        fig = go.Figure()
        for m in ("accuracy", "macro_f1", "macro_roc_auc"):
            low, high = (
                done.get(f"{prefix}/{m}_ci_low"),
                done.get(f"{prefix}/{m}_ci_high"),
            )
            error = (
                {
                    "type": "data",
                    "array": high - done[f"{prefix}/{m}"],
                    "arrayminus": done[f"{prefix}/{m}"] - low,
                }
                if low is not None and high is not None
                else None
            )
            fig.add_trace(
                go.Bar(
                    x=done["run"],
                    y=done[f"{prefix}/{m}"],
                    name=classification.LABELS[m],
                    error_y=error,
                )
            )
        fig.update_layout(
            title=title,
            barmode="group",
            height=420,
            yaxis={"range": [0, 1]},
            margin={"t": 60},
        )
        parts.append(
            f"<h2>{html.escape(title)}</h2>"
            + _table(f"table-{prefix}", head, rows, "click a header to sort")
            + _figure_html(fig)
        )
    return "\n".join(parts)


def _per_class_section(per_class: pd.DataFrame | None) -> str:
    if per_class is None or per_class.empty:
        return ""
    columns = [
        "run",
        "class",
        *[c for c in per_class.columns if str(c).startswith("P@")],
    ]
    columns += [c for c in ("queries", "modality") if c in per_class and c not in columns]
    rows = [
        [
            (
                str(v) if not isinstance(v, float) else f"{v:.3f}",
                v,
            )
            for v in (row[c] for c in columns)
        ]
        for _, row in per_class[columns].iterrows()
    ]
    return "<h2>Per class</h2>" + _table(
        "per-class",
        columns,
        rows,
        "P@N per class (micro within the class)",
        filter_box=True,
    )


def _figure_html(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], index = th.cellIndex;
    var down = th.dataset.order !== 'desc';
    table.querySelectorAll('th').forEach(function (other) { delete other.dataset.order; });
    th.dataset.order = down ? 'desc' : 'asc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = JSON.parse(a.cells[index].dataset.sort), y = JSON.parse(b.cells[index].dataset.sort);
      if (x === y) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * (down ? -1 : 1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
document.querySelectorAll('input.filter').forEach(function (box) {
  box.addEventListener('input', function () {
    var words = box.value.toLowerCase();
    document.getElementById(box.dataset.table).tBodies[0].querySelectorAll('tr').forEach(function (row) {
      row.style.display = row.textContent.toLowerCase().indexOf(words) >= 0 ? '' : 'none';
    });
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.answer { font-size: 1.25em; background: #eef6ee; padding: .6em .9em; border-left: 4px solid #2a7; }
table { border-collapse: collapse; margin: .6em 0 1.4em; font-size: .9em; }
caption { caption-side: bottom; text-align: left; color: #666; padding-top: .3em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; }
th[data-order=desc]::after { content: ' ▼'; } th[data-order=asc]::after { content: ' ▲'; }
input.filter { padding: .3em; width: 20em; }
"""


def write_page(
    runs: pd.DataFrame,
    ns,
    path: Path,
    title: str,
    tied: dict[str, str] | None = None,
    per_class: pd.DataFrame | None = None,
) -> Path:
    """runs: one row per run (run, encoder, per_class, ... and metric columns); tied: run name ->
    the metrics it is tied for best on (cbir.evaluate.comparisons.tied_labels), None when not computed."""
    from plotly.offline import get_plotlyjs

    retrieval = retrieval_rows(runs, ns)
    sections = [f"<h1>{html.escape(title)}</h1>"]
    answer = best_line(retrieval, tied) if len(retrieval) else ""
    if answer:
        sections.append(f'<p class="answer">{html.escape(answer)}</p>')
    if len(retrieval):
        sections.append("<h2>Leaderboard (modified P@N)</h2>" + _leaderboard(retrieval, ns, tied))
        for figure in (_saturation_figure(retrieval, ns), _heatmap_figure(retrieval)):
            if figure is not None:
                sections.append(_figure_html(figure))
    sections.append(_classification_section(runs))
    sections.append(_per_class_section(per_class))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n'
        + "\n".join(s for s in sections if s)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n",
        encoding="utf-8",
    )
    return path


def per_class_tables(client, runs: pd.DataFrame, limit: int = 200) -> pd.DataFrame:
    """The runs' per_class.csv artifacts in one table (column `run` first); runs without one are left out."""
    import tempfile

    frames = []
    with tempfile.TemporaryDirectory(prefix="cbir-per-class-") as folder:
        for _, run in runs.head(limit).iterrows():
            try:
                local = client.download_artifacts(run["run_id"], "per_class.csv", folder)
            # a classification-only run, or one without the file: nothing to show
            except Exception:  # noqa: BLE001, S112
                continue
            frame = pd.read_csv(local)
            frames.append(frame.assign(run=run["run"])[["run", *frame.columns]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
