"""Scale of the published-artifact path, measured on fabricated study files.

    python -m cbir.bench.published rows=100000 dim=512 workdir=/tmp/published_bench

Writes split CSVs and HDF5 embeddings in the study's exact shape (`fabricate`), then measures:
manifest read, HDF5 load into the embedding cache (time, peak memory of that step), and the
Table-1 evaluation (exact flat index over the whole train split, then a per_class subset, then
IVF against exact: neighbour recall and P@N difference). Each step runs in its own process so its
peak memory is its own. Results go to <out>/published_scale.json and are extrapolated to the
study's 1.6M rows: reading and memory grow linearly with rows; exact search with
queries x index rows (both grow with the data: quadratic); a per_class index stops growing once
each class has per_class rows, so its search grows linearly with the queries.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cbir.study_format import model_folder, write_split_csv

STUDY_ROWS = 1_600_000
# (dataset column, CSV stem, modality, anatomy, findings) of the fabricated classes
FABRICATED = [
    ("nih14", "XR", "chest", ["No Finding", "Atelectasis", "Cardiomegaly", "Pleural Effusion", "Nodule"]),
    ("radiology_ai", "CT", "abd", ["normal", "liver_lesion", "renal_lesion"]),
    ("radiology_ai", "MR", "knee", ["normal", "meniscal_abnormality"]),
    ("radiology_ai", "US", "thyroid", ["normal", "nodule"]),
]


def fabricate(out: Path, rows: int, dim: int, encoder: str = "biomedclip", seed: int = 0, styles: int = 500,
              class_shift: float = 0.12, noise: float = 0.8, file_missing: int = 0) -> dict:
    """Study-shaped artifacts under `out`: datasets/<dataset>.csv and embeddings/<Model>/<dataset>.h5.
    An embedding is one of `styles` "acquisition styles" of its modality/anatomy (shared by that
    region's classes), plus a small class direction (`class_shift`) and noise, L2-normalised:
    neighbours are found through structure, as with real embeddings, and classes overlap enough
    that P@1 is about 0.45 (a plain centroid-plus-noise set is either trivial or has no local
    structure for IVF). `file_missing` NIH rows get the study's `File Missing` path (no embedding)."""
    import pandas as pd

    from cbir.study_format import FILE_MISSING, STUDY_CSV_NAMES

    rng = np.random.default_rng(seed)
    classes = [(ds, m, a, f"{m}/{a}/{f}") for ds, m, a, fs in FABRICATED for f in fs]
    region = np.array([g for g, (_, _, _, fs) in enumerate(FABRICATED) for _ in fs])
    weights = rng.uniform(0.3, 3.0, len(classes))
    picked = rng.choice(len(classes), size=rows, p=weights / weights.sum())
    centroids = class_shift * rng.standard_normal((len(classes), dim)).astype(np.float32)
    style_vectors = rng.standard_normal((len(FABRICATED), styles, dim)).astype(np.float32)
    style = rng.integers(0, styles, rows)
    table = pd.DataFrame({
        "dataset": [classes[c][0] for c in picked], "modality": [classes[c][1] for c in picked],
        "anatomy": [classes[c][2] for c in picked], "label": [classes[c][3] for c in picked],
        "split": rng.choice(["train", "val", "test"], size=rows, p=[0.8, 0.1, 0.1]),
    })
    table["path"] = [f"{ds}/images_{i // 10000:03d}/{i:08d}.png" for i, ds in enumerate(table["dataset"])]
    files: dict = {"csv": [], "h5": []}
    model = model_folder(encoder)
    writes = []
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for dataset, part in table.groupby("dataset", sort=False):
            vectors_file = out / "embeddings" / f".{dataset}.npy"  # handed to the writer without pickling GBs
            vectors_file.parent.mkdir(parents=True, exist_ok=True)
            vectors = np.lib.format.open_memmap(vectors_file, mode="w+", dtype=np.float32, shape=(len(part), dim))
            positions = part.index.to_numpy()
            for start in range(0, len(part), 65536):  # bounded memory at any size
                at = positions[start:start + 65536]
                block = style_vectors[region[picked[at]], style[at]] + centroids[picked[at]]
                block += noise * rng.standard_normal(block.shape).astype(np.float32)
                vectors[start:start + len(at)] = block / np.linalg.norm(block, axis=1, keepdims=True)
            vectors.flush()
            del vectors
            # one file per process: HDF5 writing is one core's work per file
            writes.append(pool.submit(_write_h5_from, out / "embeddings" / model / f"{dataset}.h5",
                                      part["path"].tolist(), vectors_file))
            csv_rows = part
            if dataset == "nih14" and file_missing:
                extra = part.iloc[:file_missing].copy()
                extra["path"] = FILE_MISSING
                csv_rows = pd.concat([part, extra], ignore_index=True)
            files["csv"].append(write_split_csv(csv_rows.reset_index(drop=True),
                                                out / "datasets" / STUDY_CSV_NAMES[dataset]))
        files["h5"] = [w.result() for w in writes]
    return {"rows": rows, "dim": dim, "files": {k: [str(p) for p in v] for k, v in files.items()}}


def _write_h5_from(file: Path, keys: list[str], vectors_file: Path) -> Path:
    from cbir.study_format import write_h5

    written = write_h5(file, keys, np.load(vectors_file, mmap_mode="r"))
    vectors_file.unlink()
    return written


# ------------------------------------------------------------------------ measured steps
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _baseline_mb() -> float:
    """Peak RSS after the imports a step needs, before its work: what does not grow with rows."""
    import faiss  # noqa: F401
    import h5py  # noqa: F401
    import torch  # noqa: F401

    import cbir.extract  # noqa: F401
    import cbir.retrieval  # noqa: F401

    return _peak_mb()


def _in_child(fn, *args) -> dict:
    """Run one step in a fresh process, so its peak memory is its own."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _manifest(data: Path):
    from cbir.data.study_splits import StudySplitsDataset

    return StudySplitsDataset(root=data, dir=data / "datasets", images_needed=False).load_manifest()


def _extract_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.create({"batch_size": 1, "num_workers": 0, "progress": False})


def step_load(data: Path, cache: Path, sample_keys: int = 5000) -> dict:
    """Split CSVs -> manifest, HDF5 -> embedding cache entry (the precomputed encoder's path);
    and, for comparison, the study's way of reading (one `h5f[key]` lookup per image) on a sample."""
    import shutil

    import h5py

    from cbir.encoders.precomputed import PrecomputedEncoder
    from cbir.extract import extract_embeddings
    from cbir.store import EmbeddingStore

    base_mb = _baseline_mb()
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    manifest = _manifest(data)
    manifest_s = time.perf_counter() - start
    start = time.perf_counter()
    encoder = PrecomputedEncoder("biomedclip", dir=data / "embeddings")
    extraction = extract_embeddings(encoder, manifest, EmbeddingStore(cache), _extract_cfg(), on_error="raise")
    load_s = time.perf_counter() - start
    file = encoder.files[0]  # the study's retrieval.py: `key in h5f` then `h5f[key][:]` for each CSV row
    keys = manifest.table.loc[manifest.table["dataset"] == file.stem, "path"].to_numpy()[:sample_keys]
    start = time.perf_counter()
    with h5py.File(file, "r") as h5:
        for key in keys:
            if key in h5:
                h5[key][:]
    per_key_s = (time.perf_counter() - start) / len(keys)
    return {"rows": len(manifest), "dim": encoder.dim, "manifest_s": manifest_s, "hdf5_to_cache_s": load_s,
            "per_key_lookup_us": per_key_s * 1e6, "cache_hit": extraction.cache_hit, "peak_rss_mb": _peak_mb(),
            "base_rss_mb": base_mb}


def step_evaluate(data: Path, cache: Path, per_class: int, nlist: int, nprobe: int, ns=(1, 3, 5, 10),
                  curve_k: int = 100) -> dict:
    """Table-1 evaluation on the cached embeddings: exact (flat) over the whole train split, a
    per_class subset, and IVF with its neighbour recall against exact."""
    from omegaconf import OmegaConf

    from cbir.encoders.precomputed import PrecomputedEncoder
    from cbir.extract import extract_embeddings
    from cbir.retrieval import choose_rows, run_retrieval
    from cbir.store import EmbeddingStore

    base_mb = _baseline_mb()
    manifest = _manifest(data)
    extraction = extract_embeddings(PrecomputedEncoder("biomedclip", dir=data / "embeddings"), manifest,
                                    EmbeddingStore(cache), _extract_cfg(), on_error="raise")
    table, emb, valid = manifest.table, extraction.embeddings, extraction.valid
    out: dict = {"cache_hit": extraction.cache_hit}

    def timed(size, index_cfg):
        setup = choose_rows(table, valid, "train", "test", size, 0)
        start = time.perf_counter()
        result, search = run_retrieval(table, emb, setup, OmegaConf.create(index_cfg), list(ns), curve_k,
                                       return_search=True)
        return time.perf_counter() - start, result, search, setup

    flat = {"type": "flat", "use_gpu": False, "params": {}}
    seconds, exact, exact_search, setup = timed(None, flat)
    out["exact"] = {"seconds": seconds, "queries": len(setup.query_rows), "index_rows": len(setup.index_rows),
                    "micro_P_at_1": exact.metrics["micro/P_at_1"], "macro_P_at_1": exact.metrics["macro/P_at_1"]}
    seconds, subset, _, setup = timed(per_class, flat)
    out["per_class"] = {"per_class": per_class, "seconds": seconds, "index_rows": len(setup.index_rows),
                        "micro_P_at_1": subset.metrics["micro/P_at_1"]}
    ivf = {"type": "ivf", "use_gpu": False, "params": {"nlist": nlist, "nprobe": nprobe}}
    seconds, approx, approx_search, setup = timed(None, ivf)
    k = 10
    hits = [len(set(a[:k]) & set(b[:k])) for a, b in zip(approx_search.neighbours, exact_search.neighbours)]
    out["ivf"] = {"nlist": nlist, "nprobe": nprobe, "seconds": seconds, "recall_at_10": float(np.mean(hits) / k),
                  "micro_P_at_1": approx.metrics["micro/P_at_1"],
                  "micro_P_at_10_difference": approx.metrics["micro/P_at_10"] - exact.metrics["micro/P_at_10"]}
    out["peak_rss_mb"], out["base_rss_mb"] = _peak_mb(), base_mb
    return out


def extrapolate(load: dict, evaluation: dict, study_rows: int, study_classes: int) -> dict:
    """Linear in rows for reading and memory (above the imports' baseline); queries x index rows for exact search (both grow
    with the data); queries x capped index rows (study_classes x per_class) for the subset."""
    r = study_rows / load["rows"]
    subset = evaluation["per_class"]
    study_subset_rows = study_classes * subset["per_class"]
    return {
        "rows": study_rows, "factor": r,
        "hdf5_to_cache_s": load["hdf5_to_cache_s"] * r, "manifest_s": load["manifest_s"] * r,
        "load_peak_rss_mb": load["base_rss_mb"] + (load["peak_rss_mb"] - load["base_rss_mb"]) * r,
        "evaluate_peak_rss_mb": evaluation["base_rss_mb"] + (evaluation["peak_rss_mb"] - evaluation["base_rss_mb"]) * r,
        "cache_gb": study_rows * load["dim"] * 4 / 1e9,
        "exact_s": evaluation["exact"]["seconds"] * r * r,
        "per_class_s": subset["seconds"] * r * (study_subset_rows / subset["index_rows"]),
        "per_class_index_rows": study_subset_rows,
        # IVF with nlist grown as sqrt(rows) and nprobe fixed scans Q x I x nprobe/nlist vectors
        "ivf_s": evaluation["ivf"]["seconds"] * r * r ** 0.5,
        "study_per_key_lookup_s": load["per_key_lookup_us"] * study_rows / 1e6,
    }


def benchmark(rows: int, dim: int, workdir: Path, per_class: int = 1000, nlist: int | None = None, nprobe: int = 16,
              study_rows: int = STUDY_ROWS, study_classes: int = 185) -> dict:
    data, cache = workdir / f"study_{rows}x{dim}", workdir / "cache"
    marker = data / "fabricated.json"
    if not marker.exists():  # the fabricated files are reused across runs of the same size
        start = time.perf_counter()
        facts = fabricate(data, rows, dim)
        facts["seconds"] = time.perf_counter() - start
        marker.write_text(json.dumps(facts))
    load = _in_child(step_load, data, cache)
    n_index = int(rows * 0.8)
    nlist = int(nlist or max(16, 4 * int(n_index ** 0.5)))
    evaluation = _in_child(step_evaluate, data, cache, per_class, nlist, nprobe)
    result = {"measured": {"load": load, "evaluate": evaluation}, "fabricated": json.loads(marker.read_text()),
              "study_estimate": extrapolate(load, evaluation, study_rows, study_classes)}
    (workdir / "published_scale.json").write_text(json.dumps(result, indent=1))
    return result


def print_result(result: dict) -> None:
    load, ev, est = result["measured"]["load"], result["measured"]["evaluate"], result["study_estimate"]
    rows = [
        ("split CSVs -> manifest", f"{load['manifest_s']:.1f} s", f"{est['manifest_s']:.0f} s"),
        ("HDF5 -> embedding cache", f"{load['hdf5_to_cache_s']:.1f} s", f"{est['hdf5_to_cache_s'] / 60:.1f} min"),
        ("  (the study's h5f\\[key] per image)", f"{load['per_key_lookup_us']:.0f} us/key",
         f"{est['study_per_key_lookup_s'] / 60:.1f} min"),
        ("load peak RSS", f"{load['peak_rss_mb']:.0f} MB", f"{est['load_peak_rss_mb'] / 1024:.1f} GB"),
        (f"exact, whole train split ({ev['exact']['queries']} queries x {ev['exact']['index_rows']})",
         f"{ev['exact']['seconds']:.1f} s", f"{est['exact_s'] / 3600:.1f} h"),
        (f"exact, per_class={ev['per_class']['per_class']} ({ev['per_class']['index_rows']} rows)",
         f"{ev['per_class']['seconds']:.1f} s", f"{est['per_class_s'] / 60:.1f} min"),
        (f"IVF nlist={ev['ivf']['nlist']} nprobe={ev['ivf']['nprobe']}: recall@10 {ev['ivf']['recall_at_10']:.3f}",
         f"{ev['ivf']['seconds']:.1f} s", f"{est['ivf_s'] / 60:.1f} min"),
        ("evaluation peak RSS", f"{ev['peak_rss_mb']:.0f} MB", f"{est['evaluate_peak_rss_mb'] / 1024:.1f} GB"),
    ]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"published artifacts at {load['rows']} x {load['dim']} (estimate: {est['rows']} rows)")
    for column in ("step", "measured", "study size (extrapolated)"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from cbir import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench_published")
    def run(cfg: DictConfig) -> None:
        result = benchmark(int(cfg.rows), int(cfg.dim), Path(cfg.workdir), int(cfg.per_class), cfg.nlist,
                           int(cfg.nprobe), int(cfg.study_rows), int(cfg.study_classes))
        print_result(result)
        print(f"written: {Path(cfg.workdir) / 'published_scale.json'}")

    run()


if __name__ == "__main__":
    main()
