"""A multirun over several encoders decodes each image once, before its jobs, which then hit
the cache; the same passes from the command line (for Slurm), with a memory budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cbir
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

TINY_VIT = """\
_target_: cbir.encoders.timm_encoder.TimmEncoder
name: tiny_vit
model_name: test_vit
pretrained: false
input_size: 160
preprocess:
  mode: squash
  crop: ${..input_size}
  interpolation: bicubic
"""


def with_tiny_encoder(cwd: Path) -> str:
    """A searchpath override adding encoder=tiny_vit (random weights, 160 px)."""
    (cwd / "conf" / "encoder").mkdir(parents=True)
    (cwd / "conf" / "encoder" / "tiny_vit.yaml").write_text(TINY_VIT)
    return f"hydra.searchpath=[file://{cwd / 'conf'}]"


def dataset_rows(client, run) -> int:
    return int(client.get_run(run.info.run_id).data.params["dataset_info.rows"])


@pytest.mark.slow  # a real 3-job multirun
def test_three_encoder_sweep_decodes_each_image_once(tmp_path, shared_data_dir):
    searchpath = with_tiny_encoder(tmp_path)
    proc = run_cbir(
        tmp_path,
        "-m",
        "debug=smoke",
        "encoder=baseline,random,tiny_vit",
        "extract.num_workers=1",
        searchpath,
        f"paths.data_dir={shared_data_dir}",
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("cbir.role") == "sweep"]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.tags["encoder"] for c in children) == ["baseline", "random", "tiny_vit"]
    n = dataset_rows(client, children[0])
    # one shared pass decoded every image once (counted in the writer, from a worker process)
    assert parent.data.metrics["extract/shared_decodes"] == n
    assert parent.data.metrics["extract/shared_encoders"] == 3
    assert f"decoded {n} images once for 3 encoders" in proc.stdout + proc.stderr
    # and the jobs found their embeddings: no job decoded anything
    assert all(c.data.tags["cache"] == "hit" and c.data.metrics["extract/rows"] == 0 for c in children)
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.slow  # two command-line passes
def test_command_line_pass_with_memory_budget(tmp_path, shared_data_dir):
    """1 MB of weights per pass: baseline and random (no weights) share a pass, the 1.2 MB
    tiny ViT would exceed it and is left alone to its job; a second call finds all cached."""
    searchpath = with_tiny_encoder(tmp_path)
    common = [
        "debug=smoke",
        "encoder=baseline,random,tiny_vit",
        "extract.group_memory_gb=0.001",
        searchpath,
        f"paths.data_dir={shared_data_dir}",
    ]
    proc = run_cbir(tmp_path, *common, module="cbir.job.sweep_pass")
    log = proc.stdout + proc.stderr
    assert "1 shared pass(es), 2 encoders extracted" in log
    assert "(baseline, random)" in log
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / ".cache/cbir/embeddings").iterdir() if p.is_dir())
    assert entries == ["baseline", "random"]
    proc = run_cbir(tmp_path, *common, module="cbir.job.sweep_pass")
    assert "0 shared pass(es), 0 encoders extracted, 0 images decoded" in proc.stdout + proc.stderr


def test_jobs_listed_as_the_basic_sweeper_launches_them():
    from conftest import compose

    from cbir.job.sweep_pass import sweep_jobs

    cfg = compose("experiment=smoke", hydra_node=True)  # the sweep lives in hydra.sweeper.params
    jobs = sweep_jobs(cfg, None)
    assert [job[:2] for job in jobs] == [
        [f"encoder={e}", f"index.per_class={n}"] for e in ("baseline", "random") for n in (3, 10, "all")
    ]
    assert all(job[2] == "experiment=smoke" for job in jobs)


def test_slurm_sweeps_leave_the_pass_to_a_job_of_its_own(caplog):
    from conftest import compose

    from cbir.job.sweep_pass import SharedPassCallback

    cfg = compose("hydra/launcher=slurm", hydra_node=True)
    with caplog.at_level("INFO", logger="cbir.job.sweep_pass"):
        SharedPassCallback().on_multirun_start(cfg)
    assert "python -m cbir.sweep_pass" in caplog.text
