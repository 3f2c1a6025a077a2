"""Configs read back from files (a saved index's index.json, a job's overrides logged to MLflow)
are data, never code: Hydra's `instantiate` would call whatever `_target_` they name. Before
building anything from them, only cbir's own encoder and dataset classes are allowed as the
target (also of nested nodes, as the combined dataset's parts), and everything else must be
plain values (no other `_..._` keys such as `_args_`, no `${...}` interpolations)."""

from __future__ import annotations

import importlib
import re
from typing import Any

from cbir.common.errors import ConfigError

# package -> the method every buildable class of it has (encoders embed, readers give a manifest)
TRUSTED_PACKAGES = {"cbir.encoders": "transform", "cbir.data": "load_manifest"}
TARGET = re.compile(r"^(cbir\.(?:encoders|data))\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")


def check_trusted(node: Any, package: str, source: str) -> None:
    """Raise ConfigError (naming `source`) unless `node` is a mapping whose `_target_` is a class
    shipped in `package` (defined there, of the package's kind) and whose other values are plain data."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: expected a mapping with a _target_, found {type(node).__name__}")
    _check_node(node, package, source, "")


def trusted_class(target: Any, package: str) -> bool:
    match = TARGET.match(target) if isinstance(target, str) else None
    if match is None or match.group(1) != package:
        return False
    try:  # importing a module of cbir's own package runs only cbir's code
        cls = getattr(importlib.import_module(f"{package}.{match.group(2)}"), match.group(3), None)
    except ImportError:
        return False
    # defined in the package itself (not merely imported into it, as Path or torch) and of its kind, but
    # not one of the interfaces in its `base` module (Encoder, PretrainedEncoder, DatasetReader): those
    # leave methods to their subclasses and cannot be built
    return (
        isinstance(cls, type)
        and cls.__module__.startswith(package + ".")
        and cls.__module__ != f"{package}.base"
        and callable(getattr(cls, TRUSTED_PACKAGES[package], None))
    )


# Options the encoders pass on to their library (model_config, model_kwargs) that would make it run
# code from a hub repository or unpickle a file: never taken from a file read back.
CODE_LOADING_KEYS = {"trust_remote_code", "checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg"}


def _check_node(node: dict, package: str, source: str, where: str) -> None:
    target = node.get("_target_")
    if not trusted_class(target, package):
        raise ConfigError(
            f"{source}: {where}_target_={target!r} is not a {package} class shipped with cbir; "
            "refusing to build it (a file read back may only name cbir's own classes)"
        )
    _check_plain({k: v for k, v in node.items() if k != "_target_"}, package, source, where)


def _check_plain(value: Any, package: str, source: str, where: str = "") -> None:
    if isinstance(value, dict):
        if "_target_" in value:
            _check_node(value, package, source, where)
            return
        for key, item in value.items():
            if not isinstance(key, str) or (key.startswith("_") and key.endswith("_")) or key in CODE_LOADING_KEYS:
                raise ConfigError(
                    f"{source}: key {where}{key!r} is not allowed in a file read back "
                    "(plain values only; no option that makes a library load code or a pickle)"
                )
            _check_plain(item, package, source, f"{where}{key}.")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, package, source, f"{where}{i}.")
    elif isinstance(value, str):
        if "${" in value:
            raise ConfigError(
                f"{source}: value of {where.rstrip('.') or 'a key'} contains an interpolation "
                f"{value!r}; files read back hold plain values only"
            )
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ConfigError(
            f"{source}: value of {where.rstrip('.')} has type {type(value).__name__}; "
            "files read back hold plain values only"
        )
