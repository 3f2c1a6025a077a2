"""Table 1 of the study: every encoder on the combined dataset, full index, P@1/3/5/10 micro and
macro, written next to the published numbers with the difference per cell.

    python experiments/paper_table1.py data_dir=/data
    python experiments/paper_table1.py smoke=true      # offline: 2 random-weight encoders, synthetic data

Outputs (output_dir, and artifacts of the sweep's MLflow parent run): table1.{csv,md},
comparison.{csv,md} (measured, difference and paper value per cell), per_modality.{csv,md},
report.md, table1.png (micro/macro P@1 against the paper).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.common import Context, main  # noqa: E402


def run(cfg) -> dict:
    from cbir import figures, report

    ctx = Context(cfg)
    _, parents = ctx.sweep_runs()
    reference = Path(cfg.reference)
    reference = reference if reference.is_absolute() else Path(__file__).resolve().parents[1] / reference
    report_cfg = OmegaConf.create({
        "tracking": {"uri": cfg.tracking_uri, "experiment": cfg.tracking_experiment, "enabled": True,
                     "artifact_root": "mlruns/artifacts", "run_name": None},
        "report": {"runs": parents[-1], "filter": None, "ns": list(cfg.ns), "output_dir": str(ctx.out),
                   "reference": str(reference)},
    })
    with ctx.chdir():
        files = report.write_report(report_cfg)  # table1, per_modality, comparison (report.reference)
    measured = pd.read_csv(files["table1.csv"])
    paper = pd.read_csv(reference)
    bars = []
    for _, row in measured.iterrows():
        match = paper[paper["encoder"] == row["encoder"]]
        for avg in ("micro", "macro"):
            bars.append({"encoder": row["encoder"], "source": "measured", "average": avg, "P@1": row[f"{avg} P@1"]})
            if not match.empty:
                bars.append({"encoder": row["encoder"], "source": "paper", "average": avg,
                             "P@1": float(match.iloc[0][f"{avg}_p1"])})
    figure = figures.grouped_bars(pd.DataFrame(bars), "encoder", "source", "P@1", ctx.out / "table1.png",
                                  "P@1 on the combined dataset: measured against the paper", panel="average")
    ctx.keep(parents[-1], *files.values(), figure)
    return {**files, "table1.png": figure}


if __name__ == "__main__":
    main("paper_table1", run)
