"""What one step of a job hands to the record step: the same shape for every evaluation (and for
the embed step), so the record step logs all of them the same way and nothing else talks to MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    name: str  # the evaluation (or step) that produced it
    metrics: dict[str, float] = field(default_factory=dict)
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, metrics): curves, epochs
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # written into the job folder, logged at the run's root
    folders: dict[str, Path] = field(default_factory=dict)  # artifact path -> folder (the saved index)
    description: str | None = None  # the run's description: the first thing on its page
    tables: list[tuple[Any, int]] = field(default_factory=list)  # (rich table, width) for the console
    dataset: Any = None  # the job's manifest, logged as the run's MLflow dataset input
    model: Path | None = None  # a saved index folder, logged as the run's model `retriever`
    register_model: str | None = None  # ... and registered under this name
