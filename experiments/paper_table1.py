"""Table 1 of the study: every encoder on the combined dataset, full index, P@1/3/5/10 micro and
macro, written next to the published numbers with the difference per cell.

    python experiments/paper_table1.py data_dir=/data
    python experiments/paper_table1.py smoke=true      # offline: 2 random-weight encoders, synthetic data
    python experiments/paper_table1.py source=published published_dir=/data/cbmir   # CPU: the study's own embeddings

source=published reads the study's published artifacts instead of extracting: published_dir holds
datasets/ (the split CSVs of datasets.zip) and embeddings/<Model>/<dataset>.h5 (one folder per
model archive you downloaded; the models found there are evaluated). No image and no weights needed.

Outputs (output_dir, and artifacts of the sweep's MLflow parent run): table1.{csv,md},
comparison.{csv,md} (measured, difference and paper value per cell), per_modality.{csv,md},
report.md, table1.png (micro/macro P@1 against the paper), and table1_beyond.{csv,md}: the study's
rows followed by the encoders beyond the study (`beyond_study`: DINOv3, MedSigLIP), one column
saying which.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.common import Context, ExperimentError, main  # noqa: E402


def published_sweep(cfg) -> list[str]:
    """The study sweep on its published split CSVs and embeddings (every model folder present)."""
    from cbir.study.format import STUDY_MODELS, model_folders

    if not cfg.get("published_dir"):
        raise ExperimentError("source=published needs published_dir=<folder holding datasets/ and embeddings/>")
    datasets, embeddings = Path(cfg.published_datasets), Path(cfg.published_embeddings)
    names = [n for n in STUDY_MODELS.values() if any((embeddings / f).is_dir() for f in model_folders(n))]
    if not names:
        raise ExperimentError(
            f"{embeddings}: no model folder of the study ({', '.join(STUDY_MODELS)}); "
            "unpack the embeddings archives there or set published_embeddings=<folder>"
        )
    return [
        "dataset=study_splits",
        f"dataset.dir={datasets}",
        f"dataset.root={cfg.published_dir}",
        "encoder=precomputed",
        f"encoder.dir={embeddings}",
        "encoder.name=" + ",".join(names),
        "index.per_class=null",
        "eval.gallery=false",
    ]


def beyond_study_table(cfg, ctx: Context, measured: pd.DataFrame) -> dict:
    """Sweep the encoders beyond the study in the same setting; the study's rows, then theirs."""
    from cbir.report import from_runs as report

    sweeps = cfg.get("beyond_study")
    if cfg.source != "cbir" or not sweeps:
        return {}
    parent = ctx.launch([str(o) for o in sweeps["smoke" if cfg.smoke else "full"]])
    extra = report.table1(ctx.runs(parent), list(cfg.ns))
    table = pd.concat([measured.assign(rows="the study"), extra.assign(rows="beyond the study")], ignore_index=True)
    written = ctx.write_table(table, "table1_beyond")
    ctx.keep(parent, *written)
    return {"table1_beyond.csv": written[0], "table1_beyond.md": written[1]}


def run(cfg) -> dict:
    from cbir.report import figures
    from cbir.report import from_runs as report

    if cfg.source == "published":  # own MLflow experiment: never mixed with runs that extracted
        cfg.sweeps.full, cfg.smoke = [published_sweep(cfg)], False
        cfg.tracking_experiment = f"{cfg.tracking_experiment}-published"
    elif cfg.source != "cbir":
        raise ExperimentError(f"source={cfg.source}: use cbir (extract with each encoder) or published")
    ctx = Context(cfg)
    _, parents = ctx.sweep_runs()
    reference = Path(cfg.reference)
    reference = reference if reference.is_absolute() else Path(__file__).resolve().parents[1] / reference
    report_cfg = OmegaConf.create(
        {
            "tracking": {
                "uri": cfg.tracking_uri,
                "experiment": cfg.tracking_experiment,
                "enabled": True,
                "artifact_root": "mlruns/artifacts",
                "run_name": None,
            },
            "report": {
                "runs": parents[-1],
                "filter": None,
                "ns": list(cfg.ns),
                "output_dir": str(ctx.out),
                "reference": str(reference),
            },
        }
    )
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
                bars.append(
                    {
                        "encoder": row["encoder"],
                        "source": "paper",
                        "average": avg,
                        "P@1": float(match.iloc[0][f"{avg}_p1"]),
                    }
                )
    files.update(beyond_study_table(cfg, ctx, measured))
    figure = figures.grouped_bars(
        pd.DataFrame(bars),
        "encoder",
        "source",
        "P@1",
        ctx.out / "table1.png",
        "P@1 on the combined dataset: measured against the paper",
        panel="average",
    )
    ctx.keep(parents[-1], *files.values(), figure)
    return {**files, "table1.png": figure}


if __name__ == "__main__":
    main("paper_table1", run)
