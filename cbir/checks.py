"""Cheap checks run before any expensive work (model loading, extraction), each failing with
one line that names the key or file and the fix."""

from __future__ import annotations

import logging
import numpy as np
import pandas as pd
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work."""


class DataError(ValueError):
    """Data that cannot give a meaningful result (empty splits, too many unreadable files)."""


def validate_config(cfg: DictConfig) -> None:
    ns = list(cfg.eval.n)
    if not ns or any(int(n) <= 0 for n in ns):
        raise ConfigError(f"eval.n={ns}: give positive integers, e.g. eval.n=[1,3,5,10]")
    per_class = cfg.index.per_class
    if per_class is not None and not (isinstance(per_class, str) and per_class.lower() == "all"):
        try:
            value = int(per_class)
        except (TypeError, ValueError):
            raise ConfigError(f"index.per_class={per_class}: give a positive integer, or null/all for the whole split") from None
        if value <= 0:
            raise ConfigError(f"index.per_class={per_class}: must be positive (or null/all for the whole split)")
    if int(cfg.eval.curve_k) < 0:
        raise ConfigError(f"eval.curve_k={cfg.eval.curve_k}: must be >= 0 (0 disables the curve)")
    if cfg.data.on_error not in ("skip", "raise"):
        raise ConfigError(f"data.on_error={cfg.data.on_error}: use skip or raise")
    if not 0 <= float(cfg.data.max_skip_fraction) <= 1:
        raise ConfigError(f"data.max_skip_fraction={cfg.data.max_skip_fraction}: give a fraction between 0 and 1")
    check_index_type(cfg)
    check_tracking(cfg)


def check_index_type(cfg: DictConfig) -> None:
    import faiss

    from cbir.index import INDEX_TYPES, factory_string

    dim = int(cfg.encoder.get("dim") or 3072)  # 3072 is divisible by every usual PQ size
    try:
        faiss.index_factory(dim, factory_string(str(cfg.index.type)), faiss.METRIC_INNER_PRODUCT)
    except Exception:
        raise ConfigError(
            f"index.type={cfg.index.type}: not a known index; use one of {sorted(INDEX_TYPES)} "
            "or a faiss index_factory string such as 'IVF1024,Flat' or 'HNSW32'"
        ) from None


def check_tracking(cfg: DictConfig) -> None:
    """A tracking store that cannot work (unwritable or misnamed SQLite file, unreachable server,
    missing database driver) fails now, not after an hour of extraction."""
    from cbir.tracking_store import check_uri, resolve_uri

    if cfg.tracking.enabled:
        check_uri(resolve_uri(str(cfg.tracking.uri)), cfg.tracking.get("artifact_root"))


def drop_duplicate_paths(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row of each image path: a duplicate in the index would be retrieved by
    its own copy among the queries and inflate P@N."""
    duplicated = table["path"].duplicated(keep="first")
    count = int(duplicated.sum())
    if count:
        log.warning("dropping %d rows whose image path repeats an earlier row (first kept)", count)
        table = table[~duplicated].reset_index(drop=True)
    return table, count


def validate_data(table: pd.DataFrame, cfg: DictConfig, source: str) -> None:
    from cbir.retrieval import per_class_value

    splits = sorted(table["split"].unique())
    index_split, query_split = cfg.index.split, cfg.eval.query_split
    counts = table.loc[table["split"] == index_split, "label"].value_counts()
    if counts.empty:
        raise DataError(f"index.split={index_split}: {source} has no rows in that split (it has {splits})")
    if not (table["split"] == query_split).any():
        raise DataError(f"eval.query_split={query_split}: {source} has no rows in that split (it has {splits})")
    cap = per_class_value(cfg.index.per_class)
    size = int(np.minimum(counts.to_numpy(), cap).sum()) if cap else int(counts.sum())
    largest = max(int(n) for n in cfg.eval.n)
    if largest > size:
        raise ConfigError(
            f"eval.n={list(cfg.eval.n)}: N={largest} is larger than the index ({size} rows); "
            "lower eval.n or raise index.per_class"
        )


def check_skipped(n_skipped: int, n_total: int, cfg: DictConfig, skipped_csv) -> None:
    if n_skipped and n_skipped / n_total > float(cfg.data.max_skip_fraction):
        raise DataError(
            f"{n_skipped} of {n_total} images ({n_skipped / n_total:.1%}) could not be loaded, more than "
            f"data.max_skip_fraction={cfg.data.max_skip_fraction}; the files and reasons are in {skipped_csv}. "
            "Fix or remove them, or raise data.max_skip_fraction (embeddings computed so far are kept)"
        )
