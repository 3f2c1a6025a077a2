"""Saturation within one job (`eval.saturation=[...]`): P@N at several index sizes, as step series
(`saturation/...`), saturation.csv and saturation.png."""

from __future__ import annotations

from cbir.evaluate import retrieval as cbir_retrieval
from cbir.evaluate.outcome import Outcome
from cbir.job.evaluations import retrieval
from cbir.report import job_files


def wanted(cfg) -> bool:
    return retrieval.wanted(cfg) and bool(cfg.eval.get("saturation"))


def evaluate(job) -> Outcome:
    cfg = job.cfg
    sizes = [cbir_retrieval.per_class_value(v) for v in cfg.eval.saturation]
    curves = job_files.saturation_in_run(sizes, lambda size: retrieval.search(job, size), cfg.eval.n, cfg.encoder.name)
    names = job_files.curve_metric_names(cfg.eval.n)
    files = {"saturation_csv": job.out / "saturation.csv"}
    curves.to_csv(files["saturation_csv"], index=False)
    files["saturation_png"] = job_files.plot_saturation(curves, job.out / "saturation.png", cfg.eval.n)
    steps = [
        (int(row["step"]), {f"saturation/{name}": row[name] for name in names}) for row in curves.to_dict("records")
    ]
    return Outcome("saturation", steps=steps, files=files)
