"""The multi-label part of a run (`dataset.labels=multi`): metrics from the run's own search,
logged to MLflow under `ml/`, written to the job folder, shown in the console."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from cbir.metrics import metric_name
from cbir.metrics_multilabel import PREFIX, MultiLabelResult, evaluate_multilabel


def labels_mode(cfg) -> str:
    return str(cfg.dataset.get("labels") or "single")


def evaluate_search(table: pd.DataFrame, search, ns) -> MultiLabelResult:
    """Multi-label metrics of a run's SearchOutput (same neighbours as the single-label metrics)."""
    columns = [c for c in ("label", "modality", "anatomy", "findings") if c in table.columns]
    setup = search.setup
    own = pd.Series(range(len(setup.index_rows)), index=setup.index_rows).reindex(setup.query_rows)
    return evaluate_multilabel(table.iloc[setup.query_rows][columns], table.iloc[setup.index_rows][columns],
                               search.neighbours, own.fillna(-1).astype(int).to_numpy(), ns)


def job_outputs(table: pd.DataFrame, search, ns, tracker, out: Path, title: str) -> dict[str, Path]:
    result = evaluate_search(table, search, ns)
    tracker.log_metrics(result.metrics)
    out.mkdir(parents=True, exist_ok=True)
    files = {"multilabel_metrics": out / "multilabel_metrics.json", "per_finding": out / "per_finding.csv"}
    files["multilabel_metrics"].write_text(json.dumps(
        {"metrics": result.metrics, "queries": result.n_queries, "excluded_queries": result.n_excluded}, indent=1))
    result.per_finding.to_csv(files["per_finding"], index=False)
    Console(width=max(Console().width, 120)).print(summary_table(result, ns, title))  # 8 columns
    return files


def summary_table(result: MultiLabelResult, ns, title: str) -> Table:
    m = result.metrics
    deepest = max(int(n) for n in ns)
    columns = [(f"P@{n}", metric_name(n)) for n in sorted(int(n) for n in ns)]
    columns += [(f"mAP@{deepest}", f"mAP_at_{deepest}"), (f"nDCG@{deepest}", f"nDCG_at_{deepest}"),
                ("R-prec", "R_precision")]
    table = Table(title=title, caption=(f"micro/macro over {result.n_queries - result.n_excluded} queries "
                                        "(macro: over findings); relevant = shares a finding, nDCG gain = Jaccard"))
    table.add_column("subset")
    for header, _ in columns:
        table.add_column(header, justify="center")

    def row(label: str, prefix: str) -> None:
        cells = []
        for _, name in columns:
            values = [m.get(f"{PREFIX}{prefix}{avg}/{name}") for avg in ("micro", "macro")]
            cells.append("/".join("-" if v is None or v != v else f"{v:.3f}" for v in values))
        table.add_row(label, *cells)

    row("all queries", "")
    for mod in sorted({k.split("/")[2] for k in m if k.startswith(f"{PREFIX}modality/")}):
        row(f"  {mod}", f"modality/{mod}/")
    return table
