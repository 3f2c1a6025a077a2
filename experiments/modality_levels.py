"""Where retrieval is easy and where hard: per-modality P@N, and matching at three levels
(same modality; same modality and anatomy; same full class, i.e. the pathology) per encoder.
The study: ultrasound retrieves best, X-ray worst; pathology is much harder than anatomy.

    python experiments/modality_levels.py data_dir=/data
    python experiments/modality_levels.py smoke=true

Reuses the study sweep of paper_table1 (same MLflow experiment and overrides: its finished
runs are skipped). Outputs: modality_levels.{csv,md} (every N), modality_levels.png (P@n),
findings.md (best/worst modality and the anatomy-pathology gap per encoder).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments.common import Context, main, show  # noqa: E402

LEVEL_NAMES = {"modality": "modality", "anatomy": "modality + anatomy", "class": "full class (pathology)"}


def long_table(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """encoder, kind (modality | level), subset, average, N, value: from the runs' metrics."""
    rows = []
    for _, run in runs.iterrows():
        for column, value in run.items():
            parts = str(column).split("/")
            if value != value or not re.fullmatch(r"P_at_\d+", parts[-1]):  # not the _ci_low/_ci_high bounds
                continue
            n = int(parts[-1].rsplit("_", 1)[1])
            if n not in ns:
                continue
            if len(parts) == 4 and parts[0] == "modality":
                rows.append((run["encoder"], "modality", parts[1], parts[2], n, value))
            elif len(parts) == 4 and parts[0] == "level":
                rows.append((run["encoder"], "level", LEVEL_NAMES.get(parts[1], parts[1]), parts[2], n, value))
            elif len(parts) == 2 and parts[0] in ("micro", "macro"):
                rows.append((run["encoder"], "level", LEVEL_NAMES["class"], parts[0], n, value))
    return pd.DataFrame(rows, columns=["encoder", "kind", "subset", "average", "N", "value"])


def findings(table: pd.DataFrame, n: int) -> pd.DataFrame:
    micro = table[(table["average"] == "micro") & (table["N"] == n)]
    rows = []
    for encoder, frame in micro.groupby("encoder"):
        modality = frame[frame["kind"] == "modality"].set_index("subset")["value"]
        level = frame[frame["kind"] == "level"].set_index("subset")["value"]
        rows.append(
            {
                "encoder": encoder,
                "best modality": modality.idxmax(),
                "worst modality": modality.idxmin(),
                f"anatomy P@{n}": level.get(LEVEL_NAMES["anatomy"]),
                f"pathology P@{n}": level.get(LEVEL_NAMES["class"]),
                "pathology harder": bool(level.get(LEVEL_NAMES["class"], 1) < level.get(LEVEL_NAMES["anatomy"], 0)),
            }
        )
    return pd.DataFrame(rows)


def run(cfg) -> dict:
    from cbir.report import figures

    ctx = Context(cfg)
    runs, parents = ctx.sweep_runs()
    ns = [int(n) for n in cfg.ns]
    table = long_table(runs, ns)
    wide = table.pivot_table(index=["encoder", "kind", "subset"], columns=["average", "N"], values="value")
    wide.columns = [f"{avg} P@{n}" for avg, n in wide.columns]
    files = {p.name: p for p in ctx.write_table(wide.reset_index(), "modality_levels")}
    n = int(cfg.n)
    shown = table[(table["average"] == "micro") & (table["N"] == n)].copy()
    shown["panel"] = shown["kind"].map({"modality": "per modality", "level": "matching level"})
    order = {name: i for i, name in enumerate(LEVEL_NAMES.values())}  # coarse to fine
    shown["order"] = [(k != "modality", order.get(s, 0), s) for k, s in zip(shown["kind"], shown["subset"])]
    shown = shown.sort_values("order")
    files["modality_levels.png"] = figures.grouped_bars(
        shown,
        "subset",
        "encoder",
        "value",
        ctx.out / "modality_levels.png",
        f"micro P@{n} per modality and per matching level",
        panel="panel",
    )
    summary = findings(table, n)
    files.update({p.name: p for p in ctx.write_table(summary, "findings")})
    ctx.keep(parents[-1], *files.values())
    show(summary, "modality levels")
    return files


if __name__ == "__main__":
    main("modality_levels", run)
