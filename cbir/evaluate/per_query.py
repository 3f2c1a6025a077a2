"""A job's per-query records (`per_query.parquet`) and the intervals computed from them.

One row per test query: `row` (manifest position), path, class, modality, anatomy, P@N at each
N, the nearest index row and its cosine; with k-NN / linear probe: `<task>_predicted`,
`<task>_correct` and `<task>_prob/<class>` (columns of the training classes). Queries a task
left out (class without an index row) have empty cells in its columns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cbir.evaluate import uncertainty

log = logging.getLogger(__name__)
FILE = "per_query.parquet"


def check_config(cfg: DictConfig) -> None:
    """eval.ci, eval.audit and eval.exclude_same_patient, before any work."""
    from cbir.common.errors import ConfigError

    ci = cfg.eval.get("ci") or {}
    resamples, level, flips = (
        ci.get("resamples", 0),
        ci.get("level", 0.95),
        ci.get("flips", 10000),
    )
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise ConfigError(
            f"eval.ci.resamples={resamples}: give a whole number of resamples (1000), or 0 for no intervals"
        )
    if isinstance(flips, bool) or not isinstance(flips, int) or flips < 1:
        raise ConfigError(f"eval.ci.flips={flips}: give a positive number of sign flips, e.g. 10000")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ConfigError(f"eval.ci.level={level}: give a coverage between 0 and 1, e.g. 0.95")
    threshold = (cfg.eval.get("audit") or {}).get("near_duplicate", 0.999)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise ConfigError(f"eval.audit.near_duplicate={threshold}: give a cosine between -1 and 1, e.g. 0.999")
    exclude = cfg.eval.get("exclude_same_patient", False)
    if not isinstance(exclude, bool):
        raise ConfigError(f"eval.exclude_same_patient={exclude}: give true or false")


def ci_settings(cfg: DictConfig) -> tuple[int, float, int]:
    """(resamples, level, seed); resamples 0 turns intervals off."""
    ci = (cfg.get("eval") or {}).get("ci") or {}
    return (
        int(ci.get("resamples", 0) or 0),
        float(ci.get("level", 0.95)),
        int(cfg.get("seed", 0)),
    )


def retrieval_records(table: pd.DataFrame, search, result) -> pd.DataFrame:
    """The retrieval part of the records: the evaluation's per-query values with manifest rows."""
    setup = search.setup
    records = result.per_query.copy()
    records.insert(0, "path", table["path"].to_numpy()[setup.query_rows].astype(str))
    records.insert(0, "row", setup.query_rows)
    first = records.pop("first").to_numpy()
    records["neighbour_row"] = np.where(first >= 0, setup.index_rows[np.clip(first, 0, None)], -1)
    records["neighbour_cosine"] = search.scores[:, 0] if search.scores.shape[1] else np.nan
    return records


def add_retrieval_intervals(result, records: pd.DataFrame, cfg: DictConfig) -> None:
    """`<metric>_ci_low/_ci_high` of micro/macro P@N, overall and per modality, into result.metrics."""
    resamples, level, seed = ci_settings(cfg)
    ns = sorted(int(n) for n in cfg.eval.n)
    result.metrics.update(uncertainty.retrieval_intervals(records, ns, resamples, level, seed))


def multilabel_intervals(
    values: dict[str, np.ndarray],
    query: pd.DataFrame,
    cfg: DictConfig,
    prefix: str = "ml/",
) -> dict[str, float]:
    """Micro intervals of the multi-label per-query values (P@N, mAP@N, nDCG@N, R-precision),
    resampled within each query's class (label), overall and per modality."""
    resamples, level, seed = ci_settings(cfg)
    if resamples <= 0:
        return {}
    records = pd.DataFrame(
        {
            "class": query["label"].astype(str).to_numpy(),
            "modality": query["modality"].astype(str).to_numpy(),
            **values,
        }
    )
    out: dict[str, float] = {}
    subsets = [("", np.ones(len(records), bool))]
    subsets += [(f"modality/{m}/", (records["modality"] == m).to_numpy()) for m in sorted(records["modality"].unique())]
    for name in values:
        for subset, mask in subsets:
            part = records[mask]
            bounds = uncertainty.mean_intervals(
                part[name].to_numpy(),
                part["class"].to_numpy(),
                resamples,
                level,
                uncertainty.rng_for(seed, prefix + subset + name),
            )
            full = f"{prefix}{subset}micro/{name}"
            out[f"{full}_ci_low"], out[f"{full}_ci_high"] = bounds["micro"]
    return out


def classification_records(
    prefix: str, rows: np.ndarray, truth: np.ndarray, probabilities: np.ndarray, classes
) -> pd.DataFrame:
    classes = [str(c) for c in classes]
    predicted = np.asarray(probabilities).argmax(axis=1) if len(rows) else np.zeros(0, dtype=np.int64)
    frame = pd.DataFrame(
        {
            "row": np.asarray(rows),
            f"{prefix}_predicted": np.asarray(classes)[predicted] if len(rows) else np.array([], dtype=str),
            f"{prefix}_correct": predicted == np.asarray(truth),
        }
    )
    probs = pd.DataFrame(
        np.asarray(probabilities, dtype=np.float32),
        columns=[f"{prefix}_prob/{c}" for c in classes],
    )
    return pd.concat([frame, probs], axis=1)


def write(parts: list[pd.DataFrame], table: pd.DataFrame, out: Path) -> Path | None:
    """Join the parts on `row` and write per_query.parquet; None when no part has a row."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return None
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part, on="row", how="outer")
    if "path" not in merged or merged["path"].isna().any():
        merged["path"] = table["path"].to_numpy()[merged["row"].to_numpy()].astype(str)
        merged["class"] = table["label"].astype(str).to_numpy()[merged["row"].to_numpy()]
        merged["modality"] = table["modality"].astype(str).to_numpy()[merged["row"].to_numpy()]
    first = [c for c in ("row", "path", "class", "modality") if c in merged]
    merged = merged[first + [c for c in merged.columns if c not in first]].sort_values("row")
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE
    merged.to_parquet(path, index=False)
    return path


def shown_with_intervals(metrics: dict[str, float]) -> dict[str, str]:
    """`name: "0.409 [0.37, 0.45]"` for every metric that has an interval (for metrics files)."""
    return {name: uncertainty.with_interval(metrics, name) for name in metrics if f"{name}_ci_low" in metrics}


def add_shown(path: Path) -> None:
    """Put the `value [low, high]` strings into a job's metrics JSON file next to the numbers."""
    payload = json.loads(path.read_text())
    shown = shown_with_intervals(payload.get("metrics", {}))
    if shown:
        payload["with_intervals"] = shown
        path.write_text(json.dumps(payload, indent=1))
