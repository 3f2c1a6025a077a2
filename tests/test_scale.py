"""The evaluation at scale: the embeddings read block by block (from the cache's memory map),
IVF parameters from the index size, and the recall of approximate search measured and logged."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cbir.evaluate.index import build_index, l2_normalise, search, sized_params
from cbir.evaluate.metrics import evaluate
from cbir.evaluate.retrieval import (
    NormalisedRows,
    RetrievalSetup,
    neighbour_recall,
    run_retrieval,
)

FLAT = OmegaConf.create({"type": "flat", "use_gpu": False, "params": {}})


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """2,000 rows of 16-d vectors around 40 centres (4 classes), unnormalised, saved as .npy and
    opened as a memory map like the cache; splits overlap on 50 rows (queries also in the index)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16)) * 3
    which = rng.integers(0, 40, 2000)
    vectors = (centres[which] + rng.standard_normal((2000, 16))).astype(np.float32) * rng.uniform(0.5, 2, (2000, 1))
    file = tmp_path_factory.mktemp("scale") / "embeddings.npy"
    np.save(file, vectors.astype(np.float32))
    table = pd.DataFrame({"label": [f"XR/chest/{c % 4}" for c in which], "modality": "XR", "anatomy": "chest"})
    setup = RetrievalSetup(index_rows=np.arange(0, 1600), query_rows=np.arange(1550, 2000))
    return table, np.load(file, mmap_mode="r"), setup


def test_blocked_evaluation_gives_exactly_the_metrics_of_one_pass(clustered):
    """Queries read, normalised and searched in blocks of 7 from the memory map; the index built
    block by block: the same metrics as normalising everything and searching at once."""
    table, embeddings, setup = clustered
    index = build_index(l2_normalise(embeddings[setup.index_rows]), "flat", use_gpu=False)
    own = pd.Series(np.arange(1600), index=setup.index_rows).reindex(setup.query_rows).fillna(-1).astype(int).to_numpy()
    _, neighbours = search(index, l2_normalise(embeddings[setup.query_rows]), 20, batch_size=10_000, exclude=own)
    columns = ["label", "modality", "anatomy"]
    one_pass = evaluate(
        table.iloc[setup.query_rows][columns],
        table.iloc[setup.index_rows][columns],
        neighbours,
        own,
        ns=[1, 3, 5, 10],
        curve_k=20,
    )
    blocked, found = run_retrieval(
        table, embeddings, setup, FLAT, [1, 3, 5, 10], curve_k=20, batch_size=7, return_search=True
    )
    assert blocked.metrics == one_pass.metrics
    np.testing.assert_array_equal(found.neighbours, neighbours)
    assert "index/recall_at_10" not in blocked.metrics  # exact search: nothing to measure


def test_ivf_parameters_come_from_the_index_size():
    assert sized_params("ivf", {"nlist": None, "nprobe": None}, 1_280_000) == {"nlist": 2263, "nprobe": 47}
    assert sized_params("ivf", {"nlist": None, "nprobe": None}, 80_000) == {"nlist": 566, "nprobe": 32}
    assert sized_params("ivf", {"nlist": None, "nprobe": None}, 100) == {"nlist": 2, "nprobe": 2}
    assert sized_params("ivf", {"nlist": 64, "nprobe": 4}, 1_280_000) == {"nlist": 64, "nprobe": 4}  # as given
    assert sized_params("flat", {}, 1_280_000) == {}


def test_approximate_search_logs_its_recall_and_warns_when_low(clustered, caplog):
    table, embeddings, setup = clustered
    good = run_retrieval(
        table,
        embeddings,
        setup,
        OmegaConf.create({"type": "ivf", "use_gpu": False, "params": {"nlist": None, "nprobe": None}}),
        [1, 10],
    )
    assert good.metrics["index/recall_at_10"] >= 0.99
    with caplog.at_level(logging.WARNING, logger="cbir.evaluate.retrieval"):
        poor, found = run_retrieval(
            table,
            embeddings,
            setup,
            OmegaConf.create({"type": "ivf", "use_gpu": False, "params": {"nlist": 40, "nprobe": 1}}),
            [1, 10],
            return_search=True,
        )
    recall = poor.metrics["index/recall_at_10"]
    assert recall < 0.99 and "recall@10 against exact search" in caplog.text
    # the same figure from an exact search of all queries, done here in one piece
    exact = build_index(l2_normalise(embeddings[setup.index_rows]), "flat", use_gpu=False)
    own = np.where(setup.query_rows < 1600, setup.query_rows, -1)
    _, truth = search(exact, l2_normalise(embeddings[setup.query_rows]), 10, exclude=own)
    expected = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found.neighbours[:, :10])])
    assert recall == pytest.approx(expected)
    assert (
        neighbour_recall(
            NormalisedRows(embeddings, setup.index_rows),
            NormalisedRows(embeddings, setup.query_rows),
            own,
            truth,
            block=300,
        )
        == 1.0
    )  # exact neighbours, index scanned in 6 blocks


def test_an_unset_nprobe_is_the_smallest_that_reaches_the_tuning_recall(clustered):
    """The size-based default probes every list of this small index (more than enough): the tuning
    halves it while the sampled recall stays >= 0.995, so the search scans fewer lists."""
    from cbir.evaluate.retrieval import MIN_TUNED_NPROBE, TUNE_RECALL

    table, embeddings, setup = clustered

    def ivf(nprobe):
        params = {"nlist": 40, "nprobe": nprobe}
        return run_retrieval(
            table, embeddings, setup, OmegaConf.create({"type": "ivf", "use_gpu": False, "params": params}), [1, 10]
        )

    default = sized_params("ivf", {"nlist": 40, "nprobe": None}, len(setup.index_rows))["nprobe"]
    tuned = ivf(None)
    chosen = int(tuned.metrics["index/nprobe"])
    assert MIN_TUNED_NPROBE <= chosen < default and tuned.metrics["index/recall_at_10"] >= TUNE_RECALL
    assert ivf(chosen).metrics["micro/P_at_1"] == tuned.metrics["micro/P_at_1"]  # the nprobe logged is the one used
    if chosen > MIN_TUNED_NPROBE:
        assert ivf(max(MIN_TUNED_NPROBE, chosen // 2)).metrics["index/recall_at_10"] < TUNE_RECALL


def test_nprobe_tuning_halves_and_doubles_to_the_smallest_that_reaches_the_target():
    """tuned_nprobe against recall computed here with FAISS directly at every nprobe of the ladder,
    on data where few lists are not enough: from nprobe 1 it doubles to the first that reaches
    TUNE_RECALL; from all 64 lists it halves while the target holds and stops at the first half
    that misses it; the index keeps the value returned."""
    import faiss

    from cbir.evaluate.retrieval import TUNE_RECALL, tuned_nprobe

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((200, 16))[rng.integers(0, 200, 4000)] + rng.standard_normal((4000, 16))
    index_rows, queries = (
        l2_normalise(vectors[:3500].astype(np.float32)),
        l2_normalise(vectors[3500:].astype(np.float32)),
    )
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 64, faiss.METRIC_INNER_PRODUCT)
    index.train(index_rows)
    index.add(index_rows)
    flat = faiss.IndexFlatIP(16)
    flat.add(index_rows)
    _, exact = flat.search(queries, 10)
    own = np.full(len(queries), -1)  # no query is an index row

    def recall(nprobe):
        index.nprobe = nprobe
        _, found = index.search(queries, 10)
        return np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found)])

    ladder = [1, 2, 4, 8, 16, 32, 64]
    passes = [p for p in ladder if recall(p) >= TUNE_RECALL]
    smallest = passes[0]
    assert 4 < smallest < 64 and recall(smallest // 2) < TUNE_RECALL  # both directions have work to do
    index.nprobe = 64
    assert tuned_nprobe(index, queries, own, exact, 1, 64) == smallest and index.nprobe == smallest
    index.nprobe = 1
    assert tuned_nprobe(index, queries, own, exact, 64, 64) == smallest and index.nprobe == smallest
