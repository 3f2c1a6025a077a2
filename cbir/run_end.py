"""What a job prints when it ends. Alone: its summary table, where its files are and the
`mlflow ui` command with the run's address. In a sweep: one line (the sweep prints the table
across jobs at the end); the job's full table still goes into its run.log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rich.console import Console

from cbir import console as cbir_console
from cbir import dashboard, reporting, uncertainty
from cbir.tracking import PARENT_ENV, retry_locked

log = logging.getLogger("cbir.run")


def in_sweep() -> bool:
    return bool(os.environ.get(PARENT_ENV))


def show_table(table, width: int) -> None:
    """A job's own table: on the console when it runs alone; in a sweep only into its run.log."""
    if in_sweep():
        cbir_console.to_log_files(table, width)
    else:
        Console(width=max(Console().width, width)).print(table)


def one_line(result, run_name: str, out: Path) -> str:
    metrics = result.metrics if result is not None else {}
    shown = ", ".join(
        f"{name.replace('/P_at_', ' P@')} {uncertainty.with_interval(metrics, name)}"
        for name in ("micro/P_at_1", "macro/P_at_1")
        if name in metrics
    )
    return f"done {run_name}: {shown or 'finished'}  ({out.resolve()})"


def finish(result, cfg, run_name: str, out: Path, tracker) -> None:
    summary = reporting.summary_table(result, cfg.eval.n, f"{run_name}  (modified P@N)") if result is not None else None
    if in_sweep():
        if summary is not None:
            cbir_console.to_log_files(summary)
        Console().print(one_line(result, run_name, out), highlight=False, soft_wrap=True)
        return
    if result is not None:
        reporting.print_summary(result, cfg.eval.n, title=f"{run_name}  (modified P@N)")
    lines = [f"Files       {out.resolve()}/ (run.log, metrics.json, per_class.csv, ...)"]
    if tracker.enabled and tracker.run_id:
        try:
            start_ui, page = dashboard.ui_address(tracker.uri, retry_locked(tracker.experiment_id), tracker.run_id)
            lines += [
                f"Dashboard   {start_ui}" if start_ui else "Dashboard",
                f"            then open {page}",
            ]
        except Exception as e:  # noqa: BLE001 - the address is a courtesy; the run itself is done
            log.warning("could not look up the run's dashboard address: %s", str(e)[:200])
    Console().print("\n".join(lines), highlight=False, soft_wrap=True)
