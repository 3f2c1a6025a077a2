"""MLflow tracking: one run per job, params = the flattened resolved config.

The default store is SQLite (`sqlite:///mlruns/mlflow.db`) with artifacts under
`mlruns/artifacts`; `tracking.uri` may name an MLflow server instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# keys that change how a run looks or where it logs, not what it computes
COSMETIC_KEYS = ("extract.progress", "extract.num_workers", "tracking", "eval.search_batch_size", "paths.cache_dir")
MAX_PARAM_LENGTH = 6000


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists become their JSON text."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            else:
                out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig) -> str:
    """Hash of what a run computes: the resolved config minus cosmetic keys."""
    flat = flatten(resolved(cfg))
    kept = {k: v for k, v in flat.items() if not any(k == c or k.startswith(c + ".") for c in COSMETIC_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_uri(uri: str) -> str:
    """Make a relative SQLite URI absolute and create its folder (SQLite won't)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


class Tracker:
    """A thin layer over MLflow; `enabled=False` turns every call into a no-op."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None,
                 run_name: str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.run_name = run_name
        self.run_id: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Tracker":
        t = cfg.tracking
        return cls(uri=t.uri, experiment=t.experiment, artifact_root=t.get("artifact_root"),
                   run_name=t.get("run_name"), enabled=bool(t.enabled))

    def experiment_id(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        existing = mlflow.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        location = None
        if self.artifact_root and self.uri.startswith("sqlite:"):
            location = (Path(self.artifact_root).resolve()).as_uri()
        try:
            return mlflow.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # created meanwhile by a parallel job
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    @contextmanager
    def start(self, run_name: str, tags: dict[str, Any], params: dict[str, Any]):
        if not self.enabled:
            yield self
            return
        import mlflow

        experiment_id = self.experiment_id()
        with mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name or run_name,
                              tags={k: str(v) for k, v in tags.items() if v is not None}) as run:
            self.run_id = run.info.run_id
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
            try:
                yield self
            except BaseException as e:  # the run context marks the run FAILED; say why
                mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
                raise

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import math

            import mlflow

            finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            mlflow.log_metrics(finite, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            p = Path(path)
            if p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path)
            elif p.exists():
                mlflow.log_artifact(str(p), artifact_path)


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
