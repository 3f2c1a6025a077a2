"""experiments/multilabel.py in smoke mode, for real: a single- and a multi-label sweep on the
small synthetic set, read back from MLflow, side by side."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from conftest import PROJECT
from PIL import Image

sys.path.insert(0, str(PROJECT))

from experiments import multilabel  # noqa: E402
from experiments.common import load_config  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")


@pytest.mark.slow
def test_multilabel_experiment_side_by_side(tmp_path, shared_data_dir):
    cfg = load_config("multilabel", ["smoke=true", f"workdir={tmp_path}", f"data_dir={shared_data_dir}"])
    tiny = ["debug=smoke", "dataset=synthetic_small", "encoder=baseline"]  # no model building, one extraction each
    cfg.sweeps.smoke = [tiny, [*tiny, "dataset.labels=multi", "dataset.root=\\${paths.data_dir}/synthetic_small_multi"]]
    files = multilabel.run(cfg)
    table = pd.read_csv(files["multilabel.csv"])
    assert set(table["setting"]) == set(multilabel.SETTINGS)
    assert list(table["encoder"].unique()) == ["baseline"]
    rows = table[table["average"] == "micro"].set_index(["encoder", "setting"])
    baseline = rows.loc["baseline"]
    # the multi-label set has more queries (the two-finding images), and sharing a finding is
    # easier than retrieving the exact finding set
    assert baseline.loc["multi-label, shares a finding", "queries"] > baseline.loc["single-label (study)", "queries"]
    assert baseline.loc["multi-label, shares a finding", "P@1"] >= baseline.loc["multi-label, exact finding set", "P@1"]
    assert baseline.loc["multi-label, shares a finding", ["mAP@10", "nDCG@10", "R-precision"]].between(0, 1).all()
    assert pd.isna(baseline.loc["single-label (study)", "nDCG@10"])
    with Image.open(files["multilabel.png"]) as image:
        assert image.format == "PNG"
