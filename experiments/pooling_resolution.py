"""Embedding head and input resolution: for ViTs the CLS token against the mean of the patch
tokens, for CNN feature maps global average against GeM pooling, each at several input sizes
(`encoder.pool` and `encoder.input_size` overrides; one extraction per combination).

    python experiments/pooling_resolution.py data_dir=/data
    python experiments/pooling_resolution.py smoke=true   # small random-weight DINOv2-S and ResNet-50

Outputs: pooling_resolution.{csv,md}, pooling_resolution.png (micro P@1 per encoder, pooling and size).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments.common import Context, main, show  # noqa: E402


def run(cfg) -> dict:
    from cbir.report import figures

    ctx = Context(cfg)
    runs, parents = ctx.sweep_runs()
    ns = [int(n) for n in cfg.ns]
    table = (
        pd.DataFrame(
            {
                "encoder": runs["encoder"],
                # a null pool is the model's standard head: CLS for ViTs, global average for CNNs
                "pool": runs["param.encoder.pool"].replace({"null": "default", "None": "default"}),
                "input size": pd.to_numeric(runs["param.encoder.input_size"]),
                **{f"{avg} P@{n}": runs[f"{avg}/P_at_{n}"] for avg in ("micro", "macro") for n in ns},
            }
        )
        .sort_values(["encoder", "pool", "input size"])
        .reset_index(drop=True)
    )
    files = {p.name: p for p in ctx.write_table(table, "pooling_resolution")}
    shown = table.assign(setting=table["encoder"] + " " + table["pool"], size=table["input size"].astype(str) + " px")
    files["pooling_resolution.png"] = figures.grouped_bars(
        shown,
        "setting",
        "size",
        f"micro P@{ns[0]}",
        ctx.out / "pooling_resolution.png",
        f"micro P@{ns[0]} by embedding head and input size",
    )
    for parent in parents:
        ctx.keep(parent, *files.values())
    show(table, "pooling resolution")
    return files


if __name__ == "__main__":
    main("pooling_resolution", run)
