"""Every config group option composes, and the defaults are what the README promises."""

import pytest
from conftest import CONF_DIR, compose
from omegaconf import OmegaConf

GROUPS = ["dataset", "encoder", "index", "extract", "eval", "tracking"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose(f"{group}={option}")
    node = cfg[group]
    assert node is not None
    if group in ("dataset", "encoder"):
        assert node["_target_"].startswith("cbir.") and node["name"]
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_defaults():
    cfg = compose()
    assert cfg.dataset.name == "synthetic" and cfg.encoder.name == "baseline"
    assert cfg.index.type == "flat" and cfg.index.per_class is None
    assert list(cfg.eval.n) == [1, 3, 5, 10] and cfg.eval.query_split == "test"
    assert cfg.tracking.uri == "sqlite:///mlruns/mlflow.db" and cfg.tracking.experiment == "cbir"


def test_debug_preset_shrinks_the_dataset():
    assert compose("debug=smoke").dataset.max_per_class < compose().dataset.max_per_class
