"""The config hash names what a run computes: keys that only change how a run looks, how fast it
goes or where it logs leave it alone (a re-run with other worker counts skips the finished job),
every key that changes the numbers changes it."""

from __future__ import annotations

import logging

import pytest
from conftest import compose

from cbir.tracking import runs as tracking
from cbir.tracking.runs import PARENT_ENV, config_hash

BASE = ("debug=smoke",)

COSMETIC = [
    "extract.num_workers=5",
    "extract.progress=true",
    "extract.shared_pass=false",
    "extract.group_size=3",
    "extract.group_memory_gb=7",
    "eval.search_batch_size=17",
    "tracking.experiment=elsewhere",
    "tracking.dir=/tmp/other-mlruns",
    "tracking.skip_finished=false",
    "paths.cache_dir=/tmp/other-cache",
]
MATTERS = [
    "seed=7",
    "encoder=random",
    "index=ivf",
    "index.per_class=10",
    "index.split=val",
    "eval.n=[1,2]",
    "eval.query_split=train",
    "dataset.difficulty=0.9",
    "data.on_error=raise",
    "paths.data_dir=/tmp/other-data",
]


def test_flatten_names_every_key_and_writes_lists_as_json():
    nested = {"a": {"b": [1, 2], "c": {"d": "x"}, "e": {}}, "f": 3, "g": None}
    assert tracking.flatten(nested) == {"a.b": "[1, 2]", "a.c.d": "x", "a.e": "{}", "f": 3, "g": None}


def test_the_hash_is_16_hex_digits_and_ignores_key_order():
    from omegaconf import OmegaConf

    one = OmegaConf.create({"seed": 1, "index": {"type": "flat", "per_class": 10}})
    other = OmegaConf.create({"index": {"per_class": 10, "type": "flat"}, "seed": 1})
    assert config_hash(one) == config_hash(other)
    assert len(config_hash(one)) == 16 and int(config_hash(one), 16) >= 0


@pytest.mark.parametrize("override", COSMETIC)
def test_cosmetic_keys_leave_the_hash_alone(override):
    assert config_hash(compose(*BASE, override)) == config_hash(compose(*BASE))


@pytest.mark.parametrize("override", ["dataset.cache_dir=/tmp/other-manifests", "dataset.rebuild=true"])
def test_where_a_dataset_keeps_its_manifest_leaves_the_hash_alone(override):
    base = ("dataset=csv", "dataset.file=/data/split.csv")
    assert config_hash(compose(*base, override)) == config_hash(compose(*base))


@pytest.mark.parametrize("override", MATTERS)
def test_keys_that_change_the_numbers_change_the_hash(override):
    assert config_hash(compose(*BASE, override)) != config_hash(compose(*BASE))


@pytest.mark.slow
def test_a_rerun_with_other_worker_counts_skips_the_finished_job(tmp_path, shared_data_dir, monkeypatch, caplog):
    """What a resumed sweep does per job (the parent run set in the environment): the first job
    runs, the same job with other workers, progress bar and batch size for search is skipped."""
    from mlflow.tracking import MlflowClient

    from cbir.run import run

    monkeypatch.chdir(tmp_path)
    where = (
        f"paths.data_dir={shared_data_dir}",
        f"paths.cache_dir={tmp_path}/cache",
        f"tracking.dir={tmp_path}/mlruns",
    )
    first = compose(*BASE, *where)
    tracker = tracking.Tracker.from_config(first)
    parent = MlflowClient(tracker.uri).create_run(tracker.experiment_id(), run_name="sweep").info.run_id
    monkeypatch.setenv(PARENT_ENV, parent)
    assert run(first) is not None
    again = compose(*BASE, *where, "extract.num_workers=1", "extract.progress=true", "eval.search_batch_size=3")
    with caplog.at_level(logging.INFO, logger="cbir"):
        assert run(again) is None
    assert "already FINISHED" in caplog.text
    client = MlflowClient(tracker.uri)
    children = client.search_runs([tracker.experiment_id()], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
