"""Per-query records of finished runs, read back from MLflow, and the paired comparisons of a
sweep's jobs computed from them (the statistics are cbir.evaluate.comparisons)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

from cbir.evaluate.comparisons import PAIR_COLUMNS, compare_groups

log = logging.getLogger(__name__)


def download_records(client, run_ids, folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """per_query.parquet of each run that has one (runs from before it, or of other tasks, have none)."""
    from cbir.evaluate.per_query import FILE
    from cbir.tracking.runs import retry_locked

    folder = Path(folder or tempfile.mkdtemp(prefix="cbir-records-"))
    out = {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
    for run_id in run_ids:
        try:
            names = {a.path for a in retry_locked(client.list_artifacts, run_id)}
            if FILE not in names:
                continue
            path = retry_locked(client.download_artifacts, run_id, FILE, str(folder / run_id))
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names  # P@N only: class probabilities can be most of the file
            frame = pd.read_parquet(
                path,
                columns=[c for c in names if c in ("row", "class") or c.startswith("P@")],
            )
        except Exception as e:  # noqa: BLE001 - one unreadable run must not stop the others' comparison
            log.warning(
                "comparisons: could not read the per-query records of run %s: %s",
                run_id,
                str(e)[:200],
            )
            continue
        if "P@1" in frame:
            out[run_id] = frame
    return out


def for_jobs(
    client,
    jobs: pd.DataFrame,
    settings: tuple[int, float, int, int],
    folder: Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The comparisons of a sweep's finished jobs (dashboard.sweep_jobs rows)."""
    done = jobs[jobs["status"].isin(["FINISHED", "done earlier"])] if "status" in jobs else jobs
    if "query_set" not in done or done["query_set"].isna().all():
        return pd.DataFrame(columns=PAIR_COLUMNS), pd.DataFrame()
    done = done.dropna(subset=["query_set"])
    records = download_records(client, done["run_id"], folder)
    runs = pd.DataFrame({"name": done["run"], "group": done["query_set"], "run_id": done["run_id"]})
    return compare_groups(runs, records, *settings)
