"""Miniature copies of the four study datasets in their official layouts, for tests.

Each builder writes under `data_dir` (the study's `$DATA` folder) and returns the folder a
reader's `root` should point at. Folder names, CSV headers (exact column order, trailing
commas) and file names follow the official distributions; images are 16x16 8-bit grey.
The module-level constants say what each fixture contains, so tests can assert exact counts.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, value: int = 128, size: int = 16) -> Path:
    """A tiny 8-bit grey image (PNG or JPEG by suffix) with a gradient so it is not flat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 60, size, dtype=np.float64)
    array = np.clip(value + ramp[None, :] - 30, 0, 255).astype(np.uint8).repeat(size, axis=0).reshape(size, size)
    Image.fromarray(array).save(path)
    return path


def write_text(path: Path, text: str, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


# ---------------------------------------------------------------- RadImageNet
# folder (below radiology_ai/) -> number of images; US organ folders hold images directly
RADIMAGENET_FOLDERS = {
    "CT/abd/normal": 4,
    "CT/lung/interstitial_lung_disease": 3,
    "MR/knee/meniscal_abnormality": 3,
    "MR/knee/ca++_tendinosis": 3,
    "US/liver": 3,
    "US/thyroid": 3,
    "US/thyroid_nodule": 3,
}
RADIMAGENET_CLASSES = {  # without the ignore list
    "CT/abd/normal": 4,
    "CT/lung/interstitial_lung_disease": 3,
    "MR/knee/meniscal_abnormality": 3,
    "MR/knee/ca++_tendinosis": 3,
    "US/liver/normal": 3,
    "US/thyroid/normal": 3,
    "US/thyroid/nodule": 3,
}
RADIMAGENET_IGNORED = "radiology_ai/CT/abd/normal/abd-normal000003.png"  # in the ignore list


def make_radimagenet(data_dir: Path) -> Path:
    """`data_dir/radiology_ai/` with the three split CSVs and an `ignore_list.txt` beside them.
    Per folder: the last image is test, the one before val, the rest train. The train CSV
    repeats one row (it must count once)."""
    root = Path(data_dir) / "radiology_ai"
    rows = {"train": [], "val": [], "test": []}
    serial = 0
    for folder, n in RADIMAGENET_FOLDERS.items():
        modality, organ = folder.split("/")[:2]
        for i in range(n):
            serial += 1
            stem = f"usn{serial:06d}" if modality == "US" else f"{organ}-{folder.split('/')[-1]}{serial:06d}"
            write_image(root / folder / f"{stem}.png", value=40 + 20 * i)
            split = "test" if i == n - 1 else "val" if i == n - 2 else "train"
            label = f"{organ}-{folder.split('/')[-1]}" if modality != "US" else organ
            rows[split].append(f"radiology_ai/{folder}/{stem}.png,{label}")
    rows["train"].append(rows["train"][0])  # a repeated row
    for split, lines in rows.items():
        write_text(root / f"RadiologyAI_{split}.csv", "filename,label\n" + "\n".join(lines) + "\n")
    write_text(root / "ignore_list.txt", RADIMAGENET_IGNORED + "\n")
    return root


# ---------------------------------------------------------------- NIH ChestX-ray14
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_FINDINGS = [
    "No Finding",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
NIH_TRAIN_VAL_PATIENTS = list(range(1, 31))  # 30 patients, 2 images each
NIH_TEST_PATIENTS = list(range(31, 39))  # 8 patients, 2 images each
NIH_MULTI_LABEL = "Effusion|Mass"  # the 2nd image of every 3rd patient
NIH_MISSING_IMAGE = "00000005_000.png"  # listed everywhere, no file on disk


def nih_rows():
    """(image name, finding labels, patient id) for every Data_Entry row, in CSV order."""
    rows, k = [], 0
    for patient in NIH_TRAIN_VAL_PATIENTS + NIH_TEST_PATIENTS:
        for follow_up in range(2):
            if follow_up == 1 and patient % 3 == 0:
                labels = NIH_MULTI_LABEL
            else:
                labels = NIH_FINDINGS[k % len(NIH_FINDINGS)]
                k += 1
            rows.append((f"{patient:08d}_{follow_up:03d}.png", labels, patient))
    return rows


def make_nih14(data_dir: Path, data_entry: str = "Data_Entry_2017.csv") -> Path:
    """`data_dir/nih14/` as the Kaggle mirror unpacks it (`images_001/images/`, `images_002/images/`)."""
    root = Path(data_dir) / "nih14"
    lines = [NIH_HEADER]
    for i, (name, labels, patient) in enumerate(nih_rows()):
        follow_up = int(name[9:12])
        lines.append(
            f"{name},{labels},{follow_up},{patient},{40 + patient % 40},{'MF'[patient % 2]},PA,2500,2048,0.168,0.168,"
        )
        if name != NIH_MISSING_IMAGE:
            write_image(root / f"images_00{1 + i % 2}" / "images" / name, value=30 + i % 200)
    write_text(root / data_entry, "\n".join(lines) + "\n")
    train_val = [r[0] for r in nih_rows() if r[2] in NIH_TRAIN_VAL_PATIENTS]
    test = [r[0] for r in nih_rows() if r[2] in NIH_TEST_PATIENTS]
    write_text(root / "train_val_list.txt", "\n".join(train_val) + "\n")
    write_text(root / "test_list.txt", "\n".join(test) + "\n")
    return root


# ---------------------------------------------------------------- MIMIC-CXR-JPG 2.0.0
MIMIC_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
# study -> (subject, split, {label: value}, number of images); values 1.0 / 0.0 / -1.0, absent = blank
MIMIC_STUDIES = {
    50414267: (10000032, "train", {"No Finding": 1.0}, 2),  # kept x2 (PA + lateral)
    50000001: (10000032, "train", {"Edema": 1.0, "Atelectasis": -1.0}, 1),  # kept: -1 counts as 0
    50000002: (10000764, "train", {"Edema": 1.0, "Pleural Effusion": 1.0}, 1),  # dropped: two findings
    50000003: (10000764, "train", {"Support Devices": 1.0}, 1),  # dropped: no class
    50000004: (11000011, "validate", {"Cardiomegaly": 1.0, "Support Devices": 1.0}, 1),  # kept: Cardiomegaly
    50000005: (11000011, "validate", {}, 1),  # dropped: all blank
    50000006: (12000022, "test", {"Pneumothorax": 1.0, "Lung Opacity": 0.0}, 2),  # kept x2
    50000007: (12000022, "test", {"Fracture": 1.0}, 1),  # no label row: skipped
}
MIMIC_UNLABELLED_STUDY = 50000007


def mimic_dicom_id(study: int, k: int) -> str:
    return f"{study:08x}-{k:08x}-0000abcd-1234ef00-{study % 7:08x}"


def make_mimic_cxr(data_dir: Path, gz: bool = False) -> Path:
    """`data_dir/mimic/files/mimic-cxr-jpg/2.0.0/` (the study's layout) with split and chexpert
    CSVs, plain or gzipped as PhysioNet ships them."""
    root = Path(data_dir) / "mimic" / "files" / "mimic-cxr-jpg" / "2.0.0"
    split_lines = ["dicom_id,study_id,subject_id,split"]
    label_lines = ["subject_id,study_id," + ",".join(MIMIC_LABELS)]
    for study, (subject, split, values, n_images) in MIMIC_STUDIES.items():
        for k in range(n_images):
            dicom = mimic_dicom_id(study, k)
            split_lines.append(f"{dicom},{study},{subject},{split}")
            write_image(
                root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                value=60 + 10 * k,
            )
        if study != MIMIC_UNLABELLED_STUDY:
            cells = [str(values[c]) if c in values else "" for c in MIMIC_LABELS]
            label_lines.append(f"{subject},{study}," + ",".join(cells))
    write_text(root / "mimic-cxr-2.0.0-split.csv", "\n".join(split_lines) + "\n", gz=gz)
    write_text(root / "mimic-cxr-2.0.0-chexpert.csv", "\n".join(label_lines) + "\n", gz=gz)
    return root


def add_mimic_study(root: Path, study: int, subject: int, split: str, values: dict, n_images: int) -> None:
    """One more study in a `make_mimic_cxr` folder (plain CSVs): its images, split and label rows."""
    with (
        (root / "mimic-cxr-2.0.0-split.csv").open("a", encoding="utf-8", newline="") as split_csv,
        (root / "mimic-cxr-2.0.0-chexpert.csv").open("a", encoding="utf-8", newline="") as label_csv,
    ):
        for k in range(n_images):
            dicom = mimic_dicom_id(study, k)
            split_csv.write(f"{dicom},{study},{subject},{split}\n")
            write_image(
                root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                value=100 + 10 * k,
            )
        label_csv.write(
            f"{subject},{study}," + ",".join(str(values[c]) if c in values else "" for c in MIMIC_LABELS) + "\n"
        )


# ---------------------------------------------------------------- CheXpert v1.0
CHEXPERT_LABELS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)
CHEXPERT_SINGLE_PATIENTS = 24  # patient00001..00024: one frontal + one lateral single-finding image
# patient -> label values of its one extra image (study2/view1_frontal.jpg)
CHEXPERT_TRICKY = {
    25: {"Edema": 1.0, "Support Devices": 1.0},  # kept as Edema
    26: {"Edema": 1.0, "Atelectasis": -1.0},  # dropped (uncertain); kept as Edema with uncertain=zero
    27: {"Edema": 1.0, "Fracture": 1.0, "Atelectasis": -1.0},  # dropped, but its patient enters the split
    28: {},  # all blank: dropped
    29: {"Support Devices": 1.0},  # dropped: no class
}
CHEXPERT_VALID = [  # (patient, labels): valid.csv has only 0.0/1.0, no blanks
    (64541, {"No Finding": 1.0}),
    (64542, {"Pneumothorax": 1.0}),
    (64543, {"Edema": 1.0, "Pneumonia": 1.0}),
    (64544, {"Support Devices": 1.0, "Lung Opacity": 1.0}),
    (64545, {}),
]


def chexpert_row(path: str, values: dict, blank: str = "", view: str = "Frontal") -> str:
    cells = [str(values[c]) if c in values else blank for c in CHEXPERT_LABELS]
    ap_pa = "AP" if view == "Frontal" else ""
    return f"{path},Female,68,{view},{ap_pa}," + ",".join(cells)


def make_chexpert(data_dir: Path, release: str = "CheXpert-v1.0") -> Path:
    """`data_dir/CheXpert/<release>/{train.csv,valid.csv,train/,valid/}`; returns data_dir/CheXpert."""
    root = Path(data_dir) / "CheXpert"
    rel = root / release
    train = [CHEXPERT_HEADER]

    def add(lines, split, patient, study, view_k, view, values, blank=""):
        path = f"{release}/{split}/patient{patient:05d}/study{study}/view{view_k}_{view.lower()}.jpg"
        write_image(root / path, value=50 + patient)
        lines.append(chexpert_row(path, values, blank, view))

    findings = CHEXPERT_LABELS[:-1]
    for p in range(1, CHEXPERT_SINGLE_PATIENTS + 1):
        finding = findings[p % len(findings)]
        add(train, "train", p, 1, 1, "Frontal", {finding: 1.0, "Support Devices": 0.0})
        add(train, "train", p, 1, 2, "Lateral", {finding: 1.0})
    for p, values in CHEXPERT_TRICKY.items():
        add(train, "train", p, 2, 1, "Frontal", values)
    valid = [CHEXPERT_HEADER]
    for p, values in CHEXPERT_VALID:
        add(valid, "valid", p, 1, 1, "Frontal", values, blank="0.0")
    write_text(rel / "train.csv", "\n".join(train) + "\n")
    write_text(rel / "valid.csv", "\n".join(valid) + "\n")
    return root


def make_study_data(data_dir: Path) -> Path:
    """All four datasets under one `$DATA` folder, as the study lays them out."""
    make_nih14(data_dir)
    make_mimic_cxr(data_dir)
    make_radimagenet(data_dir)
    make_chexpert(data_dir)
    return Path(data_dir)
