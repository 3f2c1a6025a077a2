"""What a person sees of a run: the summary table and the files in the job directory."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cbir.metrics import RetrievalResult, metric_name

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
    result.per_class.to_csv(files["per_class"], index=False)
    result.curve.to_csv(files["curve"], index=False)
    return files


def summary_table(result: RetrievalResult, ns, title: str) -> Table:
    """Rows: all queries, each modality, the coarser matching levels; cells: micro / macro."""
    caption = (f"micro/macro over {result.n_queries - result.n_excluded} queries; "
               "'by ...' rows count a hit at a coarser level")
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("subset")
    for n in ns:
        table.add_column(f"P@{n}", justify="center")
    m = result.metrics

    def cell(prefix: str, n: int) -> str:
        values = [m.get(f"{prefix}{avg}/{metric_name(n)}") for avg in ("micro", "macro")]
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
    console.print(summary_table(result, ns, title))
    if result.n_excluded:
        console.print(
            f"[yellow]{result.n_excluded} queries excluded: their class has no row in the index "
            f"({', '.join(result.excluded_classes[:5])}{' ...' if len(result.excluded_classes) > 5 else ''})[/]"
        )
