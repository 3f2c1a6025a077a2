"""Dataset readers on miniature copies of each dataset's official layout: classes, splits,
dropped rows and why, caching, the prepare command, user collections."""

from __future__ import annotations

import os
import time
from pathlib import Path

import fixtures_datasets as fx
import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir
from hydra.utils import instantiate

from cbir.data.chexpert import CheXpertDataset
from cbir.data.csv_manifest import CSVManifestDataset
from cbir.data.folder import FolderDataset
from cbir.data.manifest import ManifestError
from cbir.data.mimic_cxr import MimicCXRDataset
from cbir.data.nih14 import NIH14Dataset
from cbir.data.radimagenet import RadImageNetDataset
from cbir.data.splits import split_patients
from cbir.data.stats import dataset_summary, manifest_digest

CHEST_20 = {
    f"XR/chest/{c}"
    for c in (
        "No Finding",
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Emphysema",
        "Fibrosis",
        "Pleural Thickening",
        "Hernia",
        "Enlarged Cardiomediastinum",
        "Fracture",
        "Lung Lesion",
        "Lung Opacity",
        "Pleural Other",
    )
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The study's $DATA folder with all four miniature datasets (built once, read-only)."""
    return fx.make_study_data(tmp_path_factory.mktemp("DATA"))


def counts(manifest, column="label") -> dict:
    return manifest.table[column].value_counts().to_dict()


def patients_of(table: pd.DataFrame, split: str, part: int) -> set:
    return {Path(p).parts[part] for p in table.loc[table["split"] == split, "path"]}


# ---------------------------------------------------------------------- patient split
def test_patient_split_equals_sklearn_train_test_split():
    import sklearn.model_selection as sklearn

    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 11, 29, 30, 101, 997):
        ids = rng.permutation(10 * n)[:n]
        for seed in (42, 0, 7):
            ours = split_patients(ids, 0.9, seed)
            theirs = sklearn.train_test_split(ids, train_size=0.9, random_state=seed)
            assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)), (n, seed)


def test_patient_split_of_one_patient_is_a_clear_error():
    with pytest.raises(ManifestError, match="at least one patient"):
        split_patients([7])


# ---------------------------------------------------------------------- RadImageNet
def test_radimagenet_classes_from_path_with_us_remapping(data):
    reader = RadImageNetDataset(data / "radiology_ai", ignore_list=str(data / "radiology_ai/ignore_list.txt"))
    m = reader.load_manifest()
    expected = dict(fx.RADIMAGENET_CLASSES, **{"CT/abd/normal": 3})  # one ignored
    assert counts(m) == expected
    assert not m.table["path"].str.startswith("radiology_ai/").any()  # relative to root
    assert all((m.root / p).is_file() for p in m.table["path"])
    us = m.table[m.table["modality"] == "US"]
    assert set(us["anatomy"]) == {"liver", "thyroid"}  # thyroid_nodule -> anatomy thyroid
    assert reader.last_scan.dropped == {"listed twice in one split file": 1, "in the ignore list": 1}
    assert fx.RADIMAGENET_IGNORED.split("/", 1)[1] not in set(m.table["path"])
    # the official split as given: last image of each folder test, the one before val (the
    # ignored CT/abd/normal image was a val image)
    assert m.table.groupby("split").size().to_dict() == {"train": 8, "val": 6, "test": 7}


def test_radimagenet_without_ignore_list_keeps_everything(data):
    m = RadImageNetDataset(data / "radiology_ai").load_manifest()
    assert counts(m)["CT/abd/normal"] == 4 and len(m) == 22


def test_radimagenet_missing_split_file_names_it(tmp_path):
    (tmp_path / "radiology_ai").mkdir()
    with pytest.raises(ManifestError, match="RadiologyAI_train.csv"):
        RadImageNetDataset(tmp_path / "radiology_ai").load_manifest()


# ---------------------------------------------------------------------- NIH ChestX-ray14
def test_nih14_labels_renames_and_dropped_rows(data):
    reader = NIH14Dataset(data / "nih14")
    m = reader.load_manifest()
    labels = set(m.table["label"])
    assert len(labels) == 15 and labels <= CHEST_20
    assert "XR/chest/Pleural Effusion" in labels and "XR/chest/Pleural Thickening" in labels
    assert not any("Effusion" == lab.split("/")[-1] or "_" in lab for lab in labels)
    multi = [r for r in fx.nih_rows() if "|" in r[1]]
    assert reader.last_scan.dropped == {
        "more than one finding (or none of the 15 names)": len(multi),
        "image file missing": 1,
    }
    names = {Path(p).name for p in m.table["path"]}
    assert fx.NIH_MISSING_IMAGE not in names and not names & {r[0] for r in multi}
    assert len(m) == len(fx.nih_rows()) - len(multi) - 1
    assert m.table["path"].str.match(r"images_00[12]/images/\d{8}_\d{3}\.png$").all()


def test_nih14_split_by_patient_as_the_study(data):
    sklearn = pytest.importorskip("sklearn.model_selection")
    m = NIH14Dataset(data / "nih14").load_manifest()
    patient = m.table["path"].map(lambda p: int(Path(p).name[:8]))
    by_split = {s: set(patient[m.table["split"] == s]) for s in ("train", "val", "test")}
    assert by_split["test"] == set(fx.NIH_TEST_PATIENTS)  # the official test list
    assert not by_split["train"] & by_split["val"] and not (by_split["train"] | by_split["val"]) & by_split["test"]
    # the study: train_test_split on unique Patient IDs of train_val rows, CSV order, before filtering
    train_ids, val_ids = sklearn.train_test_split(np.array(fx.NIH_TRAIN_VAL_PATIENTS), train_size=0.9, random_state=42)
    # every fixture patient keeps at least one single-finding image, so all of them show up
    assert by_split["train"] == set(train_ids) and by_split["val"] == set(val_ids) and len(val_ids) == 3


def test_nih14_accepts_the_v2020_file(tmp_path):
    fx.make_nih14(tmp_path, data_entry="Data_Entry_2017_v2020.csv")
    assert len(NIH14Dataset(tmp_path / "nih14").load_manifest()) > 0


# ---------------------------------------------------------------------- MIMIC-CXR-JPG
@pytest.mark.parametrize("gz", [False, True])
def test_mimic_labels_uncertain_zero_and_skips(tmp_path, gz):
    root = fx.make_mimic_cxr(tmp_path, gz=gz)
    reader = MimicCXRDataset(root)
    m = reader.load_manifest()
    assert counts(m) == {
        "XR/chest/No Finding": 2,
        "XR/chest/Pneumothorax": 2,
        "XR/chest/Edema": 1,
        "XR/chest/Cardiomegaly": 1,
    }  # Edema beside -1 kept; Support Devices ignored
    assert m.table.groupby("split").size().to_dict() == {"train": 3, "val": 1, "test": 2}  # validate -> val
    assert reader.last_scan.dropped == {"study has no row in the label file": 1, "not exactly one positive finding": 3}
    assert m.table["path"].str.match(r"files/p1\d/p1\d{7}/s5\d{7}/[0-9a-f-]{44}\.jpg$").all()
    assert not m.table["label"].str.contains("Support Devices").any()


def test_mimic_uncertain_drop_option(tmp_path):
    m = MimicCXRDataset(fx.make_mimic_cxr(tmp_path), uncertain="drop").load_manifest()
    assert "XR/chest/Edema" not in counts(m)


def test_mimic_missing_image_aborts_like_the_study_or_is_dropped(tmp_path):
    root = fx.make_mimic_cxr(tmp_path)
    victim = next((root / "files").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(ManifestError, match="missing.*dataset.missing=drop"):
        MimicCXRDataset(root).load_manifest()
    reader = MimicCXRDataset(root, missing="drop")
    assert len(reader.load_manifest()) == 5 and reader.last_scan.dropped["image file missing"] == 1


# ---------------------------------------------------------------------- CheXpert
def chexpert_patient(path: str) -> str:
    return Path(path).parts[2]


def test_chexpert_study_rules(data):
    reader = CheXpertDataset(data / "CheXpert")
    m = reader.load_manifest()
    t = m.table
    assert m.root == data / "CheXpert" and t["path"].str.startswith("CheXpert-v1.0/").all()
    assert set(t["label"]) <= CHEST_20 and len(set(t["label"])) == 13
    paths = set(t["path"])
    tricky = {p: f"CheXpert-v1.0/train/patient{p:05d}/study2/view1_frontal.jpg" for p in fx.CHEXPERT_TRICKY}
    assert tricky[25] in paths and t.loc[t["path"] == tricky[25], "label"].item() == "XR/chest/Edema"
    assert not {tricky[p] for p in (26, 27, 28, 29)} & paths
    assert reader.last_scan.dropped == {
        "uncertain (-1) label": 2,
        "not exactly one positive finding (train.csv)": 2,
        "not exactly one positive finding (valid.csv)": 2,
    }
    # valid.csv is the test split; laterals are kept (no view filtering)
    test = t[t["split"] == "test"]
    assert {chexpert_patient(p) for p in test["path"]} == {"patient64541", "patient64542", "patient64544"}
    assert t["path"].str.endswith("_lateral.jpg").sum() == fx.CHEXPERT_SINGLE_PATIENTS
    assert patients_of(t, "train", 2).isdisjoint(patients_of(t, "val", 2))


def test_chexpert_split_reproduces_the_study(data):
    sklearn = pytest.importorskip("sklearn.model_selection")
    t = CheXpertDataset(data / "CheXpert").load_manifest().table
    # the study splits the patients of rows with sum(labels, -1 included) == 1, in CSV order
    train_csv = pd.read_csv(data / "CheXpert/CheXpert-v1.0/train.csv").fillna(0.0).drop(columns=["Support Devices"])
    first_pass = train_csv[train_csv[train_csv.columns[5:]].sum(axis=1) == 1]
    patients = np.asarray(first_pass["Path"].map(chexpert_patient).unique())
    assert "patient00027" in patients  # two positives + one uncertain enter the split
    train_ids, val_ids = sklearn.train_test_split(patients, train_size=0.9, random_state=42)
    assert patients_of(t, "train", 2) == set(train_ids) - {"patient00027"}
    assert patients_of(t, "val", 2) == set(val_ids) - {"patient00027"}


def test_chexpert_uncertain_zero_keeps_uncertain_rows(data):
    t = CheXpertDataset(data / "CheXpert", uncertain="zero").load_manifest().table
    assert "CheXpert-v1.0/train/patient00026/study2/view1_frontal.jpg" in set(t["path"])


def test_chexpert_small_release(tmp_path):
    fx.make_chexpert(tmp_path, release="CheXpert-v1.0-small")
    m = CheXpertDataset(tmp_path / "CheXpert").load_manifest()
    assert m.table["path"].str.startswith("CheXpert-v1.0-small/train/").any()
    with pytest.raises(ManifestError, match="CheXpert-v1.0"):
        CheXpertDataset(tmp_path).load_manifest()


# ---------------------------------------------------------------------- combined
def test_combined_merges_classes_by_name(data, tmp_path):
    cfg = compose(
        "dataset=combined",
        f"dataset.root={data}",
        f"paths.cache_dir={tmp_path}",
        f"dataset.parts.radimagenet.ignore_list={data}/radiology_ai/ignore_list.txt",
    )
    reader = instantiate(cfg.dataset)
    m = reader.load_manifest()
    t = m.table
    assert m.root == data.resolve()
    assert list(t["dataset"].unique()) == ["nih14", "mimic_cxr", "radimagenet", "chexpert"]  # study order
    chest = {lab for lab in t["label"] if lab.startswith("XR/chest/")}
    assert chest == CHEST_20
    shared = t[t["modality"] == "XR"].groupby("label")["dataset"].nunique()
    assert shared["XR/chest/Pleural Effusion"] == 2  # NIH Effusion merges with CheXpert's
    assert set(t["label"]) == CHEST_20 | set(fx.RADIMAGENET_CLASSES)
    assert all((m.root / p).is_file() for p in t["path"])
    assert (
        t["path"]
        .str.startswith(
            ("nih14/", "mimic/files/mimic-cxr-jpg/2.0.0/files/", "radiology_ai/", "CheXpert/CheXpert-v1.0/")
        )
        .all()
    )
    assert (tmp_path / "manifests").is_dir()


def test_combined_can_leave_a_part_out(data, tmp_path):
    cfg = compose(
        "dataset=combined",
        f"dataset.root={data}",
        f"paths.cache_dir={tmp_path}",
        "dataset.parts.mimic_cxr=null",
        "dataset.parts.radimagenet=null",
    )
    assert set(instantiate(cfg.dataset).load_manifest().table["dataset"]) == {"nih14", "chexpert"}


# ---------------------------------------------------------------------- cache and prepare
def test_manifest_is_cached_and_rebuilt_when_inputs_change(tmp_path):
    root = fx.make_mimic_cxr(tmp_path / "data")
    cache = tmp_path / "cache"
    first = MimicCXRDataset(root, cache_dir=cache).load_manifest()
    assert len(list(cache.glob("*.parquet"))) == 1

    def NoScan(*args, **kwargs):  # a reader that fails if it has to scan the source
        reader = MimicCXRDataset(*args, **kwargs)

        def scan():
            raise AssertionError("the cached manifest should have been reused")

        reader.scan = scan
        return reader

    again = NoScan(root, cache_dir=cache)
    pd.testing.assert_frame_equal(again.load_manifest().table, first.table)
    assert again.last_scan.dropped == {"study has no row in the label file": 1, "not exactly one positive finding": 3}
    labels = root / "mimic-cxr-2.0.0-chexpert.csv"  # the unlabelled study gets its label row
    cells = ["1.0" if c == "Fracture" else "" for c in fx.MIMIC_LABELS]
    labels.write_text(labels.read_text() + f"12000022,{fx.MIMIC_UNLABELLED_STUDY}," + ",".join(cells) + "\n")
    os.utime(labels, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(AssertionError, match="reused"):
        NoScan(root, cache_dir=cache).load_manifest()
    assert len(MimicCXRDataset(root, cache_dir=cache).load_manifest()) == len(first) + 1
    (cache / next(cache.glob("*.parquet")).name).write_bytes(b"not parquet")  # corrupt cache: rebuilt
    assert len(MimicCXRDataset(root, cache_dir=cache).load_manifest()) > 0


def test_prepare_command_prints_counts(data, tmp_path):
    proc = run_cbir(tmp_path, "dataset=nih14", f"dataset.root={data / 'nih14'}", module="cbir.data.prepare")
    out = proc.stdout
    assert "Per class" in out and "Pleural Effusion" in out and "Per modality" in out
    assert "image file missing" in out and "more than one finding" in out
    assert list((tmp_path / ".cache/cbir/manifests").glob("nih14-*.parquet"))
    bad = run_cbir(
        tmp_path, "dataset=nih14", f"dataset.root={tmp_path / 'nowhere'}", module="cbir.data.prepare", check=False
    )
    assert bad.returncode == 2 and "dataset.root" in bad.stderr + bad.stdout


# ---------------------------------------------------------------------- user collections
def make_folder_collection(root: Path) -> Path:
    for label, n in {"CT/abd/normal": 10, "CT/abd/cyst": 5, "XR/chest/Pneumonia": 2, "MR/brain/normal": 1}.items():
        for i in range(n):
            fx.write_image(root / label / f"patient{i}" / f"img{i}.png")
    fx.write_image(root / "CT" / "stray.png")
    (root / "CT/abd/normal/notes.txt").write_text("not an image")
    return root


def test_folder_collection_classes_and_stratified_split(tmp_path):
    root = make_folder_collection(tmp_path / "mine")
    reader = FolderDataset(root, split_fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    t = reader.load_manifest().table
    assert counts(reader.load_manifest()) == {
        "CT/abd/normal": 10,
        "CT/abd/cyst": 5,
        "XR/chest/Pneumonia": 2,
        "MR/brain/normal": 1,
    }
    per_class = t.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert per_class.loc["CT/abd/normal"].to_dict() == {"test": 2, "train": 6, "val": 2}
    assert per_class.loc["XR/chest/Pneumonia"].to_dict() == {"test": 1, "train": 1, "val": 0}
    assert per_class.loc["MR/brain/normal", "train"] == 1
    assert reader.last_scan.dropped == {"image not inside <modality>/<anatomy>/<pathology>/": 1}
    again = FolderDataset(root, split_fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=3).load_manifest()
    assert again.table.equals(t)  # deterministic


def test_folder_collection_with_split_file(tmp_path):
    root = make_folder_collection(tmp_path / "mine")
    split_file = tmp_path / "splits.csv"
    split_file.write_text("path,split\n./CT/abd/cyst/patient0/img0.png,test\nCT/abd/cyst/patient1/img1.png,train\n")
    reader = FolderDataset(root, split_file=str(split_file))
    t = reader.load_manifest().table
    assert t.set_index("path")["split"].to_dict() == {
        "CT/abd/cyst/patient0/img0.png": "test",
        "CT/abd/cyst/patient1/img1.png": "train",
    }
    assert reader.last_scan.dropped["not listed in splits.csv"] == 16


def write_manifest(path: Path, rows, header="path,split,modality,anatomy,label") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_csv_manifest_reads_validates_and_guards_root(tmp_path):
    fx.write_image(tmp_path / "imgs/a.png")
    fx.write_image(tmp_path / "imgs/b.png")
    ok = write_manifest(
        tmp_path / "m.csv", ["imgs/a.png,train,CT,abd,CT/abd/normal", "imgs/b.png,test,CT,abd,CT/abd/normal"]
    )
    m = CSVManifestDataset(file=str(ok)).load_manifest()
    assert len(m) == 2 and set(m.table["dataset"]) == {"csv"} and m.root == tmp_path

    no_label = write_manifest(tmp_path / "bad.csv", ["imgs/a.png,train,CT,abd"], header="path,split,modality,anatomy")
    with pytest.raises(ManifestError) as e:
        CSVManifestDataset(file=str(no_label)).load_manifest()
    assert "bad.csv" in str(e.value) and "['label']" in str(e.value) and "\n" not in str(e.value)

    escape = write_manifest(tmp_path / "esc.csv", ["../outside.png,train,CT,abd,CT/abd/normal"])
    with pytest.raises(ManifestError, match="outside the manifest root"):
        CSVManifestDataset(file=str(escape)).load_manifest()

    missing = write_manifest(tmp_path / "miss.csv", ["imgs/zzz.png,train,CT,abd,CT/abd/normal"])
    with pytest.raises(ManifestError, match="missing"):
        CSVManifestDataset(file=str(missing)).load_manifest()

    bad_split = write_manifest(tmp_path / "split.csv", ["imgs/a.png,training,CT,abd,CT/abd/normal"])
    with pytest.raises(ManifestError, match="unknown split"):
        CSVManifestDataset(file=str(bad_split)).load_manifest()


# ---------------------------------------------------------------------- statistics
def test_dataset_summary_and_digest(data):
    m = MimicCXRDataset(data / "mimic/files/mimic-cxr-jpg/2.0.0").load_manifest()
    s = dataset_summary(m)
    assert s["rows"] == 6 and s["classes"] == 4 and s["split_counts"] == {"train": 3, "val": 1, "test": 2}
    cc = s["class_counts"].set_index("label")
    assert list(cc.columns) == ["modality", "anatomy", "train", "val", "test", "total"]
    assert cc.loc["XR/chest/Pneumothorax", "test"] == 2 and cc["total"].sum() == 6
    assert s["digest"] == manifest_digest(m) and len(s["digest"]) == 16
    shuffled = type(m)(table=m.table.iloc[::-1].reset_index(drop=True), root=m.root)
    assert manifest_digest(shuffled) != s["digest"]
