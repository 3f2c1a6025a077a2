"""Entry point: `python -m cbir.run [overrides]` (add `-m` for a multirun sweep).

One job is four steps, in this order (cbir/job/):
    plan      every check on the config, the tracking store, the data and the index parameters,
              before any work; what the job will do (or nothing: already finished in this sweep)
    embed     the manifest's rows as embeddings, from the cache or extracted into it
    evaluate  each planned evaluation (cbir/job/evaluations/) on the embeddings, one outcome each
    record    the only step that talks to MLflow: the job's run, with every outcome logged
"""

from __future__ import annotations

import logging
import os
import sys

# Offline clusters: without this the hub client retries each missing file for ~23 s.
# cbir only ever reads model files from the local cache or encoder.weights unless the user
# explicitly opts in with HF_HUB_OFFLINE=0.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cbir import CONFIG_DIR  # noqa: E402
from cbir.common import console  # noqa: E402
from cbir.evaluate.metrics import RetrievalResult  # noqa: E402
from cbir.job import evaluations, finish  # noqa: E402
from cbir.job.embed import embed  # noqa: E402
from cbir.job.inputs import user_errors  # noqa: E402
from cbir.job.plan import plan  # noqa: E402
from cbir.tracking import process  # noqa: E402

log = logging.getLogger("cbir")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # one INFO line per CPU feature probe
console.quiet()


def run(cfg: DictConfig) -> RetrievalResult | None:
    """One job. Returns None when a sweep re-run finds this config already finished."""
    job_plan = plan(cfg)
    if job_plan is None:
        return None
    record = job_plan.record
    if record.claim(job_plan.run_name, job_plan.tags, bool(cfg.tracking.get("skip_finished", True))):
        return None  # finished meanwhile by an identical job
    with record.open(job_plan.run_name, job_plan.tags, job_plan.out):
        extraction = embed(job_plan, record)
        job = evaluations.evaluate(job_plan, extraction, record)
    finish.finish(job.result, cfg, job_plan.run_name, job_plan.out, record.address())
    return job.result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    process.handle_sigterm()  # Slurm's time limit, `kill`: the run ends KILLED, partial embeddings stay
    try:
        result = run(cfg)
    except BaseException as e:
        if process.terminated():
            log.error(
                "stopped by SIGTERM: the run is marked KILLED and the embeddings computed so far are "
                "kept; the same command resumes"
            )
            sys.exit(143)
        if not isinstance(e, user_errors()) or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # in a sweep, the launcher records the failed job and the sweep goes on
        log.error("%s", e)
        sys.exit(2)
    return None if result is None else result.metrics["micro/P_at_1"]


if __name__ == "__main__":
    main()
