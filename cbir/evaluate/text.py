"""Text queries for encoders with a text tower: `task=text_retrieval` and `task=zero_shot`.

Prompts: one query per class, from templates over the class's modality, anatomy and finding
(`task.text.templates`, `{modality}`, `{anatomy}`, `{finding}`; modality codes spelled out by
`task.text.modality_names`). As CLIP_benchmark / open_clip's zero-shot builder: each prompt is
embedded and L2-normalised, the class's prompts are averaged and the mean normalised again.

- text_retrieval: each class's text embedding is a query against the same image index (index
  split, index.per_class) as image queries; modified P@N micro/macro, per modality and per
  level with the image queries' metric code (relevant = the class's index images; a class with
  no index image is excluded and counted). Micro and macro differ only by excluded classes:
  there is one query per class.
- zero_shot: each test image is given the class whose text embedding is most similar (cosine);
  probabilities = softmax(task.text.temperature x cosine) over the classes of the index split,
  the same class set as k-NN and the probe, scored with the same classification metrics.

Both take the job's data (embeddings, manifest rows, index rows, class text embeddings) and
return metrics and tables (the job's evaluation is cbir/job/evaluations/text_queries.py). Class text embeddings are cached
under `paths.cache_dir/text/`, keyed by the text tower (weights, tokenizer) and the prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cbir.common.errors import ConfigError

log = logging.getLogger(__name__)
TEXT_EVALUATIONS = ("text_retrieval", "zero_shot")
FIELDS = ("modality", "anatomy", "finding")


# ---------------------------------------------------------------------------- prompts
def class_parts(label: str) -> dict[str, str]:
    """`<MODALITY>/<anatomy>/<finding>` -> its three parts (the finding may itself hold '/')."""
    parts = str(label).split("/", 2)
    parts += [""] * (3 - len(parts))
    return dict(zip(FIELDS, parts))


def class_prompts(classes, templates, modality_names=None) -> list[list[str]]:
    """For each class, one prompt per template."""
    names = dict(modality_names or {})
    prompts = []
    for label in classes:
        parts = class_parts(label)
        parts["modality"] = names.get(parts["modality"], parts["modality"])
        prompts.append([str(t).format(**parts) for t in templates])
    return prompts


def check_config(cfg: DictConfig) -> None:
    text = cfg.task.get("text")
    if text is None or not list(text.get("templates") or []):
        raise ConfigError(
            "task.text.templates: give at least one prompt template, e.g. "
            "'a {modality} image of the {anatomy} showing {finding}'"
        )
    for template in text.templates:
        try:
            str(template).format(modality="", anatomy="", finding="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"task.text.templates: '{template}' uses an unknown field ({e}); "
                f"the fields are {{{'}, {'.join(FIELDS)}}}"
            ) from None
    if float(text.temperature) <= 0:
        raise ConfigError(f"task.text.temperature={text.temperature}: must be positive")
    names = set(evaluations(cfg))
    from cbir.encoders.text import has_text_tower

    if names and not has_text_tower(cfg.encoder) and str(cfg.task.name) in TEXT_EVALUATIONS:
        raise ConfigError(
            f"task={cfg.task.name}: encoder {cfg.encoder.name} has no text tower; use an encoder with one "
            "(clip, biomedclip, bmc_clip, medsiglip) or task=all, which skips the text tasks"
        )


def evaluations(cfg: DictConfig) -> list[str]:
    task = cfg.get("task")
    return [n for n in (list(task.evaluations) if task is not None else []) if n in TEXT_EVALUATIONS]


# ---------------------------------------------------------------------------- text embeddings
def class_embeddings(tower, prompts: list[list[str]], batch_size: int = 64) -> np.ndarray:
    """(C, dim): per class, the mean of its L2-normalised prompt embeddings, normalised again."""
    import torch

    flat = [p for class_prompts_ in prompts for p in class_prompts_]
    per_prompt = torch.nn.functional.normalize(tower.encode(flat, batch_size), dim=-1)
    counts = [len(p) for p in prompts]
    means = torch.stack([chunk.mean(0) for chunk in torch.split(per_prompt, counts)])
    return torch.nn.functional.normalize(means, dim=-1).numpy().astype(np.float32)


def prompts_key(tower, prompts: list[list[str]]) -> str:
    blob = json.dumps({"tower": tower.identity(), "prompts": prompts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_class_embeddings(
    tower, prompts: list[list[str]], cache_dir: str | Path, batch_size: int = 64
) -> tuple[np.ndarray, bool]:
    """Class text embeddings from the cache when the same tower and prompts made them; else
    computed and stored (atomically; a damaged file is recomputed, never trusted)."""
    folder = Path(cache_dir) / "text"
    key = prompts_key(tower, prompts)
    path = folder / f"{key}.npy"
    if path.is_file():
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(prompts) and vectors.dtype == np.float32 and np.isfinite(vectors).all():
                return vectors, True
            log.warning("text embedding cache %s does not fit its prompts: recomputing", path)
        except (OSError, ValueError) as e:
            log.warning("text embedding cache %s unreadable (%s): recomputing", path, e)
    vectors = class_embeddings(tower, prompts, batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy.tmp", delete=False) as handle:
        np.save(handle, vectors, allow_pickle=False)
    os.replace(handle.name, path)
    (folder / f"{key}.json").write_text(
        json.dumps({"tower": tower.identity(), "prompts": prompts}, default=str, indent=1)
    )
    return vectors, False


# ---------------------------------------------------------------------------- evaluations
def text_retrieval(
    table: pd.DataFrame,
    classes,
    class_vectors: np.ndarray,
    index,
    index_rows: np.ndarray,
    ns,
    levels=("modality", "anatomy"),
    batch_size: int = 4096,
):
    """One text query per class against the image index (FAISS, over `index_rows` in order)."""
    from cbir.evaluate import index as cbir_index
    from cbir.evaluate.metrics import evaluate

    columns = ["label", "modality", "anatomy"]
    queries = pd.DataFrame(
        [
            {"label": str(c), "modality": class_parts(c)["modality"], "anatomy": class_parts(c)["anatomy"]}
            for c in classes
        ],
        columns=columns,
    )
    k = min(max(int(n) for n in ns), len(index_rows))
    _, neighbours = cbir_index.search(index, np.ascontiguousarray(class_vectors, dtype=np.float32), k, batch_size)
    return evaluate(queries, table.iloc[index_rows][columns], neighbours, None, ns=ns, levels=levels)


def zero_shot(
    table: pd.DataFrame,
    embeddings: np.ndarray,
    test_rows: np.ndarray,
    classes,
    class_vectors: np.ndarray,
    temperature: float = 100.0,
    train_counts=None,
):
    """Zero-shot classification of `test_rows` over `classes` (sorted; the index split's classes).
    Returns (ClassificationResult, number of test rows left out because their class is not among
    `classes`)."""
    from cbir.evaluate import classification
    from cbir.evaluate import index as cbir_index
    from cbir.evaluate.tasks import class_codes

    classes = np.asarray([str(c) for c in classes])
    truth = class_codes(table["label"].astype(str).to_numpy()[test_rows], classes)
    keep = truth >= 0
    rows = test_rows[keep]
    images = cbir_index.l2_normalise(np.asarray(embeddings[rows], dtype=np.float32))
    logits = float(temperature) * (images @ class_vectors.T).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    result = classification.evaluate(
        truth[keep], probabilities, classes, table["modality"].to_numpy()[rows], train_counts
    )
    return result, int((~keep).sum())
