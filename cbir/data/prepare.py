"""Build (or reuse) a dataset's manifest and print what it holds.

    python -m cbir.data.prepare dataset=nih14 dataset.root=/data/nih14

The manifest is cached under `${paths.cache_dir}/manifests/`, keyed by the dataset config
and the size/mtime of its input files; `python -m cbir.run` reuses it (or builds it the same
way when absent). Add `dataset.rebuild=true` to rescan the source anyway.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cbir import CONFIG_DIR
from cbir.data.manifest import ManifestError
from cbir.data.stats import dataset_summary

log = logging.getLogger("cbir")


def counts_table(title: str, counts, key_columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in key_columns:
        table.add_column(c)
    for c in ("train", "val", "test", "total"):
        table.add_column(c, justify="right")
    for row in counts.itertuples(index=False):
        values = row._asdict()
        table.add_row(
            *(str(values[c]) for c in key_columns), *(f"{values[c]:,}" for c in ("train", "val", "test", "total"))
        )
    return table


def dropped_table(scans: dict) -> Table:
    table = Table(title="Rows dropped by the dataset rules", title_justify="left")
    for c in ("dataset", "reason", "rows", "examples"):
        table.add_column(c, justify="right" if c == "rows" else "left")
    for name, scan in scans.items():
        for reason, n in (scan.dropped if scan else {}).items():
            table.add_row(name, reason, f"{n:,}", ", ".join(scan.examples.get(reason, [])[:2]))
    return table


def print_summary(name: str, manifest, scans: dict, console: Console | None = None) -> None:
    console = console or Console()
    summary = dataset_summary(manifest)
    console.print(
        f"[bold]{name}[/bold]: {summary['rows']:,} images, {summary['classes']} classes, "
        f"root {manifest.root}, digest {summary['digest']}"
    )
    console.print(counts_table("Per split and dataset", summary["dataset_counts"], ["dataset"]))
    console.print(counts_table("Per modality", summary["modality_counts"], ["modality"]))
    console.print(counts_table("Per class", summary["class_counts"], ["label"]))
    if any(scan and scan.dropped for scan in scans.values()):
        console.print(dropped_table(scans))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        reader = instantiate(cfg.dataset)
        manifest = reader.load_manifest()
    except ManifestError as e:
        log.error("%s", e)
        sys.exit(2)
    scans = getattr(reader, "last_scans", None) or {cfg.dataset.name: getattr(reader, "last_scan", None)}
    print_summary(cfg.dataset.name, manifest, scans)


if __name__ == "__main__":
    main()
