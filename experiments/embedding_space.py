"""The embedding space of each encoder: a 2-D projection (PCA, computed with numpy) coloured by
modality and by class, with the silhouette score (cosine distance) and the k-NN class purity
for class and modality labels. Figures and numbers are logged to each encoder's run of the
study sweep (artifact folder embedding_space/, metrics embedding/*), and gathered in
embedding_space.{csv,md}.

    python experiments/embedding_space.py data_dir=/data
    python experiments/embedding_space.py smoke=true
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.common import Context, main, run_embeddings, show  # noqa: E402


def stratified_sample(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """About `size` positions, the same share of every class (at least one each)."""
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    share = size / len(labels)
    picked = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        picked.append(rng.choice(members, max(1, round(share * len(members))), replace=False))
    return np.sort(np.concatenate(picked))


def describe(ctx: Context, run_id: str, encoder: str) -> dict:
    from cbir.report import figures

    _, manifest, extraction = run_embeddings(ctx, ctx.job_overrides(run_id))
    table = manifest.table
    rows = np.flatnonzero((table["split"].to_numpy() == ctx.cfg.split) & extraction.valid)
    rows = rows[stratified_sample(table["label"].to_numpy()[rows], int(ctx.cfg.sample), seed=0)]
    vectors = np.asarray(extraction.embeddings[rows], dtype=np.float32)
    labels, modalities = table["label"].to_numpy()[rows], table["modality"].to_numpy()[rows]
    k = int(ctx.cfg.knn)
    scores = {
        "embedding/silhouette_class": figures.silhouette(vectors, labels),
        "embedding/silhouette_modality": figures.silhouette(vectors, modalities),
        f"embedding/knn{k}_purity_class": figures.knn_purity(vectors, labels, k),
        f"embedding/knn{k}_purity_modality": figures.knn_purity(vectors, modalities, k),
        "embedding/sample_rows": float(len(rows)),
    }
    figure = figures.scatter_2d(
        figures.pca_2d(vectors),
        {"modality": modalities, "class": labels},
        ctx.out / f"embedding_space_{encoder}.png",
        f"{encoder}: PCA of {len(rows)} {ctx.cfg.split} embeddings  (silhouette by class "
        f"{scores['embedding/silhouette_class']:.3f}, {k}-NN class purity {scores[f'embedding/knn{k}_purity_class']:.3f})",
    )
    client = ctx.client()
    for name, value in scores.items():
        client.log_metric(run_id, name, float(value))
    client.log_artifact(run_id, str(figure), "embedding_space")
    return {
        "encoder": encoder,
        **{name.split("/", 1)[1]: value for name, value in scores.items()},
        "figure": figure.name,
    }


def run(cfg) -> dict:
    ctx = Context(cfg)
    runs, parents = ctx.sweep_runs()
    summary = pd.DataFrame([describe(ctx, row.run_id, row.encoder) for row in runs.itertuples()])
    files = {p.name: p for p in ctx.write_table(summary, "embedding_space")}
    files.update({name: ctx.out / name for name in summary["figure"]})
    ctx.keep(parents[-1], *files.values())
    show(summary, "embedding space")
    return files


if __name__ == "__main__":
    main("embedding_space", run)
