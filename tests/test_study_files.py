"""cbir reads the study's own files: a split CSV and an HDF5 embedding file written here by hand,
the way the study's scripts write them (SPEC §10), not by cbir's fabricator or exporter, then
read through cbir's readers and checked against the values written."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from cbir.data.study_splits import StudySplitsDataset
from cbir.encoders.precomputed import PrecomputedEncoder
from cbir.extract.single import extract_embeddings
from cbir.extract.store import EmbeddingStore

CLASSES = ["XR/chest/No Finding", "XR/chest/Atelectasis", "XR/chest/Pleural Effusion"]
# filepath (relative to the common data folder), split, class; nih14 as the study's script lays it out
ROWS = [  # not in key order: HDF5 lists keys by name, the CSV does not
    ("nih14/images_012/images/00030801_001.png", "test", "XR/chest/Pleural Effusion"),
    ("nih14/images_001/images/00000001_000.png", "train", "XR/chest/No Finding"),
    ("nih14/images_001/images/00000002_000.png", "train", "XR/chest/Atelectasis"),
    ("nih14/images_002/images/00001336_000.png", "train", "XR/chest/Pleural Effusion"),
    ("nih14/images_002/images/00001337_001.png", "val", "XR/chest/Atelectasis"),
    ("nih14/images_012/images/00030805_000.png", "test", "XR/chest/No Finding"),
]
EXTRACT = OmegaConf.create(
    {
        "batch_size": 4,
        "num_workers": 0,
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "precision": "32-true",
        "progress": False,
    }
)


@pytest.fixture()
def study_folder(tmp_path):
    """<tmp>/datasets/nih14.csv and <tmp>/embeddings/BiomedCLIPVitB16_224/nih14.h5, plus the vectors."""
    (tmp_path / "datasets").mkdir()
    with (tmp_path / "datasets" / "nih14.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "dataset", "split", "modality", "anatomic_region", *CLASSES])
        for path, split, label in ROWS:
            writer.writerow([path, "nih14", split, "XR", "chest", *(int(c == label) for c in CLASSES)])
        # an image the study's script did not find on disk: no embedding exists for it
        writer.writerow(["File Missing", "nih14", "train", "XR", "chest", 0, 1, 0])
    raw = np.random.default_rng(3).normal(size=(len(ROWS), 8)).astype(np.float32)
    vectors = raw / np.linalg.norm(raw, axis=1, keepdims=True)  # what the study stores: L2-normalised
    folder = tmp_path / "embeddings" / "BiomedCLIPVitB16_224"
    folder.mkdir(parents=True)
    with h5py.File(folder / "nih14.h5", "w") as h5f:
        # written in another order than the CSV: the reader must go by key, not by position
        for i in reversed(range(len(ROWS))):
            h5f.create_dataset(ROWS[i][0], data=vectors[i])  # "a/b/c.png": nested groups a -> b -> c.png
    return tmp_path, vectors


def test_the_hand_written_files_are_what_the_study_writes(study_folder):
    folder, vectors = study_folder
    with h5py.File(folder / "embeddings" / "BiomedCLIPVitB16_224" / "nih14.h5", "r") as h5f:
        assert list(h5f.keys()) == ["nih14"] and isinstance(h5f["nih14/images_001"], h5py.Group)
        stored = h5f[ROWS[0][0]]
        assert stored.dtype == np.float32 and stored.shape == (8,)
        assert np.linalg.norm(stored[()]) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_array_equal(stored[()], vectors[0])


def test_cbir_reads_the_split_csv_row_by_row(study_folder):
    folder, _ = study_folder
    data = StudySplitsDataset(root=folder, dir=folder / "datasets", images_needed=False)
    table = data.load_manifest().table
    assert table["path"].tolist() == [path for path, _, _ in ROWS]  # the File Missing row is gone
    assert table["split"].tolist() == [split for _, split, _ in ROWS]
    assert table["label"].tolist() == [label for _, _, label in ROWS]
    assert set(table["modality"]) == {"XR"} and set(table["anatomy"]) == {"chest"}
    assert set(table["dataset"]) == {"nih14"}
    assert sum(data.last_scan.dropped.values()) == 1 and "File Missing" in next(iter(data.last_scan.dropped))


def test_cbir_reads_each_embedding_by_its_key(study_folder, tmp_path):
    folder, vectors = study_folder
    manifest = StudySplitsDataset(root=folder, dir=folder / "datasets", images_needed=False).load_manifest()
    encoder = PrecomputedEncoder("biomedclip", dir=folder / "embeddings")
    assert encoder.dim == 8
    read = extract_embeddings(encoder, manifest, EmbeddingStore(tmp_path / "cache"), EXTRACT, on_error="raise")
    assert read.valid.all()
    np.testing.assert_array_equal(np.asarray(read.embeddings), vectors)  # row i = the vector written for path i
