"""Embedding parity: do cbir's extracted embeddings equal the study's published ones?

    python -m cbir.parity dataset=study_splits encoder=biomedclip parity.dir=/data/cbmir/embeddings

For every manifest row present in both, the cosine similarity between cbir's embedding (the
configured encoder, extracted or from the cache) and the published one (HDF5, read like
encoder=precomputed), summarised per dataset and modality (min, 1st percentile, median), the
worst rows listed, and a verdict: PASS when the 1st percentile of every group reaches
parity.threshold. Exit code 0 on PASS, 1 on FAIL. Files: <output_dir>/parity_summary.csv,
parity_worst.csv, parity.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cbir import CONFIG_DIR  # noqa: E402
from cbir.checks import DataError  # noqa: E402
from cbir.index import l2_normalise  # noqa: E402

log = logging.getLogger("cbir.parity")


@dataclass
class ParityReport:
    summary: pd.DataFrame   # per (dataset, modality) and overall: rows, min, p1, median, below
    worst: pd.DataFrame     # the lowest-similarity rows
    threshold: float
    compared: int           # rows present in both
    only_ours: int          # rows cbir embedded that the published files lack
    only_published: int     # manifest rows with a published embedding that cbir could not embed

    @property
    def passed(self) -> bool:
        return self.compared > 0 and bool((self.summary["p1"] >= self.threshold).all())

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def cosine_rows(a: np.ndarray, b: np.ndarray, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), block):
        pick = rows[start:start + block]
        out[start:start + len(pick)] = np.einsum("ij,ij->i", l2_normalise(a[pick]), l2_normalise(b[pick]))
    return out


def compare(table: pd.DataFrame, ours: np.ndarray, ours_valid, published: np.ndarray, published_valid,
            threshold: float = 0.99, n_worst: int = 20) -> ParityReport:
    if ours.shape[1] != published.shape[1]:
        raise DataError(f"cbir's embeddings are {ours.shape[1]}-d, the published ones {published.shape[1]}-d: "
                        "a different model or embedding head (e.g. projected vs CLS, logits vs pooled features)")
    ours_valid, published_valid = np.asarray(ours_valid, bool), np.asarray(published_valid, bool)
    rows = np.flatnonzero(ours_valid & published_valid)
    cosine = cosine_rows(ours, published, rows)
    frame = table.iloc[rows][["path", "dataset", "modality", "label"]].reset_index(drop=True)
    frame["cosine"] = cosine
    groups = [((d, m), part["cosine"].to_numpy()) for (d, m), part in frame.groupby(["dataset", "modality"])]
    groups.append((("all", "all"), cosine))
    summary = pd.DataFrame([
        {"dataset": d, "modality": m, "rows": len(c), "min": c.min(), "p1": np.percentile(c, 1),
         "median": np.median(c), "below_threshold": int((c < threshold).sum())}
        for (d, m), c in groups if len(c)])
    if summary.empty:
        summary = pd.DataFrame(columns=["dataset", "modality", "rows", "min", "p1", "median", "below_threshold"])
    worst = frame.nsmallest(n_worst, "cosine", keep="first")
    return ParityReport(summary, worst.reset_index(drop=True), float(threshold), len(rows),
                        int((ours_valid & ~published_valid).sum()), int((~ours_valid & published_valid).sum()))


def write_report(report: ParityReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": out / "parity_summary.csv", "worst": out / "parity_worst.csv", "json": out / "parity.json"}
    report.summary.to_csv(files["summary"], index=False)
    report.worst.to_csv(files["worst"], index=False)
    files["json"].write_text(json.dumps({
        "verdict": report.verdict, "threshold": report.threshold, "rule": "1st percentile >= threshold in every group",
        "compared": report.compared, "only_ours": report.only_ours, "only_published": report.only_published,
        "summary": report.summary.to_dict("records")}, indent=1, default=float))
    return files


def print_report(report: ParityReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cosine(cbir, published): {report.verdict} at {report.threshold} "
                        f"(1st percentile of every group; {report.compared} rows compared)")
    for column in ("dataset", "modality", "rows", "min", "p1", "median", "below_threshold"):
        table.add_column(column, justify="left" if column in ("dataset", "modality") else "right")
    for r in report.summary.itertuples():
        table.add_row(str(r.dataset), str(r.modality), str(r.rows), f"{r.min:.4f}", f"{r.p1:.4f}",
                      f"{r.median:.4f}", str(r.below_threshold))
    console = Console()
    console.print(table)
    if report.only_ours or report.only_published:
        console.print(f"not compared: {report.only_ours} rows without a published embedding, "
                      f"{report.only_published} rows cbir could not embed")
    if not report.passed and len(report.worst):
        console.print("lowest similarities:")
        console.print(report.worst.head(10).to_string(index=False))


def parity_command(cfg: DictConfig) -> ParityReport:
    from cbir.export import manifest_and_embeddings
    from cbir.extract import extract_embeddings
    from cbir.run import build
    from cbir.store import EmbeddingStore

    manifest, encoder, ours = manifest_and_embeddings(cfg)
    published_cfg = OmegaConf.create({
        "_target_": "cbir.encoders.precomputed.PrecomputedEncoder", "name": f"{encoder.name}-published",
        "files": OmegaConf.to_container(cfg.parity.files) if cfg.parity.files else None,
        "dir": cfg.parity.dir, "folder": cfg.parity.folder or None, "key_root": cfg.parity.key_root})
    if not cfg.parity.folder and not cfg.parity.files:
        from cbir.study_format import model_folders

        published_cfg.folder = next((f for f in model_folders(encoder.name)
                                     if cfg.parity.dir and (Path(cfg.parity.dir) / f).is_dir()), None)
    published = extract_embeddings(build(published_cfg), manifest, EmbeddingStore(cfg.paths.cache_dir), cfg.extract,
                                   on_error="skip")  # rows absent from the files: reported, not compared
    report = compare(manifest.table, ours.embeddings, ours.valid, published.embeddings, published.valid,
                     float(cfg.parity.threshold), int(cfg.parity.worst))
    files = write_report(report, Path(cfg.parity.output_dir))
    print_report(report)
    log.info("parity %s; tables in %s", report.verdict, files["summary"].parent)
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="parity")
def main(cfg: DictConfig) -> None:
    from cbir.run import user_errors

    try:
        report = parity_command(cfg)
    except user_errors() as e:
        log.error("%s", e)
        sys.exit(2)
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
