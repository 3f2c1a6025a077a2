"""Cheap checks run before any expensive work (model loading, extraction), each failing with
one line that names the key or file and the fix."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cbir.common.errors import ConfigError, DataError  # noqa: F401 (raised here, and imported from here)

log = logging.getLogger(__name__)


def validate_config(cfg: DictConfig) -> None:
    """Every value the run uses, checked before any data, model or extraction."""
    check_eval(cfg.eval)
    per_class = cfg.index.per_class
    if per_class is not None and not (isinstance(per_class, str) and per_class.lower() == "all"):
        try:
            value = int(per_class)
        except (TypeError, ValueError):
            raise ConfigError(
                f"index.per_class={per_class}: give a positive integer, or null/all for the whole split"
            ) from None
        if value <= 0:
            raise ConfigError(f"index.per_class={per_class}: must be positive (or null/all for the whole split)")
    integer(cfg.index.seed, "index.seed", minimum=0)  # numpy's generators take no negative seed
    integer(cfg.seed, "seed", minimum=0)
    if cfg.index.get("use_gpu", "auto") not in ("auto", True, False):
        raise ConfigError(f"index.use_gpu={cfg.index.use_gpu}: use auto, true or false")
    if cfg.data.on_error not in ("skip", "raise"):
        raise ConfigError(f"data.on_error={cfg.data.on_error}: use skip or raise")
    fraction = cfg.data.max_skip_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction={fraction}: give a fraction between 0 and 1, e.g. 0.05")
    integer(cfg.extract.batch_size, "extract.batch_size", minimum=1)
    check_accelerator(cfg.extract.accelerator)
    integer(cfg.extract.num_workers, "extract.num_workers", minimum=0)
    if cfg.extract.get("prefetch_factor") is not None:
        integer(cfg.extract.prefetch_factor, "extract.prefetch_factor", minimum=1)
    check_index_type(cfg, cfg.encoder.get("dim"))
    check_folders(cfg)
    check_tracking(cfg)


def integer(value, key: str, minimum: int | None = 1) -> int:
    """`value` as an int, or a ConfigError naming `key` (bools and floats are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"{key}={value}: give {wanted}")
    return value


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_accelerator(accelerator) -> None:
    """A device PyTorch cannot see fails now, not as a Lightning traceback once the data is ready."""
    import torch

    if accelerator not in ACCELERATORS:
        raise ConfigError(f"extract.accelerator={accelerator}: use one of {list(ACCELERATORS)}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (
        (accelerator == "cuda" and not cuda)
        or (accelerator == "gpu" and not (cuda or mps))
        or (accelerator == "mps" and not mps)
    ):
        raise ConfigError(
            f"extract.accelerator={accelerator}: PyTorch sees no such device on this machine; "
            "use extract.accelerator=auto (a GPU when there is one) or cpu"
        )


def check_folders(cfg: DictConfig) -> None:
    """The folders a run writes into (embedding cache, manifest cache, generated images) can be
    created and written, checked without creating them."""
    writable_folder(cfg.paths.cache_dir, "paths.cache_dir")
    if cfg.dataset.get("cache_dir") is not None:
        writable_folder(cfg.dataset.cache_dir, "dataset.cache_dir")
    target = str(cfg.dataset.get("_target_", ""))
    if target and cfg.dataset.get("root") is not None and getattr(_class(target), "writes_root", False):
        root = str(cfg.dataset.root)  # the images are generated there
        writable_folder(
            root, "dataset.root", " (set paths.data_dir)" if root.startswith(str(cfg.paths.data_dir)) else ""
        )


def _class(target: str):
    from hydra.utils import get_class

    try:
        return get_class(target)
    except (ImportError, ValueError):  # a misspelt target is reported when the dataset is built
        return None


def writable_folder(path, key: str, fix: str = "") -> None:
    """`path` is a folder this user can write, or can be created as one (the nearest existing
    folder above it is writable); a ConfigError naming `key` otherwise."""
    folder = Path(str(path)).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:  # exists() is False beneath a file
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, not a folder; choose a writable folder{fix}")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    problem = "is on a read-only file system" if read_only else "is not writable by this user"
    raise ConfigError(f"{key}={path}: {existing} {problem}; choose a writable folder{fix}")


def as_list(value, key: str, example: str) -> list:
    if not isinstance(value, (list, ListConfig)):
        raise ConfigError(f"{key}={value}: give a list, e.g. {key}={example}")
    return list(OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value)


def check_eval(cfg_eval: DictConfig) -> None:
    ns = as_list(cfg_eval.n, "eval.n", "[1,3,5,10] (or [5] for one N)")
    if not ns or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in ns):
        raise ConfigError(f"eval.n={ns}: give positive integers, e.g. eval.n=[1,3,5,10]")
    sizes = as_list(cfg_eval.get("saturation") or [], "eval.saturation", "[10,100,null]")
    for size in sizes:
        whole = size is None or (isinstance(size, str) and size.lower() == "all")
        if not whole and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ConfigError(
                f"eval.saturation={sizes}: {size} is not an index size; give positive integers "
                "(rows per class) or null/all for the whole split, e.g. eval.saturation=[10,100,null]"
            )
    integer(cfg_eval.curve_k, "eval.curve_k", minimum=0)
    integer(cfg_eval.search_batch_size, "eval.search_batch_size", minimum=1)
    for key in ("gallery_queries", "gallery_k"):
        if cfg_eval.get(key) is not None:
            integer(cfg_eval[key], f"eval.{key}", minimum=1)
    from cbir.evaluate.metrics import LEVELS

    levels = as_list(cfg_eval.levels, "eval.levels", "[modality,anatomy]")
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise ConfigError(f"eval.levels={levels}: unknown level(s) {unknown}; use some of {sorted(LEVELS)}")


def check_index_type(cfg: DictConfig, dim: int | None = None) -> None:
    """index.type and index.params. `dim` is the embedding size when known (from the encoder
    config, or from the built encoder for encoders whose config does not state it); without
    it, what depends on the size is left to the check after the encoder is built."""
    import faiss

    from cbir.evaluate.index import INDEX_TYPES, check_params, factory_string

    params = cfg.index.get("params") or {}
    if not isinstance(params, (dict, DictConfig)):
        raise ConfigError(f"index.params={params}: give a mapping, e.g. index.params.nprobe=16")
    params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params)
    if dim is not None:
        dim = integer(dim, "encoder.dim", minimum=1)
    index_type = str(cfg.index.type)
    check_params(index_type, params, dim)
    if index_type in INDEX_TYPES:
        return  # with valid params (checked above) the preset's factory string is valid
    try:
        faiss.index_factory(dim or 3072, factory_string(index_type), faiss.METRIC_INNER_PRODUCT)
    except Exception as e:
        if dim is None and "parse" not in str(e):
            return  # may depend on the dimension (e.g. PQ sizes): checked again once the encoder is built
        raise ConfigError(
            f"index.type={cfg.index.type}: not a known index{'' if dim is None else f' for {dim}-d embeddings'}; "
            f"use one of {sorted(INDEX_TYPES)} or a faiss index_factory string such as 'IVF1024,Flat' or 'HNSW32'"
        ) from None


def check_tracking(cfg: DictConfig) -> None:
    """A tracking store that cannot work (unwritable or misnamed SQLite file, unreachable server,
    missing database driver) fails now, not after an hour of extraction."""
    from cbir.tracking.store import artifact_root, check_uri, resolve_uri

    if cfg.tracking.enabled:
        uri = resolve_uri(str(cfg.tracking.uri))
        check_uri(uri, artifact_root(uri, cfg.tracking.get("artifact_root")))


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
    from cbir.evaluate.retrieval import per_class_value

    splits = sorted(table["split"].unique())
    index_split, query_split = cfg.index.split, cfg.eval.query_split
    counts = table.loc[table["split"] == index_split, "label"].value_counts()
    if counts.empty:
        raise DataError(f"index.split={index_split}: {source} has no rows in that split (it has {splits})")
    if not (table["split"] == query_split).any():
        raise DataError(f"eval.query_split={query_split}: {source} has no rows in that split (it has {splits})")
    size = planned_index_rows(counts, per_class_value(cfg.index.per_class))
    largest = max(int(n) for n in cfg.eval.n)
    if largest > size:
        raise ConfigError(
            f"eval.n={list(cfg.eval.n)}: N={largest} is larger than the index ({size} rows); "
            "lower eval.n or raise index.per_class"
        )


def planned_index_rows(counts: pd.Series, per_class: int | None) -> int:
    """Rows of the index built from a split with these class counts (before any image fails)."""
    return int(np.minimum(counts.to_numpy(), per_class).sum()) if per_class else int(counts.sum())


def settle_index_params(cfg: DictConfig, table: pd.DataFrame, dim: int) -> None:
    """Decide, before extraction, the index parameters that depend on the index size and the
    embedding size (cbir.evaluate.index.settled_params), and write them into cfg.index.params, so that the
    run logs the values it uses. Also refuses a product quantiser that an eval.saturation size
    leaves too few rows to train."""
    from cbir.evaluate.index import FACTORY_PARAMS, INDEX_TYPES, settled_params
    from cbir.evaluate.retrieval import per_class_value

    index_type = str(cfg.index.type)
    if index_type not in INDEX_TYPES:
        return
    counts = table.loc[table["split"] == cfg.index.split, "label"].value_counts()
    requested = OmegaConf.to_container(cfg.index.get("params") or OmegaConf.create({}), resolve=True)
    params = settled_params(
        index_type, requested, planned_index_rows(counts, per_class_value(cfg.index.per_class)), dim
    )
    nbits = int(params.get("nbits", FACTORY_PARAMS["nbits"]))
    for size in cfg.eval.get("saturation") or []:
        rows = planned_index_rows(counts, per_class_value(size))
        if "{nbits}" in INDEX_TYPES[index_type] and rows < 2**nbits:
            raise ConfigError(
                f"index.params.nbits={nbits}: product quantisation needs at least {2**nbits} index "
                f"rows to train, eval.saturation size {size} gives {rows}; lower nbits, leave that "
                "size out or use index=ivf"
            )
    changed = {k: v for k, v in params.items() if requested.get(k) != v}
    if changed:
        with open_dict(cfg):
            if cfg.index.get("params") is None:
                cfg.index.params = {}
            cfg.index.params.update(changed)


def check_skipped(n_skipped: int, n_total: int, cfg: DictConfig, skipped_csv) -> None:
    if n_skipped and n_skipped / n_total > float(cfg.data.max_skip_fraction):
        raise DataError(
            f"{n_skipped} of {n_total} images ({n_skipped / n_total:.1%}) could not be loaded, more than "
            f"data.max_skip_fraction={cfg.data.max_skip_fraction}; the files and reasons are in {skipped_csv}. "
            "Fix or remove them, or raise data.max_skip_fraction (embeddings computed so far are kept)"
        )
