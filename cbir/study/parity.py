"""Embedding parity: do cbir's extracted embeddings equal the study's published ones?

    python -m cbir.parity dataset=study_splits encoder=biomedclip parity.dir=/data/cbmir/embeddings

For every manifest row present in both, the cosine similarity between cbir's embedding (the
configured encoder, extracted or from the cache) and the published one (HDF5, read like
encoder=precomputed), summarised per dataset and modality (min, 1st percentile, median), the
worst rows listed, and a verdict: PASS when the 1st percentile of every group reaches
parity.threshold and at least parity.min_compared of the rows (overall and in every group) were
compared; rows missing on either side are counted with their reason. Exit code 0 on PASS, 1 on FAIL. Files: <output_dir>/parity_summary.csv,
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
from cbir.common.errors import ConfigError, DataError  # noqa: E402
from cbir.evaluate.index import l2_normalise  # noqa: E402

log = logging.getLogger("cbir.study.parity")


@dataclass
class ParityReport:
    summary: pd.DataFrame  # per (dataset, modality) and overall: rows, of_rows, share, min, p1, median, below
    worst: pd.DataFrame  # the lowest-similarity rows
    threshold: float
    compared: int  # rows present in both
    only_ours: int  # rows cbir embedded that the published files lack
    only_published: int  # manifest rows with a published embedding that cbir could not embed
    neither: int = 0  # rows missing on both sides
    min_compared: float = 0.0  # share of the rows (overall and per group) that must be compared

    @property
    def manifest_rows(self) -> int:
        return self.compared + self.only_ours + self.only_published + self.neither

    @property
    def enough_compared(self) -> bool:
        """A similarity on a handful of rows says nothing about the others."""
        return self.compared > 0 and bool((self.summary["share"] >= self.min_compared).all())

    @property
    def passed(self) -> bool:
        return self.enough_compared and bool((self.summary["p1"] >= self.threshold).all())

    def coverage(self) -> str:
        """How many rows were compared, and why the others were not."""
        line = (
            f"{self.compared} of {self.manifest_rows} rows compared; not compared: {self.only_ours} rows "
            f"without a published embedding, {self.only_published} rows cbir could not embed, "
            f"{self.neither} rows missing on both sides"
        )
        short = self.summary[self.summary["share"] < self.min_compared]
        if len(short):
            groups = ", ".join(f"{r.dataset}/{r.modality} {r.rows} of {r.of_rows}" for r in short.itertuples())
            line += (
                f"; FAIL: fewer than parity.min_compared={self.min_compared:g} of the rows compared in "
                f"{groups} (give the published files of every dataset, or fix the rows listed as skipped)"
            )
        return line

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def cosine_rows(a: np.ndarray, b: np.ndarray, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), block):
        pick = rows[start : start + block]
        out[start : start + len(pick)] = np.einsum("ij,ij->i", l2_normalise(a[pick]), l2_normalise(b[pick]))
    return out


def compare(
    table: pd.DataFrame,
    ours: np.ndarray,
    ours_valid,
    published: np.ndarray,
    published_valid,
    threshold: float = 0.99,
    n_worst: int = 20,
    min_compared: float = 0.95,
) -> ParityReport:
    if ours.shape[1] != published.shape[1]:
        raise DataError(
            f"cbir's embeddings are {ours.shape[1]}-d, the published ones {published.shape[1]}-d: "
            "a different model or embedding head (e.g. projected vs CLS, logits vs pooled features)"
        )
    ours_valid, published_valid = np.asarray(ours_valid, bool), np.asarray(published_valid, bool)
    rows = np.flatnonzero(ours_valid & published_valid)
    cosine = cosine_rows(ours, published, rows)
    frame = table.iloc[rows][["path", "dataset", "modality", "label"]].reset_index(drop=True)
    frame["cosine"] = cosine
    # every group of the manifest, also one with no row compared (it fails on its share)
    of_rows = table.groupby(["dataset", "modality"]).size()
    by_group = {key: part["cosine"].to_numpy() for key, part in frame.groupby(["dataset", "modality"])}
    groups = [(key, by_group.get(key, np.empty(0)), int(n)) for key, n in of_rows.items()]
    groups.append((("all", "all"), cosine, len(table)))
    summary = pd.DataFrame(
        [
            {
                "dataset": d,
                "modality": m,
                "rows": len(c),
                "of_rows": n,
                "share": len(c) / n if n else 0.0,
                "min": c.min() if len(c) else np.nan,
                "p1": np.percentile(c, 1) if len(c) else np.nan,
                "median": np.median(c) if len(c) else np.nan,
                "below_threshold": int((c < threshold).sum()),
            }
            for (d, m), c, n in groups
        ]
    )
    worst = frame.nsmallest(n_worst, "cosine", keep="first")
    return ParityReport(
        summary,
        worst.reset_index(drop=True),
        float(threshold),
        len(rows),
        int((ours_valid & ~published_valid).sum()),
        int((~ours_valid & published_valid).sum()),
        int((~ours_valid & ~published_valid).sum()),
        float(min_compared),
    )


def write_report(report: ParityReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": out / "parity_summary.csv", "worst": out / "parity_worst.csv", "json": out / "parity.json"}
    report.summary.to_csv(files["summary"], index=False)
    report.worst.to_csv(files["worst"], index=False)
    files["json"].write_text(
        json.dumps(
            {
                "verdict": report.verdict,
                "threshold": report.threshold,
                "min_compared": report.min_compared,
                "rule": "1st percentile >= threshold and share compared >= min_compared, in every group",
                "compared": report.compared,
                "manifest_rows": report.manifest_rows,
                "coverage": report.coverage(),
                "only_ours": report.only_ours,
                "only_published": report.only_published,
                "neither": report.neither,
                "summary": report.summary.to_dict("records"),
            },
            indent=1,
            default=float,
        )
    )
    return files


def print_report(report: ParityReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"cosine(cbir, published): {report.verdict} at {report.threshold} "
        f"(1st percentile of every group; {report.compared} of {report.manifest_rows} rows compared)"
    )
    for column in ("dataset", "modality", "rows", "of_rows", "min", "p1", "median", "below_threshold"):
        table.add_column(column, justify="left" if column in ("dataset", "modality") else "right")
    for r in report.summary.itertuples():
        table.add_row(
            str(r.dataset),
            str(r.modality),
            str(r.rows),
            str(r.of_rows),
            f"{r.min:.4f}",
            f"{r.p1:.4f}",
            f"{r.median:.4f}",
            str(r.below_threshold),
        )
    console = Console()
    console.print(table)
    if report.compared < report.manifest_rows:
        console.print(report.coverage())
    if not report.passed and len(report.worst):
        console.print("lowest similarities:")
        console.print(report.worst.head(10).to_string(index=False))


def parity_command(cfg: DictConfig) -> ParityReport:
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore
    from cbir.job.inputs import build
    from cbir.study.export import manifest_and_embeddings

    min_compared = cfg.parity.get("min_compared", 0.95)
    if not isinstance(min_compared, (int, float)) or isinstance(min_compared, bool) or not 0 <= min_compared <= 1:
        raise ConfigError(
            f"parity.min_compared={min_compared!r}: give the share of rows that must be compared, "
            "a number from 0 to 1 (e.g. 0.95)"
        )
    manifest, encoder, ours = manifest_and_embeddings(cfg)
    published_cfg = OmegaConf.create(
        {
            "_target_": "cbir.encoders.precomputed.PrecomputedEncoder",
            "name": f"{encoder.name}-published",
            "files": OmegaConf.to_container(cfg.parity.files) if cfg.parity.files else None,
            "dir": cfg.parity.dir,
            "folder": cfg.parity.folder or None,
            "key_root": cfg.parity.key_root,
        }
    )
    if not cfg.parity.folder and not cfg.parity.files:
        from cbir.study.format import model_folders

        published_cfg.folder = next(
            (f for f in model_folders(encoder.name) if cfg.parity.dir and (Path(cfg.parity.dir) / f).is_dir()), None
        )
    published = extract_embeddings(
        build(published_cfg), manifest, EmbeddingStore(cfg.paths.cache_dir), cfg.extract, on_error="skip"
    )  # rows absent from the files: reported, not compared
    report = compare(
        manifest.table,
        ours.embeddings,
        ours.valid,
        published.embeddings,
        published.valid,
        float(cfg.parity.threshold),
        int(cfg.parity.worst),
        float(min_compared),
    )
    files = write_report(report, Path(cfg.parity.output_dir))
    print_report(report)
    if not report.enough_compared:
        log.error(
            "%s; rows skipped and why: %s, %s",
            report.coverage(),
            ours.cached.path / "skipped.csv",
            published.cached.path / "skipped.csv",
        )
    log.info("parity %s; tables in %s", report.verdict, files["summary"].parent)
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="parity")
def main(cfg: DictConfig) -> None:
    from cbir.job.inputs import user_errors

    try:
        report = parity_command(cfg)
    except user_errors() as e:
        log.error("%s", e)
        sys.exit(2)
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
