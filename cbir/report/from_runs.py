"""`python -m cbir.report`: comparison tables from the runs in MLflow.

Writes into `report.output_dir`: table1.{md,csv} (rows encoders, columns P@1/3/5/10 micro |
macro, as the study's Table 1), per_modality.{md,csv}, saturation.{md,csv} when index sizes
vary, comparison.{md,csv} against published numbers when `report.reference` is set,
knn_classification.{md,csv} and linear_probe.{md,csv} (rows encoders, columns the
classification metrics) with knn_per_modality / probe_per_modality when such runs exist, and
report.md with all of them, and comparison.html (cbir.report.page: the interactive page).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cbir import CONFIG_DIR
from cbir.common import console
from cbir.evaluate import classification, multilabel, uncertainty
from cbir.evaluate.metrics import metric_name
from cbir.report import job_files as reporting
from cbir.tracking import records
from cbir.tracking import runs as tracking

log = logging.getLogger("cbir.report.from_runs")
console.quiet()
IDENTITY = ["encoder", "dataset", "labels", "index_type", "per_class", "task"]  # labels: single | multi


class ReportError(ValueError):
    pass


def load_runs(tracker: tracking.Tracker, runs: str, extra_filter: str | None) -> tuple[pd.DataFrame, str]:
    """FINISHED job runs as a table (tags + final metrics), latest run per config, and a
    description of the selection."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)
    experiment = client.get_experiment_by_name(tracker.experiment)
    if experiment is None:
        raise ReportError(
            f"tracking.experiment={tracker.experiment}: no such experiment in {tracker.uri}; run cbir.run first"
        )
    eid = experiment.experiment_id
    parent = sweep_parent(client, eid, runs)
    filters = ["attributes.status = 'FINISHED'", "tags.config_hash != ''"]
    if parent:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent}'")
    if extra_filter:
        filters.append(f"({extra_filter})" if " or " in extra_filter.lower() else extra_filter)
    found = client.search_runs(
        [eid], filter_string=" and ".join(filters), order_by=["attributes.start_time DESC"], max_results=50000
    )
    where = f"children of sweep run {parent}" if parent else f"all runs of experiment '{tracker.experiment}'"
    return runs_table(found), where


def sweep_runs_table(children: list) -> pd.DataFrame:
    """load_runs' table of one sweep (`report.runs=<parent>`) from its child runs, already searched."""
    finished = [r for r in children if r.info.status == "FINISHED" and r.data.tags.get("config_hash")]
    return runs_table(sorted(finished, key=lambda r: -r.info.start_time))  # newest first, as load_runs asks


def runs_table(found: list) -> pd.DataFrame:
    """MLflow runs, newest first, as load_runs' table: tags + final metrics, the newest run per config."""
    rows = [
        {
            "run_id": r.info.run_id,
            **{k: r.data.tags.get(k) for k in IDENTITY + ["config_hash"]},
            "query_set": r.data.tags.get("cbir.query_set"),
            "run": r.data.tags.get("mlflow.runName", r.info.run_id),
            **r.data.metrics,
        }
        for r in found
    ]
    table = pd.DataFrame(rows)
    if len(table):
        table["task"] = table["task"].fillna("retrieval")  # runs from before the task group
        table["labels"] = table["labels"].fillna("single")  # runs from before multi-label mode
        table = table.drop_duplicates("config_hash", keep="first")  # newest run of each config
    return table


def sweep_parent(client, experiment_id: str, runs: str) -> str | None:
    """The parent run `report.runs` selects: the latest sweep's, a given id, or none (all)."""
    if runs == "latest_sweep":
        sweeps = client.search_runs(
            [experiment_id],
            filter_string="tags.`cbir.role` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return sweeps[0].info.run_id if sweeps else None
    return None if runs == "all" else runs


def log_to_parent(cfg: DictConfig, files: dict[str, Path]) -> str | None:
    """Keep the report on the sweep's parent run (artifacts under report/), if it reports on one."""
    from mlflow.tracking import MlflowClient

    tracker = tracking.Tracker.from_config(cfg)
    client = MlflowClient(tracker.uri)
    experiment = client.get_experiment_by_name(tracker.experiment)
    parent = sweep_parent(client, experiment.experiment_id, str(cfg.report.runs)) if experiment else None
    if parent is None or not tracker.enabled:
        return None
    for path in files.values():
        tracking.retry_locked(client.log_artifact, parent, str(path), "report")
    return parent


def identity_columns(runs: pd.DataFrame) -> list[str]:
    """encoder, plus whichever of dataset / index type / index size differ between runs."""
    return ["encoder"] + [c for c in IDENTITY[1:] if c in runs and runs[c].nunique() > 1]


def retrieval_runs(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """The runs that evaluated retrieval (tasks retrieval and all)."""
    first = f"micro/{metric_name(min(ns))}"
    return runs[runs[first].notna()] if first in runs else runs.iloc[:0]


def table1(runs: pd.DataFrame, ns) -> pd.DataFrame:
    runs = retrieval_runs(runs, ns)
    ident = identity_columns(runs)
    columns = {
        f"{avg}/{metric_name(n)}{suffix}": f"{avg} P@{n}{label}"
        for avg in ("micro", "macro")
        for n in ns
        for suffix, label in (("", ""), ("_ci_low", " low"), ("_ci_high", " high"))
    }  # bounds: see to_markdown
    table = runs[ident + [c for c in columns if c in runs]].rename(columns=columns)
    return table.sort_values(ident, key=_natural).reset_index(drop=True)


def _natural(column: pd.Series) -> pd.Series:
    """Sort index sizes as numbers (3 < 10 < all), everything else as text."""
    if column.name == "per_class":
        return pd.to_numeric(column, errors="coerce").fillna(float("inf"))
    return column


def per_modality(runs: pd.DataFrame, ns) -> pd.DataFrame:
    runs = retrieval_runs(runs, ns)
    if runs.empty:
        return pd.DataFrame()
    ident = identity_columns(runs)
    rows = []
    bounds = {"": "", "_ci_low": " low", "_ci_high": " high"}  # interval bounds, shown by to_markdown
    for _, run in runs.iterrows():
        for key in run.index:
            parts = str(key).split("/")
            suffix = next((b for b in ("_ci_low", "_ci_high") if parts[-1].endswith(b)), "")
            if (
                len(parts) == 4
                and parts[0] == "modality"
                and parts[2] in ("micro", "macro")
                and parts[3].removesuffix(suffix) in {metric_name(n) for n in ns}
                and run[key] == run[key]
            ):
                rows.append(
                    {
                        **{c: run[c] for c in ident},
                        "modality": parts[1],
                        "average": parts[2],
                        "N": int(parts[3].removesuffix(suffix).rsplit("_", 1)[1]),
                        "bound": bounds[suffix],
                        "value": run[key],
                    }
                )
    if not rows:
        return pd.DataFrame()
    long = pd.DataFrame(rows)
    wide = long.pivot_table(index=ident + ["modality"], columns=["average", "N", "bound"], values="value")
    wide.columns = [f"{avg} P@{n}{bound}" for avg, n, bound in wide.columns]
    ordered = [
        f"{avg} P@{n}{bound}"
        for avg in ("micro", "macro")
        for n in ns
        for bound in bounds.values()
        if f"{avg} P@{n}{bound}" in wide
    ]  # as table1
    return wide[ordered].reset_index().sort_values(ident + ["modality"], key=_natural).reset_index(drop=True)


def saturation(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """P@N per encoder and index size, with readable column names."""
    runs = retrieval_runs(runs, ns)
    if runs["per_class"].nunique() < 2:
        return pd.DataFrame()
    frame = reporting.saturation_frame(runs, ns)
    names = {
        "group": "encoder",
        "per_class": "rows/class",
        "step": "max rows/class in index",
        **{f"{avg}/{metric_name(n)}": f"{avg} P@{n}" for avg in ("micro", "macro") for n in ns},
    }
    return frame.rename(columns=names)


def classification_table(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Rows: runs with `<prefix>/` metrics (knn | probe); columns: the test metrics and k or the
    selected epoch."""
    if f"{prefix}/accuracy" not in runs:
        return pd.DataFrame()
    runs = runs[runs[f"{prefix}/accuracy"].notna()]
    ident = identity_columns(runs)
    chosen = {"knn": {"knn/k": "k"}, "probe": {"probe/best_epoch": "best epoch (from 0)"}, "zero_shot": {}}[prefix]
    columns = {
        f"{prefix}/{name}{suffix}": classification.LABELS[name] + label
        for name in classification.METRICS
        for suffix, label in (("", ""), ("_ci_low", " low"), ("_ci_high", " high"))
    }
    columns.update(chosen)
    table = runs[ident + [c for c in columns if c in runs]].rename(columns=columns)
    for column in chosen.values():
        if column in table:
            table[column] = table[column].astype(int)
    return table.sort_values(ident, key=_natural).reset_index(drop=True)


def text_table(runs: pd.DataFrame, ns) -> pd.DataFrame:
    """Rows: runs with text-query metrics (`text/...`); columns: P@N micro | macro."""
    columns = {f"text/{avg}/{metric_name(n)}": f"{avg} P@{n}" for avg in ("micro", "macro") for n in ns}
    first = next(iter(columns))
    if first not in runs:
        return pd.DataFrame()
    runs = runs[runs[first].notna()]
    ident = identity_columns(runs)
    table = runs[ident + [c for c in columns if c in runs]].rename(columns=columns)
    return table.sort_values(ident, key=_natural).reset_index(drop=True)


def classification_per_modality(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Rows: (run identity, modality); columns: the test metrics within that modality's queries."""
    keys = [k for k in runs.columns if str(k).startswith(f"{prefix}/modality/")]
    if not keys:
        return pd.DataFrame()
    runs = runs[runs[f"{prefix}/accuracy"].notna()]
    ident = identity_columns(runs)
    rows = []
    for _, run in runs.iterrows():
        for modality in sorted({str(k).split("/")[2] for k in keys}):
            values = {
                classification.LABELS[m]: run.get(f"{prefix}/modality/{modality}/{m}") for m in classification.METRICS
            }
            if any(pd.notna(v) for v in values.values()):
                rows.append({**{c: run[c] for c in ident}, "modality": modality, **values})
    return (
        pd.DataFrame(rows).sort_values(ident + ["modality"], key=_natural).reset_index(drop=True)
        if rows
        else pd.DataFrame()
    )


def comparison(table: pd.DataFrame, reference: Path, ns) -> pd.DataFrame:
    """Measured minus published, per encoder and cell."""
    ref = pd.read_csv(reference)
    out = []
    for _, row in table.iterrows():
        match = ref[ref["encoder"] == row["encoder"]]
        if match.empty:
            continue
        item = {c: row[c] for c in table.columns if "P@" not in str(c)}  # the run's identity (encoder, ...)
        for avg in ("micro", "macro"):
            for n in ns:
                column = f"{avg}_p{n}"
                if column in ref and f"{avg} P@{n}" in row:
                    paper = float(match.iloc[0][column])
                    item[f"{avg} P@{n}"] = (
                        f"{row[f'{avg} P@{n}']:.3f} ({row[f'{avg} P@{n}'] - paper:+.3f} vs {paper:.3f})"
                    )
        out.append(item)
    return pd.DataFrame(out)


def to_markdown(frame: pd.DataFrame) -> str:
    """A Markdown (pipe) table, floats to 3 decimals: pandas through tabulate. A column with
    `<column> low` / `<column> high` beside it (bootstrap bounds) is shown as `0.409 [0.37, 0.45]`."""
    from cbir.evaluate.uncertainty import merge_interval_columns

    return merge_interval_columns(frame).to_markdown(index=False, floatfmt=".3f") + "\n"


def write_report(cfg: DictConfig) -> dict[str, Path]:
    from mlflow.tracking import MlflowClient

    from cbir.report import page as comparison_page

    tracker = tracking.Tracker.from_config(cfg)
    runs, where = load_runs(tracker, str(cfg.report.runs), cfg.report.get("filter"))
    if runs.empty:
        raise ReportError(f"no FINISHED runs found ({where}); run `python -m cbir.run` first or change report.runs")
    ns = list(cfg.report.ns)
    out = Path(cfg.report.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "table1": table1(runs, ns),
        "per_modality": per_modality(runs, ns),
        "saturation": saturation(runs, ns),
        "knn_classification": classification_table(runs, "knn"),
        "linear_probe": classification_table(runs, "probe"),
        "zero_shot": classification_table(runs, "zero_shot"),
        "text_retrieval": text_table(runs, ns),
        "knn_per_modality": classification_per_modality(runs, "knn"),
        "probe_per_modality": classification_per_modality(runs, "probe"),
    }
    tables["multilabel"] = multilabel.report_table(runs, ns, identity_columns)  # empty without labels=multi runs
    tables["paired_comparisons"], tables["tied_for_best"] = paired_comparisons(cfg, runs, ns)
    if cfg.report.get("reference"):
        single = runs[runs["labels"] == "single"] if "labels" in runs else runs  # the study's setting
        tables["comparison"] = comparison(table1(single, ns), Path(cfg.report.reference), ns)
    titles = {
        "table1": "Retrieval precision (modified P@N)",
        "per_modality": "Per modality",
        "saturation": "Saturation (P@N against index rows per class)",
        "comparison": "Against the published numbers",
        "multilabel": "Multi-label retrieval (dataset.labels=multi): relevant = shares a finding; macro over "
        "findings; nDCG gain = Jaccard overlap of the finding sets",
        "knn_classification": "k-NN classification (test split; k chosen on val)",
        "linear_probe": "Linear probe (test split; epoch chosen on val)",
        "zero_shot": "Zero-shot classification (test split; class prompts of the text tower)",
        "text_retrieval": "Text queries (one per class, prompts averaged; modified P@N against the image index)",
        "knn_per_modality": "k-NN classification per modality",
        "probe_per_modality": "Linear probe per modality",
        "tied_for_best": "Tied for best (paired sign-flip test against the best, Holm-adjusted p >= 0.05)",
        "paired_comparisons": "Paired comparisons (runs that answered the same queries; difference A - B with "
        "its bootstrap interval, sign-flip p and Holm-adjusted p)",
    }
    files, sections = {}, [f"# cbir report\n\nRuns: {where} ({len(runs)} runs).\n"]
    for name, frame in tables.items():
        if frame.empty:
            continue
        files[f"{name}.csv"] = out / f"{name}.csv"
        frame.to_csv(files[f"{name}.csv"], index=False)
        files[f"{name}.md"] = out / f"{name}.md"
        files[f"{name}.md"].write_text(to_markdown(frame))
        sections.append(f"## {titles[name]}\n\n{to_markdown(frame)}")
    files[comparison_page.PAGE_NAME] = comparison_page.write_page(
        runs,
        ns,
        out / comparison_page.PAGE_NAME,
        f"cbir report: {where}",
        _tied(tables["tied_for_best"], runs),
        comparison_page.per_class_tables(MlflowClient(tracker.uri), runs),
    )
    files["report.md"] = out / "report.md"
    files["report.md"].write_text("\n".join(sections))
    if len(tables["table1"]):
        _print(tables["table1"], where, ns)
    return files


def _tied(tied: pd.DataFrame, runs: pd.DataFrame) -> dict[str, str] | None:
    """run name -> metrics it is tied for best on (as comparisons.tied_labels), None when not computed."""
    from cbir.evaluate.comparisons import SHORT

    if tied.empty:
        return None
    labels = {name: "" for name in runs["run"]}
    for row in tied.itertuples():
        labels[row.run] = f"{labels.get(row.run, '')} {SHORT.get(row.metric, row.metric)}".strip()
    return labels


def paired_comparisons(cfg: DictConfig, runs: pd.DataFrame, ns) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, tied-for-best table) of the retrieval runs that answered the same queries."""
    from mlflow.tracking import MlflowClient

    from cbir.evaluate import comparisons

    runs = retrieval_runs(runs, ns)
    if "query_set" not in runs or runs["query_set"].isna().all():
        return pd.DataFrame(), pd.DataFrame()
    runs = runs.dropna(subset=["query_set"]).drop_duplicates(["query_set", "run"])
    downloaded = records.download_records(MlflowClient(tracking.Tracker.from_config(cfg).uri), runs["run_id"])
    settings = comparisons.ci_settings(cfg)
    pairs, verdicts = comparisons.compare_groups(
        pd.DataFrame({"name": runs["run"], "group": runs["query_set"], "run_id": runs["run_id"]}), downloaded, *settings
    )
    if verdicts.empty:
        return pairs, pd.DataFrame()
    tied = verdicts[verdicts["tied_for_best"]].sort_values(["group", "metric", "value"], ascending=[True, True, False])
    return pairs, tied.drop(columns="tied_for_best").rename(columns={"group": "queries"}).reset_index(drop=True)


def _print(frame: pd.DataFrame, where: str, ns) -> None:
    """Console view of Table 1; cells micro/macro so it fits a terminal."""
    table = Table(
        title=f"modified P@N — {where}",
        caption="cells: micro/macro" + ("; \\[low, high]: bootstrap interval" if "micro P@1 low" in frame else ""),
    )
    ident = [c for c in frame.columns if "P@" not in str(c)]
    for column in ident:
        table.add_column(str(column))
    for n in ns:
        table.add_column(f"P@{n}", justify="center")
    for _, row in frame.iterrows():
        cells = [
            "\n".join(
                uncertainty.fmt_interval(
                    row.get(f"{avg} P@{n}"), row.get(f"{avg} P@{n} low"), row.get(f"{avg} P@{n} high")
                )
                for avg in ("micro", "macro")
            )
            if f"micro P@{n} low" in row
            else f"{row.get(f'micro P@{n}', float('nan')):.3f}/{row.get(f'macro P@{n}', float('nan')):.3f}"
            for n in ns
        ]
        table.add_row(*[str(row[c]) for c in ident], *cells)
    Console(width=max(Console().width, 120)).print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    try:
        files = write_report(cfg)
    except ReportError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    parent = log_to_parent(cfg, files)
    if parent:
        log.info("logged to MLflow run %s (artifacts: report/)", parent)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
