"""Export cbir embeddings in the study's published formats, so the study's own scripts (and
anyone holding its files) can use them:

    python -m cbir.export dataset=combined encoder=biomedclip export.dir=/data/cbir_export

The same dataset/encoder overrides as the run that extracted them pick the same cache entry
(extracted now if absent). Writes <dir>/datasets/<dataset>.csv (the study's split CSV: filepath,
dataset, split, modality, anatomic_region, one 0/1 column per class) and
<dir>/embeddings/<Model>/<dataset>.h5 (one HDF5 dataset per image, key = filepath, value = the
L2-normalised float32 embedding). Rows whose image could not be embedded are left out of both
and counted. Dataset names and model folders follow the study (radimagenet -> radiology_ai in
radimagenet.csv, biomedclip -> BiomedCLIPVitB16_224, ...).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cbir import CONFIG_DIR  # noqa: E402
from cbir.evaluate.index import l2_normalise  # noqa: E402
from cbir.study.format import STUDY_CSV_NAMES, STUDY_DATASETS, model_folder, write_h5, write_split_csv  # noqa: E402

log = logging.getLogger("cbir.study.export")


def export_embeddings(
    table: pd.DataFrame,
    embeddings: np.ndarray,
    valid: np.ndarray,
    out: Path,
    encoder: str,
    keys: list[str] | None = None,
) -> dict[str, list[Path]]:
    """Write manifest rows and their embeddings as study split CSVs + HDF5 files under `out`.
    `keys` (default: the manifest paths) become the CSV filepath and the HDF5 key."""
    table = table.reset_index(drop=True).copy()
    table["path"] = list(keys) if keys is not None else table["path"].astype(str)
    bad = [k for k in table["path"][:1000] if str(k).startswith("/")]
    if bad:
        raise ValueError(
            f"export: keys must be paths relative to the data folder, got e.g. {bad[0]!r}; "
            "set export.key_root=<data folder>"
        )
    valid = np.asarray(valid, dtype=bool)
    if not valid.all():
        log.warning("%d rows without an embedding (unreadable images) are left out", int((~valid).sum()))
    table["dataset"] = table["dataset"].map(lambda d: STUDY_DATASETS.get(d, d))
    files: dict[str, list[Path]] = {"csv": [], "h5": []}
    folder = model_folder(encoder)
    for dataset, part in table[valid].groupby("dataset", sort=False):
        rows = part.index.to_numpy()
        csv_name = STUDY_CSV_NAMES.get(dataset, f"{dataset}.csv")
        files["csv"].append(write_split_csv(part.reset_index(drop=True), out / "datasets" / csv_name))
        h5 = out / "embeddings" / folder / f"{dataset}.h5"
        files["h5"].append(write_h5(h5, part["path"], _normalised_rows(embeddings, rows)))
        log.info("%s: %d rows -> %s, %s", dataset, len(rows), files["csv"][-1], h5)
    return files


def _normalised_rows(embeddings: np.ndarray, rows: np.ndarray, block: int = 65536):
    for start in range(0, len(rows), block):  # bounded memory on millions of rows
        yield from l2_normalise(embeddings[rows[start : start + block]])


def manifest_and_embeddings(cfg: DictConfig, encoder_cfg=None):
    """(manifest, encoder, Extraction) exactly as `cbir.run` builds them for this config: the
    cache entry a run with the same dataset/encoder overrides made (extracted now if absent)."""
    import torch

    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore
    from cbir.job.inputs import build, load_job_manifest

    manifest, _ = load_job_manifest(cfg)
    torch.manual_seed(int(cfg.seed))  # as cbir.run: random-init encoders get the run's weights
    encoder = build(encoder_cfg if encoder_cfg is not None else cfg.encoder)
    extraction = extract_embeddings(
        encoder,
        manifest,
        EmbeddingStore(cfg.paths.cache_dir),
        cfg.extract,
        on_error=cfg.data.on_error,
        retry_failed=bool(cfg.data.get("retry_failed", False)),
    )
    log.info("embeddings %s (%s)", extraction.cached.key, "cache hit" if extraction.cache_hit else "extracted now")
    return manifest, encoder, extraction


def export_command(cfg: DictConfig) -> dict[str, list[Path]]:
    from cbir.study.format import image_keys

    manifest, encoder, extraction = manifest_and_embeddings(cfg)
    keys = image_keys(manifest, cfg.export.key_root)
    return export_embeddings(
        manifest.table,
        extraction.embeddings,
        extraction.valid,
        Path(cfg.export.dir),
        cfg.export.get("model") or encoder.name,
        keys,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    from cbir.job.inputs import user_errors

    try:
        export_command(cfg)
    except (*user_errors(), ValueError) as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
