"""Saturation: retrieval precision against index size (rows per class, log-spaced, and the whole
split), per encoder and per modality, and the index size at which P@1 reaches 95 % of its
full-index value (the study: P@1 saturates at about 1,000 rows per class).

    python experiments/saturation.py data_dir=/data
    python experiments/saturation.py smoke=true

Outputs: saturation.{csv,png} (per encoder), saturation_by_modality.{csv,png},
knee.{csv,md} (size reaching `fraction` of the full-index P@1, per encoder and modality).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.common import Context, main, show  # noqa: E402


def by_modality(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """Long table: encoder, modality, per_class, step, micro/P_at_N, macro/P_at_N."""
    from cbir.report.job_files import saturation_frame

    modalities = sorted({c.split("/")[1] for c in runs.columns if c.startswith("modality/")})
    frames = [saturation_frame(runs, ns).assign(modality="all")]
    for modality in modalities:
        renamed = runs.rename(
            columns={f"modality/{modality}/{avg}/P_at_{n}": f"{avg}/P_at_{n}" for avg in ("micro", "macro") for n in ns}
        )
        renamed = renamed.loc[:, ~renamed.columns.duplicated(keep="last")]
        frame = saturation_frame(renamed, ns)
        frame.insert(1, "modality", modality)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# Chance-level controls (conf/encoder/random.yaml): their P@1 is flat noise, a knee means nothing.
CONTROLS = ("random",)


def knee(curves: pd.DataFrame, fraction: float, metric: str = "micro/P_at_1") -> pd.DataFrame:
    """Per (group, modality): the smallest index size whose P@1 is >= fraction x full-index P@1
    (not for the controls)."""
    rows = []
    for (group, modality), frame in curves.groupby(["group", "modality"], sort=True):
        if str(group).split("/")[0] in CONTROLS:
            continue
        full = frame[frame["per_class"].astype(str) == "all"]
        if full.empty or not np.isfinite(full[metric].iloc[0]):
            continue
        target = fraction * float(full[metric].iloc[0])
        reached = frame[frame[metric] >= target].sort_values("step")
        first = reached.iloc[0] if len(reached) else full.iloc[0]
        rows.append(
            {
                "encoder": group,
                "modality": modality,
                "full-index P@1": float(full[metric].iloc[0]),
                f"{fraction:.0%} of it": target,
                "reached at rows/class": first["per_class"],
                "P@1 there": float(first[metric]),
            }
        )
    return pd.DataFrame(rows)


def run(cfg) -> dict:
    from cbir.report import figures
    from cbir.report import job_files as reporting

    ctx = Context(cfg)
    runs, parents = ctx.sweep_runs()
    ns = list(cfg.ns)
    overall = reporting.saturation_frame(runs, ns)
    curves = by_modality(runs, ns)
    files = {
        "saturation.csv": ctx.out / "saturation.csv",
        "saturation_by_modality.csv": ctx.out / "saturation_by_modality.csv",
    }
    overall.to_csv(files["saturation.csv"], index=False)
    curves.to_csv(files["saturation_by_modality.csv"], index=False)
    files["saturation.png"] = reporting.plot_saturation(overall, ctx.out / "saturation.png", ns)
    files["saturation_by_modality.png"] = figures.line_panels(
        curves,
        "step",
        "micro/P_at_1",
        "group",
        "modality",
        ctx.out / "saturation_by_modality.png",
        "micro P@1 against index size, per modality",
        "index rows per class (log)",
    )
    table = knee(curves, float(cfg.fraction))
    for path in ctx.write_table(table, "knee"):
        files[path.name] = path
    ctx.keep(parents[-1], *files.values())
    show(table, f"index size reaching {float(cfg.fraction):.0%} of the full-index P@1")
    return files


if __name__ == "__main__":
    main("saturation", run)
