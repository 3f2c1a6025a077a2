"""Cheap checks of the composed config, run before any expensive work, each failing with one
line naming the key and the fix."""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    pass


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
    if cfg.index.split == cfg.eval.query_split:
        pass  # allowed: each query is excluded from its own neighbours
