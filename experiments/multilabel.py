"""Single- against multi-label retrieval, per encoder, side by side.

single-label (the study): only images with exactly one finding, modified P@N on the class.
multi-label (dataset.labels=multi): every image with its set of findings, scored two ways:
  - exact finding set: modified P@N on `label` = the whole set (a hit needs the same set);
  - shares a finding: P@N where a neighbour is relevant when it shares at least one finding,
    with mAP@N, graded nDCG@N (gain = Jaccard overlap of the sets) and R-precision.

    python experiments/multilabel.py data_dir=/data
    python experiments/multilabel.py smoke=true

Outputs: multilabel.{csv,md} (encoder x setting x average, every N), multilabel.png (micro
and macro P@n per encoder and setting), logged to the multi-label sweep's parent run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments.common import Context, ExperimentError, main  # noqa: E402

SETTINGS = {  # name -> (labels mode of the runs, metric prefix)
    "single-label (study)": ("single", ""),
    "multi-label, exact finding set": ("multi", ""),
    "multi-label, shares a finding": ("multi", "ml/"),
}


def long_table(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """encoder, setting, average, metric, value for every run of either mode."""
    deepest = max(ns)
    mode = runs.get("param.dataset.labels", pd.Series("single", index=runs.index)).fillna("single")
    rows = []
    for (_, run), labels in zip(runs.iterrows(), mode):
        for setting, (wanted, prefix) in SETTINGS.items():
            if labels != wanted:
                continue
            names = {f"P@{n}": f"P_at_{n}" for n in ns}
            if prefix:
                names.update(
                    {
                        f"mAP@{deepest}": f"mAP_at_{deepest}",
                        f"nDCG@{deepest}": f"nDCG_at_{deepest}",
                        "R-precision": "R_precision",
                    }
                )
            for average in ("micro", "macro"):
                for metric, name in names.items():
                    value = run.get(f"{prefix}{average}/{name}")
                    if value is not None and value == value:
                        rows.append((run["encoder"], setting, average, metric, float(value)))
            queries = run.get(f"{prefix}queries/total")
            if queries is not None and queries == queries:
                rows.append((run["encoder"], setting, "micro", "queries", float(queries)))
    return pd.DataFrame(rows, columns=["encoder", "setting", "average", "metric", "value"])


def run(cfg) -> dict:
    from cbir.report import figures

    ctx = Context(cfg)
    runs, parents = ctx.sweep_runs()
    ns = [int(n) for n in cfg.ns]
    table = long_table(runs, ns)
    if "shares a finding" not in " ".join(table["setting"].unique()):
        raise ExperimentError("no run with dataset.labels=multi among the sweeps; check sweeps in the config")
    order = {name: i for i, name in enumerate(SETTINGS)}
    wide = table.pivot_table(index=["encoder", "setting", "average"], columns="metric", values="value", sort=False)
    metrics = [
        m
        for m in [f"P@{n}" for n in ns] + [f"mAP@{max(ns)}", f"nDCG@{max(ns)}", "R-precision", "queries"]
        if m in wide.columns
    ]
    wide = wide[metrics].reset_index()
    wide = wide.sort_values(["encoder", "setting", "average"], key=lambda c: c.map(order) if c.name == "setting" else c)
    files = {p.name: p for p in ctx.write_table(wide.reset_index(drop=True), "multilabel")}
    n = int(cfg.n)
    shown = table[table["metric"] == f"P@{n}"]
    files["multilabel.png"] = figures.grouped_bars(
        shown,
        "encoder",
        "setting",
        "value",
        ctx.out / "multilabel.png",
        f"P@{n}: single-label benchmark against multi-label relevance",
        panel="average",
    )
    ctx.keep(parents[-1], *files.values())
    print(wide.to_string(index=False))
    return files


if __name__ == "__main__":
    main("multilabel", run)
