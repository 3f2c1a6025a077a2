"""What the MLflow dashboard shows of a run and of a sweep.

A job run gets a short name (`baseline · flat · 20`), a curated set of params (the full
resolved config is an artifact, `config/resolved.yaml`) and its headline numbers as the run
description. A sweep's parent run gets, when the sweep ends, a comparison table
(`comparison_table.json`, rendered by the UI's artifact viewer), a comparison figure and the
same table as its description; the console gets one table across jobs and where to look next.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cbir.evaluate import uncertainty
from cbir.evaluate.metrics import metric_name

log = logging.getLogger(__name__)

SEPARATOR = " · "
# Set by SweepSummary in the launching process: the config keys the sweep varies besides
# encoder, index type and size, so every job's name says what makes it different.
SWEPT_KEYS_ENV = "CBIR_SWEPT_KEYS"
NAMED_ALWAYS = {"encoder", "encoder.name", "index", "index.type", "index.per_class", "task", "dataset.labels"}
# conf/config.yaml's default dataset: a run on any other one says which, so that runs on different
# data never share a name in the experiment.
DEFAULT_DATASET = "synthetic"

# What a person filters and compares runs by; the rest of the config is in config/resolved.yaml.
CURATED_PARAMS = (
    "encoder.name",
    "encoder.pretrained",
    "encoder.weights",
    "encoder.pool",
    "encoder.input_size",
    "encoder.model_name",
    "dataset.name",
    "index.type",
    "index.per_class",
    "index.split",
    "index.seed",
    "index.params.*",
    "eval.n",
    "eval.query_split",
    "eval.levels",
    "eval.saturation",
    "seed",
    "extract.batch_size",
    "extract.precision",
    "task.name",
    "task.knn.*",
    "task.probe.*",
    "dataset.labels",
)
# The UI opens an experiment of this kind on its "Model training" runs view, not the GenAI overview.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "cbir retrieval benchmark. Each sweep is a parent run (name starts with `sweep`) with one child run "
        "per job (`encoder · index type · rows per class`). Open a parent run for the comparison table "
        "(Artifacts: comparison_table.json), comparison.png and saturation.png. Headline metrics: "
        "micro/P_at_1, macro/P_at_1, micro/P_at_10 (modified P@N)."
    ),
}


# ------------------------------------------------------------------------------ job runs
def per_class_label(value: Any) -> str:
    return "all" if value is None or str(value).lower() in ("all", "none", "null") else str(value)


def run_name(cfg: DictConfig, extra: tuple[str, ...] = ()) -> str:
    """`encoder · index type · rows per class`, then the dataset unless it is the default, the
    value of any other key the sweep varies and the `extra` words (task, labels mode, named
    whether swept or not)."""
    parts = [str(cfg.encoder.name), str(cfg.index.type), per_class_label(cfg.index.per_class)]
    swept = list(filter(None, os.environ.get(SWEPT_KEYS_ENV, "").split(",")))
    if "dataset" not in swept:  # a swept dataset is named below, default included
        parts += filter(None, [_dataset_word(cfg)])
    for key in swept:
        if key in NAMED_ALWAYS:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):  # a config group such as dataset=...: the option chosen
            parts.append(str(_group_choice(key) or value.get("name", key)))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    parts += list(extra)
    return SEPARATOR.join(parts)


def _dataset_word(cfg: DictConfig) -> str | None:
    """The dataset's name, else the option chosen (`synthetic_small` is named `synthetic`), or
    None for the default dataset."""
    name = str(OmegaConf.select(cfg, "dataset.name", default=None) or DEFAULT_DATASET)
    if name != DEFAULT_DATASET:
        return name
    choice = _group_choice("dataset")
    return choice if choice and choice != DEFAULT_DATASET else None


def _group_choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # no Hydra run (a script composing the config itself)
        return None


def curated_params(flat_config: dict[str, Any]) -> dict[str, Any]:
    """The params worth a column: CURATED_PARAMS picked from the flattened resolved config."""
    return {k: v for k, v in flat_config.items() if any(fnmatch.fnmatchcase(k, p) for p in CURATED_PARAMS)}


def write_resolved_config(cfg: DictConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resolved.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def headline(metrics: dict[str, float], ns) -> str:
    """Markdown: micro and macro P@N of all queries, then micro P@1 per modality."""

    def fmt(name: str) -> str:  # `0.409 [0.37, 0.45]` when the run logged the interval
        return uncertainty.with_interval(metrics, name)

    lines = ["| | " + " | ".join(f"P@{n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for avg in ("micro", "macro"):
        lines.append(f"| {avg} | " + " | ".join(fmt(f"{avg}/{metric_name(n)}") for n in ns) + " |")
    modalities = sorted({k.split("/")[1] for k in metrics if k.startswith("modality/")})
    if modalities:
        lines += [
            "",
            "micro P@1 by modality: "
            + ", ".join(f"{m} {fmt(f'modality/{m}/micro/{metric_name(1)}')}" for m in modalities),
        ]
    return "\n".join(lines)


def tag_experiment(client, experiment_id: str) -> None:
    """Experiment tags and the runs-table view, set once (the user may edit them afterwards)."""
    from cbir.tracking.runs import retry_locked

    existing = retry_locked(client.get_experiment, experiment_id).tags
    for key, value in {**EXPERIMENT_TAGS, RUNS_VIEW_TAG: runs_view()}.items():
        if key not in existing:
            retry_locked(client.set_experiment_tag, experiment_id, key, value)


# ------------------------------------------------------------------------------ sweeps
HEADLINE_METRICS = ("micro/P_at_1", "macro/P_at_1", "micro/P_at_10", "macro/P_at_10")
# task=knn | probe | all: the classification headline beside retrieval's (column name in the tables)
CLASSIFICATION_HEADLINE = {
    "knn/accuracy": "k-NN acc",
    "knn/macro_f1": "k-NN macro F1",
    "probe/accuracy": "probe acc",
    "probe/macro_f1": "probe macro F1",
    "zero_shot/accuracy": "zero-shot acc",  # task=zero_shot | all with a text tower
    "text/micro/P_at_1": "text micro P@1",  # task=text_retrieval | all with a text tower
}


def sweep_jobs(runs: list, since_ms: int | None = None) -> pd.DataFrame:
    """One row per child run of a sweep (`runs`: all of them, whatever their status, see
    cbir.job.sweep.sweep_children): name, identity, headline metrics, cache, seconds, status
    ('done earlier' for a run an earlier attempt finished)."""
    rows = []
    for run in runs:
        tags, info = run.data.tags, run.info
        status = info.status
        if status == "FINISHED" and since_ms and info.end_time and info.end_time < since_ms:
            status = "done earlier"
        end = info.end_time or int(time.time() * 1000)
        rows.append(
            {
                "run": tags.get("mlflow.runName", info.run_id),
                "encoder": tags.get("encoder"),
                "dataset": tags.get("dataset"),
                "index_type": tags.get("index_type"),
                "per_class": tags.get("per_class"),
                "task": tags.get("task") or "retrieval",
                "labels": tags.get("labels") or "single",
                **{m: run.data.metrics.get(m, float("nan")) for m in HEADLINE_METRICS},
                **{m: run.data.metrics[m] for m in CLASSIFICATION_HEADLINE if m in run.data.metrics},
                **{
                    f"{m}_ci_{side}": run.data.metrics[f"{m}_ci_{side}"]
                    for m in HEADLINE_METRICS
                    for side in ("low", "high")
                    if f"{m}_ci_{side}" in run.data.metrics
                },
                "query_set": tags.get("cbir.query_set"),
                "cache": tags.get("cache", "-"),
                "seconds": (end - info.start_time) / 1000,
                "status": status,
                "run_id": info.run_id,
                "error": tags.get("error", ""),
                "config_hash": tags.get("config_hash", info.run_id),
                "start": info.start_time,
                **{k: v for k, v in run.data.metrics.items() if k.startswith("modality/")},
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # a job that failed and was run again by a resumed sweep: its latest attempt only
    frame = frame.sort_values("start", ascending=False).drop_duplicates("config_hash").drop(columns="start")
    size = pd.to_numeric(frame["per_class"], errors="coerce").fillna(float("inf"))
    return (
        frame.assign(_size=size)
        .sort_values(["encoder", "index_type", "_size", "task", "labels", "run"])
        .drop(columns="_size")
        .reset_index(drop=True)
    )


def extra_columns(jobs: pd.DataFrame) -> list[str]:
    """task and labels, where the sweep varies them or they are not the default."""
    defaults = {"task": "retrieval", "labels": "single"}
    return [c for c, default in defaults.items() if c in jobs and (jobs[c].nunique() > 1 or (jobs[c] != default).any())]


def comparison_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """The parent run's table: one row per job, readable column names, headline metrics first."""
    names = {
        "run": "run",
        "encoder": "encoder",
        "index_type": "index",
        "per_class": "rows/class",
        **{c: c for c in extra_columns(jobs)},
        "micro/P_at_1": "micro P@1",
        "macro/P_at_1": "macro P@1",
        "micro/P_at_10": "micro P@10",
        "macro/P_at_10": "macro P@10",
        "cache": "cache",
        "seconds": "seconds",
        "status": "status",
        "run_id": "run_id",
    }
    table = jobs[list(names)].rename(columns=names)
    for column in ("micro P@1", "macro P@1", "micro P@10", "macro P@10", "seconds"):
        table[column] = table[column].astype(float).round(4 if "P@" in column else 1)
    for metric in classification_columns(jobs):
        table.insert(
            table.columns.get_loc("cache"),
            CLASSIFICATION_HEADLINE[metric],
            jobs[metric].astype(float).round(4).to_numpy(),
        )
    return add_interval_columns(table, jobs)


def classification_columns(jobs: pd.DataFrame) -> list[str]:
    """The classification headline metrics some job of the sweep logged (task=knn | probe | all)."""
    return [m for m in CLASSIFICATION_HEADLINE if m in jobs and jobs[m].notna().any()]


def add_interval_columns(table: pd.DataFrame, jobs: pd.DataFrame) -> pd.DataFrame:
    """`micro P@1 low` / `high` right after each headline column (when logged), and the
    `tied for best` column of the sweep's paired comparisons (when computed)."""
    readable = {
        "micro/P_at_1": "micro P@1",
        "macro/P_at_1": "macro P@1",
        "micro/P_at_10": "micro P@10",
        "macro/P_at_10": "macro P@10",
    }
    for metric, column in readable.items():
        for offset, side in enumerate(("low", "high"), start=1):
            if f"{metric}_ci_{side}" in jobs:
                table.insert(
                    table.columns.get_loc(column) + offset,
                    f"{column} {side}",
                    jobs[f"{metric}_ci_{side}"].astype(float).round(4).to_numpy(),
                )
    if "tied for best" in jobs:
        table.insert(table.columns.get_loc("cache"), "tied for best", jobs["tied for best"].fillna("").to_numpy())
    return table


def console_table(jobs: pd.DataFrame, title: str):
    from rich import box
    from rich.table import Table

    colours = {"FINISHED": "green", "done earlier": "cyan", "FAILED": "red", "KILLED": "red", "RUNNING": "yellow"}
    table = Table(
        title=title, caption="modified P@N; cache: embeddings reused (hit) or computed (miss)", box=box.SIMPLE_HEAD
    )
    extra = extra_columns(jobs)
    tied = ["tied for best"] if "tied for best" in jobs else []
    for column, justify in (
        ("encoder", "left"),
        ("index", "left"),
        ("rows/class", "right"),
        *((c, "left") for c in extra),
        ("micro P@1", "right"),
        ("macro P@1", "right"),
        ("micro P@10", "right"),
        ("macro P@10", "right"),
        *((CLASSIFICATION_HEADLINE[m], "right") for m in classification_columns(jobs)),
        *((c, "left") for c in tied),
        ("cache", "left"),
        ("sec", "right"),
        ("status", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)
    if tied or any(f"{m}_ci_low" in jobs for m in HEADLINE_METRICS):
        table.caption += (
            "; \\[low, high]: bootstrap interval (eval.ci.level); tied for best: not distinguishable from the best "
            "(paired test, Holm-adjusted p >= 0.05; µ micro, M macro)"
        )
    for _, row in jobs.iterrows():
        metrics = [uncertainty.with_interval(row, m) for m in HEADLINE_METRICS]
        colour = colours.get(row["status"], "white")
        table.add_row(
            str(row["encoder"]),
            str(row["index_type"]),
            str(row["per_class"]),
            *(str(row[c]) for c in extra),
            *metrics,
            *(uncertainty.with_interval(row, m) for m in classification_columns(jobs)),
            *(str(row[c] or "") for c in tied),
            str(row["cache"]),
            f"{row['seconds']:.1f}",
            f"[{colour}]{row['status']}[/]",
        )
    return table


def modality_frame(jobs: pd.DataFrame, n: int = 1) -> pd.DataFrame:
    """Long table for the comparison figure: group, rows/class, subset (all or a modality),
    average (micro/macro), P@n; finished jobs only."""
    done = jobs[jobs["status"].isin(["FINISHED", "done earlier"])]
    varying = [c for c in ("index_type", "dataset", "labels") if done[c].nunique() > 1]
    done = done.drop_duplicates(["encoder", "per_class", *varying, "micro/P_at_1"])  # tasks sharing one retrieval
    rows = []
    for _, job in done.iterrows():
        group = SEPARATOR.join(str(job[c]) for c in ["encoder", *varying])
        subsets = {"all": ""} | {
            k.split("/")[1]: f"modality/{k.split('/')[1]}/" for k in job.index if str(k).startswith("modality/")
        }
        for subset, prefix in subsets.items():
            for avg in ("micro", "macro"):
                value = job.get(f"{prefix}{avg}/{metric_name(n)}")
                if value is not None and value == value:
                    rows.append(
                        {
                            "group": group,
                            "per_class": str(job["per_class"]),
                            "subset": subset,
                            "average": avg,
                            "value": float(value),
                        }
                    )
    return pd.DataFrame(rows)


def swept_keys(config: DictConfig) -> list[str]:
    """Config keys a multirun varies: comma-separated command-line values and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    keys += [str(k) for k in params]
    return list(dict.fromkeys(k.lstrip("+~") for k in keys))


# MLflow keeps the runs table's column choice in the browser, so a fresh browser shows no metric. A saved
# view (what the UI's "Share" button writes: an experiment tag `mlflow.sharedViewState.<key>`) is the one
# place the store can say which columns to show; an address with `viewStateShareKey=<key>` opens it.
RUNS_VIEW_KEY = "cbir-headline"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_COLUMNS = (
    *(f"metrics.`{m}`" for m in HEADLINE_METRICS),
    "params.`encoder.name`",
    "params.`index.type`",
    "params.`index.per_class`",
    "params.`dataset.name`",
)


def runs_view() -> str:
    """The saved view's tag value, in MLflow 3's envelope: the runs table sorted by micro/P_at_1, best
    first, with the headline metrics and the identity params as columns."""
    import json

    state = {
        "searchFilter": "",
        "orderByKey": f"metrics.`{HEADLINE_METRICS[0]}`",
        "orderByAsc": False,
        "selectedColumns": list(RUNS_VIEW_COLUMNS),
    }
    stamp = int(time.time() * 1000)
    envelope = {"name": "cbir: headline metrics", "createdAt": stamp, "updatedAt": stamp, "state": json.dumps(state)}
    return json.dumps(envelope)


# The UI's "Model training" side (MLflow 3 otherwise opens an experiment on its GenAI overview)
# and, for the runs table, the saved view (columns and sort); both are URL parameters of MLflow's UI.
# The UI ignores the saved view when the address also carries a sort or filter of its own.
TRAINING_VIEW = "workflowType=machine_learning"
HEADLINE_VIEW = f"viewStateShareKey={RUNS_VIEW_KEY}"


def ui_address(uri: str, experiment_id: str, run_id: str | None = None, artifact: str | None = None) -> tuple[str, str]:
    """(command that starts a UI for this store, the page to open in it): the run (or one of its
    artifacts) on the Model-training side, or without a run the runs table in the saved view
    (headline metrics as columns, sorted by micro/P_at_1)."""
    if run_id:
        page = f"/runs/{run_id}" + (f"/artifacts/{artifact}" if artifact else "") + f"?{TRAINING_VIEW}"
    else:
        page = f"/runs?{TRAINING_VIEW}&{HEADLINE_VIEW}"
    if uri.startswith(("http://", "https://")):
        return "", f"{uri.rstrip('/')}/#/experiments/{experiment_id}{page}"
    return (
        f"mlflow ui --backend-store-uri {uri} --port 5000",
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}{page}",
    )


def annotate_run(tracker, cfg: DictConfig, out: Path) -> None:
    """At the start of a job run: experiment tags, and the full resolved config as an artifact."""
    if not tracker.enabled:
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    tag_experiment(MlflowClient(tracker.uri), mlflow.active_run().info.experiment_id)
    tracker.log_artifact(write_resolved_config(cfg, out), "config")
