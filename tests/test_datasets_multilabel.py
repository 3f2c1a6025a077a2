"""dataset.labels=multi on the miniature copies of the chest X-ray datasets, user collections
and the synthetic dataset: every image kept with its findings, the single-label rows unchanged."""

from __future__ import annotations

from pathlib import Path

import fixtures_datasets as fx
import pandas as pd
import pytest
from conftest import compose
from hydra.utils import instantiate

from cbir.data.chexpert import CheXpertDataset
from cbir.data.csv_manifest import CSVManifestDataset
from cbir.data.folder import FolderDataset
from cbir.data.manifest import ManifestError
from cbir.data.mimic_cxr import MimicCXRDataset
from cbir.data.nih14 import NIH14Dataset
from cbir.data.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fx.make_study_data(tmp_path_factory.mktemp("DATA"))


def single_rows_unchanged(single: pd.DataFrame, multi: pd.DataFrame) -> None:
    """Every image of the single-label manifest is in the multi-label one with the same split
    and label, and its findings are its label's finding."""
    merged = single.merge(multi, on="path", suffixes=("", "_multi"), validate="one_to_one")
    assert len(merged) == len(single)
    assert (merged["split"] == merged["split_multi"]).all()
    assert (merged["label"] == merged["label_multi"]).all()
    assert (merged["label"].str.split("/", n=2).str[2] == merged["findings"]).all()


def test_nih14_multi_keeps_multi_finding_images(data, tmp_path):
    single = NIH14Dataset(data / "nih14", cache_dir=tmp_path).load_manifest().table
    reader = NIH14Dataset(data / "nih14", cache_dir=tmp_path, labels="multi")
    multi = reader.load_manifest().table
    assert reader.last_scan.dropped == {"image file missing": 1}
    assert len(multi) == len(fx.nih_rows()) - 1
    two = multi[multi["findings"].str.contains("|", regex=False)]
    assert len(two) == sum("|" in r[1] for r in fx.nih_rows())
    assert set(two["findings"]) == {"Mass|Pleural Effusion"}  # renamed, sorted
    assert set(two["label"]) == {"XR/chest/Mass|Pleural Effusion"}
    assert "No Finding" in set(multi["findings"])  # a finding of its own
    single_rows_unchanged(single, multi)
    assert len(list(tmp_path.glob("nih14-*.parquet"))) == 2  # the cache keys the mode
    again = NIH14Dataset(data / "nih14", cache_dir=tmp_path, labels="multi").load_manifest().table
    pd.testing.assert_frame_equal(again, multi)  # findings survive the cache


def test_mimic_multi_follows_the_uncertain_rule(tmp_path):
    root = fx.make_mimic_cxr(tmp_path)
    single = MimicCXRDataset(root).load_manifest().table
    reader = MimicCXRDataset(root, labels="multi")
    multi = reader.load_manifest().table
    assert reader.last_scan.dropped == {"study has no row in the label file": 1, "no positive finding": 2}
    assert multi["findings"].value_counts().to_dict() == {
        "No Finding": 2,
        "Pneumothorax": 2,
        "Edema": 1,
        "Cardiomegaly": 1,
        "Edema|Pleural Effusion": 1,
    }
    single_rows_unchanged(single, multi)
    dropped = MimicCXRDataset(root, labels="multi", uncertain="drop").load_manifest().table
    assert "Edema" not in set(dropped["findings"])  # the study with Atelectasis -1 is dropped


def test_chexpert_multi_splits_only_new_patients(data, tmp_path):
    root = tmp_path / "CheXpert"
    fx.make_chexpert(tmp_path)
    train_csv = root / "CheXpert-v1.0/train.csv"
    extra = []
    for p in (30, 31, 32):  # two positives, no uncertain: only multi mode keeps them
        path = f"CheXpert-v1.0/train/patient{p:05d}/study1/view1_frontal.jpg"
        fx.write_image(root / path)
        extra.append(fx.chexpert_row(path, {"Edema": 1.0, "Pneumonia": 1.0}))
    train_csv.write_text(train_csv.read_text() + "\n".join(extra) + "\n")
    single = CheXpertDataset(root).load_manifest().table
    multi = CheXpertDataset(root, labels="multi").load_manifest().table
    single_rows_unchanged(single, multi)
    new = multi[multi["path"].str.contains("patient0003[012]")]
    assert set(new["findings"]) == {"Edema|Pneumonia"} and sorted(new["split"]) == ["train", "train", "val"]
    test = multi[multi["split"] == "test"]
    assert set(test["findings"]) == {"No Finding", "Pneumothorax", "Edema|Pneumonia", "Lung Opacity"}
    assert not multi["path"].str.contains("patient0002[6789]").any()  # uncertain, blank, Support Devices only
    zero = CheXpertDataset(root, labels="multi", uncertain="zero").load_manifest().table
    assert "Edema|Fracture" in set(zero["findings"])  # patient 27 once -1 counts as negative


def test_combined_multi_reaches_the_chest_parts(data, tmp_path):
    cfg = compose("dataset=combined", f"dataset.root={data}", f"paths.cache_dir={tmp_path}", "dataset.labels=multi")
    assert cfg.dataset.parts.nih14.labels == "multi" and "labels" not in cfg.dataset.parts.radimagenet
    table = instantiate(cfg.dataset).load_manifest().table
    assert (table["findings"] != "").all()
    radimagenet = table[table["dataset"] == "radimagenet"]
    assert (radimagenet["label"].str.split("/", n=2).str[2] == radimagenet["findings"]).all()
    assert {"nih14", "mimic_cxr", "chexpert"} == set(
        table.loc[table["findings"].str.contains("|", regex=False), "dataset"]
    )
    single = (
        instantiate(compose("dataset=combined", f"dataset.root={data}", f"paths.cache_dir={tmp_path}").dataset)
        .load_manifest()
        .table
    )
    assert "findings" not in single.columns


def test_folder_and_csv_multi(tmp_path):
    root = tmp_path / "mine"
    for label, n in {"CT/abd/normal": 4, "CT/abd/cyst": 4}.items():
        for i in range(n):
            fx.write_image(root / label / f"img{i}.png")
    findings_file = tmp_path / "findings.csv"
    findings_file.write_text("path,findings\nCT/abd/cyst/img0.png,cyst|calcification\n")
    single = FolderDataset(root).load_manifest().table
    multi = FolderDataset(root, labels="multi", findings_file=str(findings_file)).load_manifest().table
    row = multi.set_index("path").loc["CT/abd/cyst/img0.png"]
    assert row["findings"] == "calcification|cyst" and row["label"] == "CT/abd/calcification|cyst"
    assert (multi.set_index("path")["split"] == single.set_index("path")["split"]).all()
    assert multi["findings"].value_counts().to_dict() == {"normal": 4, "cyst": 3, "calcification|cyst": 1}

    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,split,modality,anatomy,label,findings\n"
        "mine/CT/abd/cyst/img0.png,train,CT,abd,CT/abd/cyst,cyst|Mass\n"
        "mine/CT/abd/cyst/img1.png,test,CT,abd,CT/abd/cyst,\n"
    )
    table = CSVManifestDataset(file=str(manifest), labels="multi").load_manifest().table
    assert list(table["findings"]) == ["Mass|cyst", "cyst"]
    assert list(table["label"]) == ["CT/abd/Mass|cyst", "CT/abd/cyst"]
    assert "findings" not in CSVManifestDataset(file=str(manifest)).load_manifest().table.columns
    plain = tmp_path / "plain.csv"
    plain.write_text("path,split,modality,anatomy,label\nmine/CT/abd/cyst/img0.png,train,CT,abd,CT/abd/cyst\n")
    with pytest.raises(ManifestError, match="needs a 'findings' column"):
        CSVManifestDataset(file=str(plain), labels="multi").load_manifest()
    with pytest.raises(ManifestError, match="dataset.labels='both'"):
        NIH14Dataset(tmp_path, labels="both")


def test_synthetic_multi_adds_two_finding_images_and_keeps_the_others(tmp_path):
    kwargs = dict(max_per_class=8, min_per_class=3, image_size=24)
    single = SyntheticDataset(root=tmp_path / "s", **kwargs).load_manifest()
    multi = SyntheticDataset(root=tmp_path / "m", labels="multi", **kwargs).load_manifest()
    assert "findings" not in single.table.columns
    two = multi.table[multi.table["findings"].str.contains("|", regex=False)]
    assert set(two["findings"]) == {"calcification|lesion"}
    assert len(two.groupby(["modality", "anatomy"])) == 12 and set(two["split"]) >= {"train", "test"}
    single_rows_unchanged(single.table, multi.table)
    path = single.table["path"].iloc[7]
    assert (single.root / path).read_bytes() == (multi.root / path).read_bytes()  # same pixels
