"""What every experiment script does the same way: read its config (Hydra overrides from the
command line), launch cbir sweeps, read the runs back from MLflow, find a run's embeddings,
and keep its outputs (files in output_dir and artifacts on the sweep's parent run).

The scripts hold no retrieval logic: numbers come from `cbir.run` jobs through MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file per download

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:  # `python experiments/x.py` from anywhere
    sys.path.insert(0, str(PROJECT))

import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

log = logging.getLogger("cbir.experiments")
PARENT_LINE = re.compile(r"(?:sweep parent run|resuming sweep .*\(parent run) ([0-9a-f]{32})")
SCRIPT_CONF = PROJECT / "conf" / "experiment_scripts"


class ExperimentError(RuntimeError):
    pass


def load_config(name: str, overrides=()) -> DictConfig:
    """conf/experiment_scripts/<name>.yaml with Hydra command-line overrides applied."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(SCRIPT_CONF), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def main(name: str, run) -> None:
    """Entry point of a script: `python experiments/<name>.py [key=value ...]`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cbir.common.console import quiet

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    quiet()
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(usage(name))
        return
    try:
        cfg = load_config(name, args)
    except (HydraException, OmegaConfBaseException) as e:  # a mistyped override: one line, not a traceback
        log.error(
            "%s: %s (python experiments/%s.py --help lists the settings)", " ".join(args), str(e).splitlines()[0], name
        )
        raise SystemExit(2) from None
    try:
        files = run(cfg)
    except ExperimentError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    if files:
        log.info("outputs in %s:\n%s", Context(cfg).out, "\n".join(f"  {p}" for p in files.values()))


def usage(name: str) -> str:
    """The script's docstring and its settings with their defaults (conf/experiment_scripts/<name>.yaml)."""
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    cfg = load_config(name)
    return (
        f"{doc}\n\nusage: python experiments/{name}.py [key=value ...]\n\n"
        f"settings (conf/experiment_scripts/{name}.yaml and common.yaml):\n"
        f"{OmegaConf.to_yaml(cfg)}"
    )


def show(frame: pd.DataFrame, title: str) -> None:
    """A result table on the console (rich), numbers to 3 decimals."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if pd.api.types.is_numeric_dtype(frame[column]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)


@dataclass
class Context:
    """Paths and tracking of one script invocation."""

    cfg: DictConfig

    @property
    def workdir(self) -> Path:
        return Path(self.cfg.workdir).resolve()

    @property
    def out(self) -> Path:
        path = self.workdir / self.cfg.output_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tracker(self):
        from cbir.tracking import runs as tracking

        with self.chdir():  # a relative SQLite URI resolves against the working folder
            return tracking.Tracker(
                self.cfg.tracking_uri, self.cfg.tracking_experiment, artifact_root="mlruns/artifacts"
            )

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracker().uri)

    @contextlib.contextmanager
    def chdir(self):
        previous = Path.cwd()
        os.chdir(self.workdir)
        try:
            yield
        finally:
            os.chdir(previous)

    def sweeps(self) -> list[list[str]]:
        return [list(s) for s in self.cfg.sweeps["smoke" if self.cfg.smoke else "full"]]

    def common_overrides(self) -> list[str]:
        return [
            f"tracking.uri={self.cfg.tracking_uri}",
            f"tracking.experiment={self.cfg.tracking_experiment}",
            *self.data_overrides(),
        ]

    def data_overrides(self) -> list[str]:
        """What every job needs besides its sweep to compute the same thing (data location, extras)."""
        data = [f"paths.data_dir={self.cfg.data_dir}"] if self.cfg.get("data_dir") else []
        return [*data, *[str(o) for o in self.cfg.cbir]]

    # ------------------------------------------------------------------ sweeps
    def launch(self, sweep: list[str]) -> str:
        """`python -m cbir.run -m <sweep>`; returns the sweep's MLflow parent run id. Finished
        jobs of an earlier identical sweep are skipped (cbir's resume), so re-running a script
        only computes what is missing."""
        command = [sys.executable, "-m", "cbir.run", "-m", *sweep, *self.common_overrides()]
        log.info("launching: %s", " ".join(command[1:]))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "MPLBACKEND": "Agg"}
        env.pop("CBIR_PARENT_RUN_ID", None)
        sweep_log = self.out / f"sweep_{len(list(self.out.glob('sweep_*.log')))}.log"
        with sweep_log.open("w") as record:
            proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            lines = follow(proc.stdout, record, constant=command)
            returncode = proc.wait()
        if returncode != 0:
            raise ExperimentError(
                f"sweep failed ({' '.join(sweep)}); its output is in {sweep_log}:\n" + "".join(lines[-40:])
            )
        summary = next((i for i, line in enumerate(lines) if line.strip().startswith("sweep: ")), None)
        if summary is not None:  # cbir's table across jobs and where to look next
            sys.stdout.write("".join(lines[summary:]))
        log.info("sweep output: %s", sweep_log)
        # this sweep's parent as cbir announced it: an identical earlier sweep is resumed under its old
        # parent, which need not be the latest one started in the experiment
        announced = [m.group(1) for line in lines if (m := PARENT_LINE.search(line))]
        return announced[-1] if announced else self.latest_parent()

    def latest_parent(self) -> str:
        client = self.client()
        experiment = client.get_experiment_by_name(self.cfg.tracking_experiment)
        found = (
            client.search_runs(
                [experiment.experiment_id],
                filter_string="tags.`cbir.role` = 'sweep'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if experiment
            else []
        )
        if not found:
            raise ExperimentError(f"no sweep found in MLflow experiment {self.cfg.tracking_experiment}")
        return found[0].info.run_id

    def runs(self, parent: str) -> pd.DataFrame:
        """FINISHED child runs of a sweep: cbir.report's table (tags + metrics) plus the params
        (prefixed `param.`) and the job's Hydra overrides."""
        from cbir.report import from_runs as report

        table, _ = report.load_runs(self.tracker(), parent, None)
        if table.empty:
            raise ExperimentError(f"sweep {parent}: no FINISHED runs")
        client = self.client()
        extra = []
        for run_id in table["run_id"]:
            run = client.get_run(run_id)
            extra.append({"run_id": run_id, **{f"param.{k}": v for k, v in run.data.params.items()}})
        return table.merge(pd.DataFrame(extra), on="run_id")

    def sweep_runs(self) -> tuple[pd.DataFrame, list[str]]:
        """Launch every configured sweep; all their runs in one table, and the parent ids."""
        parents = [self.launch(sweep) for sweep in self.sweeps()]
        return pd.concat([self.runs(p) for p in parents], ignore_index=True), parents

    def job_overrides(self, run_id: str) -> list[str]:
        """The Hydra overrides of one job, from its logged config/overrides.yaml."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = self.client().download_artifacts(run_id, "config/overrides.yaml", tmp)
            return [str(o) for o in OmegaConf.load(path)]

    # ------------------------------------------------------------------ outputs
    def keep(self, parent: str | None, *paths: Path) -> None:
        """Log files to the sweep's parent run under experiments/<name>/."""
        if parent is None:
            return
        client = self.client()
        for path in paths:
            client.log_artifact(parent, str(path), f"experiments/{self.cfg.name}")

    def write_table(self, frame: pd.DataFrame, stem: str) -> list[Path]:
        from cbir.report.from_runs import to_markdown

        csv, md = self.out / f"{stem}.csv", self.out / f"{stem}.md"
        frame.to_csv(csv, index=False)
        md.write_text(to_markdown(frame))
        return [csv, md]


def follow(stream, record, constant=()) -> list[str]:
    """Copy a sweep's output into `record` line by line and log its progress: job i of n
    started (with the overrides not in `constant`, the command, i.e. what this job varies),
    elapsed time and an estimate of the time left (from the jobs done so far)."""
    import re
    import time

    def norm(token: str) -> str:
        return token.replace("\\", "").lower()

    same = {norm(t) for t in constant}
    lines, total, started = [], None, time.monotonic()
    for line in stream:
        record.write(line)
        lines.append(line)
        launching = re.search(r"Launching (\d+) jobs", line)
        if launching:
            total = int(launching.group(1))
        job = re.search(r"\t#(\d+) : (.*)", line)
        if job and total:
            done, elapsed = int(job.group(1)), time.monotonic() - started
            eta = f", about {_clock(elapsed / done * (total - done))} left" if done else ""
            varying = [t for t in job.group(2).split() if norm(t) not in same] or job.group(2).split()
            log.info("job %d of %d (%s): %s elapsed%s", done + 1, total, " ".join(varying), _clock(elapsed), eta)
    return lines


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def run_embeddings(ctx: Context, overrides: list[str]):
    """(manifest, Extraction) of a cbir job's config: the embeddings as that job cached them
    (computed now if the cache lacks them), built exactly as cbir.run builds them."""
    import torch
    from hydra import compose, initialize_config_dir

    from cbir import CONFIG_DIR
    from cbir.common.safe_config import check_trusted
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore
    from cbir.job import checks
    from cbir.job.inputs import build

    with ctx.chdir():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))  # the job's own, data location included
        # the overrides were read back from MLflow: build only cbir's own classes from them
        check_trusted(cfg.dataset, "cbir.data", f"dataset of job overrides {list(overrides)}")
        check_trusted(cfg.encoder, "cbir.encoders", f"encoder of job overrides {list(overrides)}")
        manifest = build(cfg.dataset).load_manifest()
        table, duplicates = checks.drop_duplicate_paths(manifest.table)
        if duplicates:
            manifest = manifest.with_table(table)
        torch.manual_seed(int(cfg.seed))  # as cbir.run: random-init encoders get the run's weights
        encoder = build(cfg.encoder)
        extraction = extract_embeddings(
            encoder,
            manifest,
            EmbeddingStore(cfg.paths.cache_dir),
            cfg.extract,
            on_error=cfg.data.on_error,
            retry_failed=bool(cfg.data.retry_failed),
        )
    log.info("embeddings %s: %s", extraction.cached.key, "cache hit" if extraction.cache_hit else "extracted now")
    return cfg, manifest, extraction
