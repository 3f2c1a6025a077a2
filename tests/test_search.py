"""Retrieval in practice: the gallery of a run, index.save and the `cbir.search` round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cbir
from mlflow.tracking import MlflowClient
from PIL import Image

from cbir.report.gallery import HIT, MISS, draw_gallery, figure_size, sample_queries

pytestmark = pytest.mark.slow  # end-to-end: real runs and sweeps (deselect with -m "not slow")

ENCODERS = {
    # a random-init network: the search must rebuild the very same weights from the saved seed
    # (the harder case; the weights-free baseline takes the same path without it)
    "dinov2_random": ["encoder=dinov2_small", "encoder.pretrained=false", "encoder.input_size=28"],
}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def saved_run(request, tmp_path_factory, shared_data_dir):
    cwd = tmp_path_factory.mktemp(f"search-{request.param}")
    run_cbir(
        cwd,
        "debug=smoke",
        *ENCODERS[request.param],
        "index.save=true",
        "hydra.run.dir=job",
        f"paths.data_dir={shared_data_dir}",
    )
    return cwd


def test_run_writes_gallery_and_index(saved_run):
    job = saved_run / "job"
    gallery = pd.read_csv(job / "gallery.csv")
    assert gallery["query_path"].nunique() == 8 and len(gallery) == 8 * 5
    assert gallery.groupby("query_path")["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    # stratified: every modality of the query split is shown
    assert {p.split("/")[0] for p in gallery["query_path"]} == {"CT", "MR", "US", "XR"}
    assert Image.open(job / "gallery.png").size == figure_size(8, 5)
    meta = json.loads((job / "index" / "index.json").read_text())
    manifest = pd.read_csv(job / "index" / "manifest.csv")
    assert meta["rows"] == len(manifest) and (manifest["split"] == "train").all()
    client = MlflowClient(f"sqlite:///{saved_run}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    assert {"index/index.faiss", "index/manifest.csv", "index/index.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "index")
    }
    assert {"gallery.png", "gallery.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_search_returns_the_runs_neighbours(saved_run):
    job = saved_run / "job"
    expected = pd.read_csv(job / "gallery.csv")
    root = Path(json.loads((job / "index" / "index.json").read_text())["root"])
    queries = list(dict.fromkeys(expected["query_path"]))[:4]
    images = ",".join(str(root / q) for q in queries)
    proc = run_cbir(
        saved_run,
        "search.index_dir=job/index",
        f"search.images=[{images}]",
        "search.k=5",
        "search.output=found.csv",
        "search.gallery=found.png",
        module="cbir.search",
    )
    assert "similarity" in proc.stdout
    found = pd.read_csv(saved_run / "found.csv")
    for query in queries:
        ours = found[found["query"] == str(root / query)].sort_values("rank")
        theirs = expected[expected["query_path"] == query].sort_values("rank")
        assert [str(Path(p).relative_to(root)) for p in ours["path"]] == list(theirs["path"])
        assert list(ours["label"]) == list(theirs["label"])
        np.testing.assert_allclose(ours["similarity"], theirs["similarity"], atol=1e-4)
    assert Image.open(saved_run / "found.png").size == figure_size(4, 5)


def test_search_refuses_the_runs_index_with_another_seed(saved_run, tmp_path):
    """Another seed rebuilds another random-init network of the same dimension: its neighbours would
    be unrelated, so the search stops before embedding any query."""
    import shutil

    folder = shutil.copytree(saved_run / "job" / "index", tmp_path / "index")
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**meta, "seed": meta["seed"] + 1}))
    query = Path(meta["root"]) / pd.read_csv(folder / "manifest.csv")["path"].iloc[0]
    proc = run_cbir(
        tmp_path, f"search.index_dir={folder}", f"search.images=[{query}]", module="cbir.search", check=False
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text and "similarity" not in text
    assert "is not the one the index was made with" in text
    assert "rebuild the index: python -m cbir.run debug=smoke encoder=dinov2_small" in text


def test_search_without_index_fails_clearly(tmp_path):
    # through the `cbir` command's entry point (it imports cbir.search rather than running it as __main__)
    proc = run_cbir(
        tmp_path, "search", f"search.index_dir={tmp_path}", "search.images=[x.png]", module="cbir.cli", check=False
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stdout + proc.stderr


def test_gallery_borders_and_stratified_sample(tmp_path):
    for i, value in enumerate((40, 120, 200)):
        Image.fromarray(np.full((20, 20), value, np.uint8)).save(tmp_path / f"{i}.png")
    table = pd.DataFrame(
        {"path": ["0.png", "1.png", "2.png"], "label": ["A", "A", "B"], "modality": ["CT", "CT", "MR"]}
    )
    path = draw_gallery(table, tmp_path, [0], [[1, 2]], [[0.9, 0.5]], tmp_path / "g.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    assert Image.open(path).size == figure_size(1, 2)
    for color in (HIT, MISS):  # one correct (green) and one wrong (red) neighbour
        rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(1) < 30).sum() > 50
    picked = sample_queries(table, np.array([0, 1, 2]), 2, seed=0)
    assert sorted(table["modality"][picked]) == ["CT", "MR"]
