"""What a job prints when it ends. Alone: its summary table, where its files are and the
`mlflow ui` command with the run's address. In a sweep: one line (the sweep prints the table
across jobs at the end); the job's full table still goes into its run.log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rich.console import Console

from cbir.common import console as cbir_console
from cbir.evaluate import uncertainty
from cbir.report import job_files as reporting
from cbir.tracking.runs import PARENT_ENV

log = logging.getLogger("cbir.run")


def in_sweep() -> bool:
    return bool(os.environ.get(PARENT_ENV))


def show_table(table, width: int) -> None:
    """A job's own table: into its run.log, and on the console when it runs alone (a sweep shows one
    line per job)."""
    if not in_sweep():
        Console(width=max(Console().width, width)).print(table)
    cbir_console.to_log_files(table, width)


def one_line(result, run_name: str, out: Path) -> str:
    metrics = result.metrics if result is not None else {}
    shown = ", ".join(
        f"{name.replace('/P_at_', ' P@')} {uncertainty.with_interval(metrics, name)}"
        for name in ("micro/P_at_1", "macro/P_at_1")
        if name in metrics
    )
    return f"done {run_name}: {shown or 'finished'}  ({out.resolve()})"


def finish(result, cfg, run_name: str, out: Path, address: tuple[str, str] | None) -> None:
    """`address`: (command that starts the dashboard, the run's address in it), when there is a run."""
    summary = reporting.summary_table(result, cfg.eval.n, f"{run_name}  (modified P@N)") if result is not None else None
    if in_sweep():
        if summary is not None:
            cbir_console.to_log_files(summary)
        Console().print(one_line(result, run_name, out), highlight=False, soft_wrap=True)
        return
    if result is not None:
        reporting.print_summary(result, cfg.eval.n, title=f"{run_name}  (modified P@N)")
    lines = [f"Files       {out.resolve()}/ (run.log, metrics.json, per_class.csv, ...)"]
    if address is not None:
        start_ui, page = address
        lines += [f"Dashboard   {start_ui}" if start_ui else "Dashboard", f"            then open {page}"]
    Console().print("\n".join(lines), highlight=False, soft_wrap=True)
