"""The study's published artifacts: split CSVs and per-image HDF5 embeddings (SPEC section 10).

Split CSV: columns `filepath, dataset, split, modality, anatomic_region`, then one 0/1 column per
class named `<MODALITY>/<anatomy>/<finding>`; a row's class is the column holding its 1.
Embeddings: one HDF5 file per (model, dataset), `<embeddings>/<Model>/<dataset>.h5`, one HDF5
dataset per image whose key is the image's `filepath` and whose value is its L2-normalised
float32 vector. Keys contain `/`, so they are nested groups: the file is walked once
(`h5py.h5o.visit`) and each dataset read through the low-level API into a preallocated buffer,
which is ~5x faster than one `h5f[key]` lookup per image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from cbir.common.pages import release_pages

SPLIT_COLUMNS = ("filepath", "dataset", "split", "modality", "anatomic_region")
FILE_MISSING = "File Missing"  # the study's filepath for NIH images it could not find

# The study's model (folder) names -> cbir encoder names.
STUDY_MODELS = {
    "ResNet50": "resnet50",
    "ViTB16": "vit",
    "ViTMAEB": "mae",
    "DINOv2ViTB14": "dinov2",
    "SAMViTB": "sam",
    "MedSAMViTB": "medsam",
    "CLIPOpenAIViTL14": "clip",
    "MedCLIP": "medclip",
    "BiomedCLIPVitB16_224": "biomedclip",
}
# cbir reader names -> the study's `dataset` column value, and the study's CSV file names.
STUDY_DATASETS = {"nih14": "nih14", "mimic_cxr": "mimic", "radimagenet": "radiology_ai", "chexpert": "CheXpert"}
STUDY_CSV_NAMES = {
    "nih14": "nih14.csv",
    "mimic": "mimic.csv",
    "radiology_ai": "radimagenet.csv",
    "CheXpert": "CheXpert.csv",
}


class StudyFormatError(ValueError):
    """A published artifact that does not have the study's shape; the message names the file."""


def model_folders(encoder: str) -> list[str]:
    """Folder names the study (or its archives) may use for a cbir encoder, best first."""
    names = [study for study, ours in STUDY_MODELS.items() if ours == encoder]
    return [*names, *[n.replace("_", "-") for n in names if "_" in n], encoder]


def model_folder(encoder: str) -> str:
    return model_folders(encoder)[0]


def image_keys(manifest, key_root=None) -> list[str]:
    """The study key (filepath) of each manifest row: its `path`, or with `key_root` the image
    path relative to that folder (e.g. a nih14 manifest rooted at $DATA/nih14, key_root=$DATA)."""
    if key_root is None:
        return [str(p) for p in manifest.table["path"]]
    base, root = os.path.abspath(key_root), os.path.abspath(manifest.root)
    return [Path(os.path.relpath(os.path.join(root, p), base)).as_posix() for p in manifest.table["path"]]


# ----------------------------------------------------------------------------- split CSVs
def read_split_csv(file: Path, chunk_rows: int = 200_000) -> pd.DataFrame:
    """A split CSV as (filepath, dataset, split, modality, anatomic_region, label), label = the
    class column holding the row's 1 (the study's arg-max). Read in chunks with float32 class
    columns: RadImageNet's 165 columns x 1.35M rows would take GBs as one float64 frame."""
    header = list(pd.read_csv(file, nrows=0).columns)
    if tuple(header[: len(SPLIT_COLUMNS)]) != SPLIT_COLUMNS or len(header) <= len(SPLIT_COLUMNS):
        raise StudyFormatError(
            f"{file}: not a study split CSV; its header must start with {', '.join(SPLIT_COLUMNS)} "
            f"followed by one 0/1 column per class (found {header[:7]})"
        )
    classes = np.array(header[len(SPLIT_COLUMNS) :], dtype=object)
    dtypes = {c: str for c in SPLIT_COLUMNS} | {c: np.float32 for c in classes}
    parts = []
    reader = pd.read_csv(
        file, dtype=dtypes, keep_default_na=False, na_values={c: [""] for c in classes}, chunksize=chunk_rows
    )
    for start, chunk in _chunks(reader):
        onehot = np.nan_to_num(chunk[list(classes)].to_numpy(np.float32))  # combined CSVs: blank = 0
        positives = (onehot == 1).sum(axis=1)
        bad = np.flatnonzero((positives != 1) | ~np.isin(onehot, (0.0, 1.0)).all(axis=1))
        if len(bad):
            lines = [int(start + i + 2) for i in bad[:5]]  # +2: header line, 1-based
            raise StudyFormatError(
                f"{file}: {len(bad)} row(s) do not hold exactly one 1 among the class columns (lines {lines}); "
                "the study's splits are single-label (one-hot): fix or remove those rows"
            )
        frame = chunk[list(SPLIT_COLUMNS)].copy()
        frame["label"] = classes[onehot.argmax(axis=1)]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def class_columns(files) -> list[str]:
    """The class columns of split CSVs, in file order then column order (first occurrence): the
    order the study's arg-max breaks ties in."""
    order: dict[str, None] = {}
    for file in files:
        header = list(pd.read_csv(file, nrows=0).columns)
        order.update(dict.fromkeys(header[len(SPLIT_COLUMNS) :]))
    return list(order)


def _chunks(reader) -> Iterator[tuple[int, pd.DataFrame]]:
    start = 0
    for chunk in reader:
        yield start, chunk
        start += len(chunk)


def write_split_csv(table: pd.DataFrame, file: Path, classes: list[str] | None = None) -> Path:
    """Manifest rows (path, dataset, split, modality, anatomy, label) as a study split CSV."""
    classes = sorted(table["label"].unique()) if classes is None else list(classes)
    out = pd.DataFrame(
        {
            "filepath": table["path"].to_numpy(),
            "dataset": table["dataset"].to_numpy(),
            "split": table["split"].to_numpy(),
            "modality": table["modality"].to_numpy(),
            "anatomic_region": table["anatomy"].to_numpy(),
        }
    )
    onehot = (table["label"].to_numpy()[:, None] == np.array(classes, dtype=object)[None, :]).astype(np.int8)
    out = pd.concat([out, pd.DataFrame(onehot, columns=classes)], axis=1)
    file.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(file, index=False)
    return file


# --------------------------------------------------------------------------- HDF5 files
def open_h5(file: Path):
    """The file opened read-only, or a StudyFormatError naming it (not h5py's OSError)."""
    import h5py

    try:
        return h5py.File(file, "r")
    except OSError as e:
        raise StudyFormatError(f"{file}: not a readable HDF5 file ({e}); download it again or leave it out") from None


def dataset_keys(h5) -> list[bytes]:
    """Full paths of every HDF5 dataset in the file, one walk (keys are nested groups)."""
    import h5py

    keys: list[bytes] = []

    def visit(name, info):
        if info.type == h5py.h5o.TYPE_DATASET:
            keys.append(name)

    h5py.h5o.visit(h5.id, visit, info=True)
    return keys


def vector_dim(h5, file: Path) -> int | None:
    """The embedding length of the file's first dataset (None for an empty file)."""
    import h5py

    found: list[tuple] = []

    def first(name, info):
        if info.type == h5py.h5o.TYPE_DATASET:
            found.append(h5py.h5d.open(h5.id, name).shape)
            return True  # stops the walk
        return None

    h5py.h5o.visit(h5.id, first, info=True)
    if not found:
        return None
    shape = found[0]
    if len(shape) != 1:
        raise StudyFormatError(
            f"{file}: datasets hold arrays of shape {shape}; the study stores one vector (dim,) per image"
        )
    return int(shape[0])


def read_vectors(h5, file: Path, keys: list[bytes], dim: int, batch: int = 8192) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (offset into keys, (b, dim) float32 block) for the given dataset keys, in order.
    A dataset stored contiguously as little-endian float32 (what h5py writes by default) is
    copied straight from the file's bytes at its offset, skipping HDF5's per-read machinery
    (about half the cost of a row); any other layout or type is read (and converted) by HDF5."""
    import h5py

    raw = np.memmap(file, dtype=np.uint8, mode="r") if os.path.getsize(file) else None
    nbytes = 4 * dim
    buffer = np.empty((batch, dim), dtype=np.float32)
    for start in range(0, len(keys), batch):
        block = keys[start : start + batch]
        for i, key in enumerate(block):
            try:
                ds = h5py.h5d.open(h5.id, key)
                if ds.shape != (dim,):
                    raise StudyFormatError(
                        f"{file}: embedding {key.decode()!r} has shape {ds.shape}, the others ({dim},); "
                        "every embedding of one model must have the same length"
                    )
                offset = ds.get_offset() if ds.dtype == _FLOAT32_LE else None
                if offset is not None and raw is not None and offset + nbytes <= len(raw):
                    buffer[i] = raw[offset : offset + nbytes].view(_FLOAT32_LE)
                else:
                    ds.read(h5py.h5s.ALL, h5py.h5s.ALL, buffer[i])  # HDF5 converts float64/16 to float32
            except (OSError, KeyError, TypeError) as e:
                raise StudyFormatError(
                    f"{file}: cannot read embedding {key.decode()!r} ({e}); the file is damaged"
                ) from None
        yield start, buffer[: len(block)]
        release_pages(raw)  # the file is read front to back once: its pages need not stay resident


_FLOAT32_LE = np.dtype("<f4")


def write_h5(file: Path, keys, vectors) -> Path:
    """One HDF5 dataset per key (nested groups for the `/` in keys), as the study's
    create_embeddings writes them, through h5py's low-level API: about 4x faster per key than
    `h5.create_dataset`, which matters at 1.6M keys."""
    import h5py

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".partial")
    with h5py.File(tmp, "w") as h5:
        space = None
        intermediate = h5py.h5p.create(h5py.h5p.LINK_CREATE)
        intermediate.set_create_intermediate_group(True)
        groups: dict[str, object] = {"": h5.id}
        for key, vector in zip(keys, vectors):
            parent, _, name = str(key).rpartition("/")
            group = groups.get(parent)
            if group is None:
                try:  # made already as the intermediate group of a deeper key
                    group = groups[parent] = h5py.h5g.open(h5.id, parent.encode())
                except (KeyError, ValueError):
                    group = groups[parent] = h5py.h5g.create(h5.id, parent.encode(), lcpl=intermediate)
            vector = np.ascontiguousarray(vector, dtype=np.float32)
            space = space or h5py.h5s.create_simple(vector.shape)
            dataset = h5py.h5d.create(group, name.encode(), h5py.h5t.IEEE_F32LE, space)
            dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, vector)
    tmp.replace(file)
    return file
