"""The multi-label part of a run (`dataset.labels=multi`): metrics from the run's own search,
logged to MLflow under `ml/`, written to the job folder, shown in the console."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.table import Table

from cbir import per_query, retrieval
from cbir.metrics import metric_name
from cbir.metrics_multilabel import PREFIX, MultiLabelResult, evaluate_multilabel
from cbir.uncertainty import with_interval


def labels_mode(cfg) -> str:
    return str(cfg.dataset.get("labels") or "single")


def evaluate_search(table: pd.DataFrame, search, ns) -> MultiLabelResult:
    """Multi-label metrics of a run's SearchOutput (same neighbours as the single-label metrics)."""
    columns = [c for c in ("label", "modality", "anatomy", "findings") if c in table.columns]
    setup = search.setup
    return evaluate_multilabel(
        table.iloc[setup.query_rows][columns],
        table.iloc[setup.index_rows][columns],
        search.neighbours,
        retrieval.own_positions(setup.index_rows, setup.query_rows),
        ns,
    )


def job_outputs(table: pd.DataFrame, search, ns, tracker, out: Path, title: str, cfg=None) -> dict[str, Path]:
    result = evaluate_search(table, search, ns)
    if cfg is not None:
        result.metrics.update(
            per_query.multilabel_intervals(result.per_query, table.iloc[search.setup.query_rows], cfg)
        )
    tracker.log_metrics(result.metrics)
    out.mkdir(parents=True, exist_ok=True)
    files = {"multilabel_metrics": out / "multilabel_metrics.json", "per_finding": out / "per_finding.csv"}
    files["multilabel_metrics"].write_text(
        json.dumps(
            {"metrics": result.metrics, "queries": result.n_queries, "excluded_queries": result.n_excluded}, indent=1
        )
    )
    result.per_finding.to_csv(files["per_finding"], index=False)
    if cfg is not None:
        per_query.add_shown(files["multilabel_metrics"])
    from cbir import run_end  # here: run_end imports the dashboard

    run_end.show_table(summary_table(result, ns, title), 120)  # 8 columns
    return files


def summary_table(result: MultiLabelResult, ns, title: str) -> Table:
    m = result.metrics
    deepest = max(int(n) for n in ns)
    columns = [(f"P@{n}", metric_name(n)) for n in sorted(int(n) for n in ns)]
    columns += [
        (f"mAP@{deepest}", f"mAP_at_{deepest}"),
        (f"nDCG@{deepest}", f"nDCG_at_{deepest}"),
        ("R-prec", "R_precision"),
    ]
    table = Table(
        title=title,
        caption=(
            f"micro/macro over {result.n_queries - result.n_excluded} queries "
            "(macro: over findings); relevant = shares a finding, nDCG gain = Jaccard"
        ),
    )
    table.add_column("subset")
    for header, _ in columns:
        table.add_column(header, justify="center")

    def row(label: str, prefix: str) -> None:
        cells = []
        for _, name in columns:
            values = [m.get(f"{PREFIX}{prefix}{avg}/{name}") for avg in ("micro", "macro")]
            if f"{PREFIX}{prefix}micro/{name}_ci_low" in m:  # micro with its interval above macro
                cells.append(
                    with_interval(m, f"{PREFIX}{prefix}micro/{name}")
                    + "\n"
                    + ("-" if values[1] is None or values[1] != values[1] else f"{values[1]:.3f}")
                )
                continue
            cells.append("/".join("-" if v is None or v != v else f"{v:.3f}" for v in values))
        table.add_row(label, *cells)

    row("all queries", "")
    for mod in sorted({k.split("/")[2] for k in m if k.startswith(f"{PREFIX}modality/")}):
        row(f"  {mod}", f"modality/{mod}/")
    return table


def report_table(runs: pd.DataFrame, ns, identity) -> pd.DataFrame:
    """cbir.report's multi-label table: the runs with ml/ metrics, P@N (shares a finding)
    micro | macro, then mAP, nDCG and R-precision (micro) at the largest N. `identity(runs)`
    names the columns that tell the runs apart."""
    first = f"{PREFIX}micro/{metric_name(min(ns))}"
    if first not in runs:
        return pd.DataFrame()
    runs = runs[runs[first].notna()]
    if runs.empty:
        return pd.DataFrame()
    deepest = max(int(n) for n in ns)
    columns = {f"{PREFIX}{avg}/{metric_name(n)}": f"{avg} P@{n}" for avg in ("micro", "macro") for n in ns}
    columns.update(
        {
            f"{PREFIX}micro/mAP_at_{deepest}": f"micro mAP@{deepest}",
            f"{PREFIX}micro/nDCG_at_{deepest}": f"micro nDCG@{deepest}",
            f"{PREFIX}micro/R_precision": "micro R-precision",
        }
    )
    for name, label in [(k, v) for k, v in columns.items() if "/micro/" in k]:  # bounds shown by to_markdown
        columns.update({f"{name}_ci_low": f"{label} low", f"{name}_ci_high": f"{label} high"})
    ident = identity(runs)
    table = runs[ident + [c for c in columns if c in runs]].rename(columns=columns)
    return table.sort_values(ident).reset_index(drop=True)
