"""The published-artifact path at the study's size, measured on fabricated study files.

    python -m cbir.bench.published rows=1600000 dim=512 workdir=/tmp/published_bench
    python -m cbir.bench bench.sections=[published] bench.published.rows=1600000   (same, recorded)

Writes split CSVs and HDF5 embeddings in the study's exact shape (`fabricate`, once per size),
then measures, each step in its own process so its peak memory is its own: manifest read and
HDF5 load into the embedding cache; the Table-1 evaluation as a run does it (IVF with parameters
from the index size, recall@10 against exact search); and in the same process the baseline,
exact flat search (timed on sampled queries, scaled to all: search time is linear in the
queries), plus a per_class subset searched exactly. Results: <workdir>/published_scale.json.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cbir.study.format import model_folder, write_split_csv

# (dataset column, CSV stem, modality, anatomy, findings) of the fabricated classes
FABRICATED = [
    ("nih14", "XR", "chest", ["No Finding", "Atelectasis", "Cardiomegaly", "Pleural Effusion", "Nodule"]),
    ("radiology_ai", "CT", "abd", ["normal", "liver_lesion", "renal_lesion"]),
    ("radiology_ai", "MR", "knee", ["normal", "meniscal_abnormality"]),
    ("radiology_ai", "US", "thyroid", ["normal", "nodule"]),
]


def fabricate(
    out: Path,
    rows: int,
    dim: int,
    encoder: str = "biomedclip",
    seed: int = 0,
    styles: int = 500,
    class_shift: float = 0.12,
    noise: float = 0.8,
    file_missing: int = 0,
) -> dict:
    """Study-shaped artifacts under `out`: datasets/<dataset>.csv and embeddings/<Model>/<dataset>.h5.
    An embedding is one of `styles` "acquisition styles" of its modality/anatomy (shared by that
    region's classes), plus a small class direction (`class_shift`) and noise, L2-normalised:
    neighbours are found through structure, as with real embeddings, and classes overlap enough
    that P@1 is about 0.45 (a plain centroid-plus-noise set is either trivial or has no local
    structure for IVF). `file_missing` NIH rows get the study's `File Missing` path (no embedding)."""
    import pandas as pd

    from cbir.study.format import FILE_MISSING, STUDY_CSV_NAMES

    rng = np.random.default_rng(seed)
    classes = [(ds, m, a, f"{m}/{a}/{f}") for ds, m, a, fs in FABRICATED for f in fs]
    region = np.array([g for g, (_, _, _, fs) in enumerate(FABRICATED) for _ in fs])
    weights = rng.uniform(0.3, 3.0, len(classes))
    picked = rng.choice(len(classes), size=rows, p=weights / weights.sum())
    centroids = class_shift * rng.standard_normal((len(classes), dim)).astype(np.float32)
    style_vectors = rng.standard_normal((len(FABRICATED), styles, dim)).astype(np.float32)
    style = rng.integers(0, styles, rows)
    table = pd.DataFrame(
        {
            "dataset": [classes[c][0] for c in picked],
            "modality": [classes[c][1] for c in picked],
            "anatomy": [classes[c][2] for c in picked],
            "label": [classes[c][3] for c in picked],
            "split": rng.choice(["train", "val", "test"], size=rows, p=[0.8, 0.1, 0.1]),
        }
    )
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
                at = positions[start : start + 65536]
                block = style_vectors[region[picked[at]], style[at]] + centroids[picked[at]]
                block += noise * rng.standard_normal(block.shape).astype(np.float32)
                vectors[start : start + len(at)] = block / np.linalg.norm(block, axis=1, keepdims=True)
            vectors.flush()
            del vectors
            # one file per process: HDF5 writing is one core's work per file
            writes.append(
                pool.submit(
                    _write_h5_from, out / "embeddings" / model / f"{dataset}.h5", part["path"].tolist(), vectors_file
                )
            )
            csv_rows = part
            if dataset == "nih14" and file_missing:
                extra = part.iloc[:file_missing].copy()
                extra["path"] = FILE_MISSING
                csv_rows = pd.concat([part, extra], ignore_index=True)
            files["csv"].append(
                write_split_csv(csv_rows.reset_index(drop=True), out / "datasets" / STUDY_CSV_NAMES[dataset])
            )
        files["h5"] = [w.result() for w in writes]
    return {"rows": rows, "dim": dim, "files": {k: [str(p) for p in v] for k, v in files.items()}}


def _write_h5_from(file: Path, keys: list[str], vectors_file: Path) -> Path:
    from cbir.study.format import write_h5

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

    import cbir.evaluate.retrieval  # noqa: F401
    import cbir.extract.single  # noqa: F401

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
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore

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
    return {
        "rows": len(manifest),
        "dim": encoder.dim,
        "manifest_s": manifest_s,
        "hdf5_to_cache_s": load_s,
        "per_key_lookup_us": per_key_s * 1e6,
        "cache_hit": extraction.cache_hit,
        "peak_rss_mb": _peak_mb(),
        "base_rss_mb": base_mb,
    }


def step_evaluate(
    data: Path,
    cache: Path,
    per_class: int,
    nlist: int | None,
    nprobe: int | None,
    ns=(1, 3, 5, 10),
    curve_k: int = 100,
    exact_queries: int = 2000,
) -> dict:
    """The Table-1 evaluation as a run does it (manifest, cached embeddings as a memory map, IVF
    with parameters from the size unless given, search, metrics, recall@10 against exact); then,
    in the same process, the baseline: exact flat search over the same index rows, timed on
    `exact_queries` sampled queries and scaled to all (search time is linear in the queries), and
    a per_class subset searched exactly."""
    from omegaconf import OmegaConf

    from cbir import CONFIG_DIR
    from cbir.encoders.precomputed import PrecomputedEncoder
    from cbir.evaluate import per_query
    from cbir.evaluate.retrieval import RetrievalSetup, choose_rows, run_retrieval
    from cbir.extract.single import extract_embeddings
    from cbir.extract.store import EmbeddingStore

    base_mb = _baseline_mb()
    start = time.perf_counter()
    manifest = _manifest(data)
    extraction = extract_embeddings(
        PrecomputedEncoder("biomedclip", dir=data / "embeddings"),
        manifest,
        EmbeddingStore(cache),
        _extract_cfg(),
        on_error="raise",
    )
    table, emb, valid = manifest.table, extraction.embeddings, extraction.valid
    setup = choose_rows(table, valid, "train", "test", None, 0)
    load_s = time.perf_counter() - start
    out: dict = {
        "cache_hit": extraction.cache_hit,
        "load_s": load_s,
        "queries": len(setup.query_rows),
        "index_rows": len(setup.index_rows),
        "matrix_mb": emb.nbytes / 2**20,
    }

    ivf = {"type": "ivf", "use_gpu": False, "params": {"nlist": nlist, "nprobe": nprobe}}
    timings: dict = {}
    approx, found = run_retrieval(
        table, emb, setup, OmegaConf.create(ivf), list(ns), curve_k, return_search=True, timings=timings
    )
    # the job's per-query records and bootstrap intervals (SPEC section 11), with eval.ci's defaults
    started = time.perf_counter()
    ci = OmegaConf.merge(OmegaConf.load(Path(CONFIG_DIR) / "eval" / "default.yaml"), {"n": list(ns)})
    per_query.add_retrieval_intervals(
        approx, per_query.retrieval_records(table, found, approx), OmegaConf.create({"eval": ci, "seed": 42})
    )
    timings["intervals_s"] = time.perf_counter() - started
    del found
    out["ivf"] = {
        "nlist": int(approx.metrics["index/nlist"]),
        "nprobe": int(approx.metrics["index/nprobe"]),
        **timings,
        "recall_at_10": approx.metrics["index/recall_at_10"],
        "micro_P_at_1": approx.metrics["micro/P_at_1"],
        "macro_P_at_1": approx.metrics["macro/P_at_1"],
        "micro_P_at_10": approx.metrics["micro/P_at_10"],
        "micro_P_at_1_interval": [approx.metrics["micro/P_at_1_ci_low"], approx.metrics["micro/P_at_1_ci_high"]],
        "macro_P_at_1_interval": [approx.metrics["macro/P_at_1_ci_low"], approx.metrics["macro/P_at_1_ci_high"]],
    }
    out["evaluation_s"] = load_s + sum(timings.values())
    out["evaluation_peak_rss_mb"] = _peak_mb()  # before the baseline below builds its own index
    del approx

    picked = np.sort(np.random.default_rng(0).permutation(setup.query_rows)[:exact_queries])
    flat = OmegaConf.create({"type": "flat", "use_gpu": False, "params": {}})
    exact_timings: dict = {}
    exact = run_retrieval(
        table, emb, RetrievalSetup(setup.index_rows, picked), flat, list(ns), curve_k, timings=exact_timings
    )
    scale = len(setup.query_rows) / len(picked)
    out["exact"] = {
        **exact_timings,
        "sampled_queries": len(picked),
        "all_queries_s": exact_timings["index_s"] + exact_timings["search_s"] * scale + timings["metrics_s"],
        "micro_P_at_1_sample": exact.metrics["micro/P_at_1"],
    }
    del exact
    # the ratio of the two, both measured here: robust to a CPU shared with other work
    out["ratio_to_exact"] = (load_s + sum(timings.values())) / (load_s + out["exact"]["all_queries_s"])
    subset_timings: dict = {}
    subset_setup = choose_rows(table, valid, "train", "test", per_class, 0)
    subset = run_retrieval(table, emb, subset_setup, flat, list(ns), curve_k, timings=subset_timings)
    out["per_class"] = {
        "per_class": per_class,
        "seconds": sum(subset_timings.values()),
        "index_rows": len(subset_setup.index_rows),
        "micro_P_at_1": subset.metrics["micro/P_at_1"],
    }
    out["peak_rss_mb"], out["base_rss_mb"] = _peak_mb(), base_mb
    out["peak_to_matrix"] = out["evaluation_peak_rss_mb"] / out["matrix_mb"]
    return out


def benchmark(
    rows: int, dim: int, workdir: Path, per_class: int = 1000, nlist: int | None = None, nprobe: int | None = None
) -> dict:
    """Fabricated files (made once per size, reused), HDF5 -> cache, then the evaluation; each
    step in its own process so its peak memory is its own."""
    data, cache = workdir / f"study_{rows}x{dim}", workdir / "cache"
    marker = data / "fabricated.json"
    if not marker.exists():  # the fabricated files are reused across runs of the same size
        start = time.perf_counter()
        facts = fabricate(data, rows, dim)
        facts["seconds"] = time.perf_counter() - start
        facts["peak_rss_mb"] = _peak_mb()
        marker.write_text(json.dumps(facts))
    load = _in_child(step_load, data, cache)
    evaluation = _in_child(step_evaluate, data, cache, per_class, nlist, nprobe)
    result = {"measured": {"load": load, "evaluate": evaluation}, "fabricated": json.loads(marker.read_text())}
    (workdir / "published_scale.json").write_text(json.dumps(result, indent=1))
    return result


def print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"published artifacts, {result['measured']['load']['rows']} rows (measured)")
    for column in ("step", "time", "peak RSS"):
        table.add_column(column)
    for row in result_rows(result):
        table.add_row(*row)
    Console(width=200).print(table)


def result_rows(result: dict) -> list[tuple[str, str, str]]:
    """(step, time, peak RSS) lines, as in the README's scale table."""
    fab, load, ev = result["fabricated"], result["measured"]["load"], result["measured"]["evaluate"]
    ivf, exact = ev["ivf"], ev["exact"]
    gb = 1 / 1024
    return [
        (
            "fabricate study-shaped files",
            f"{fab['seconds'] / 60:.1f} min",
            f"{fab['peak_rss_mb'] * gb:.1f} GB" if "peak_rss_mb" in fab else "-",
        ),
        ("split CSVs -> manifest", f"{load['manifest_s']:.0f} s", "-"),
        (
            "HDF5 -> embedding cache",
            (f"{load['hdf5_to_cache_s'] / 60:.1f} min ({load['hdf5_to_cache_s'] / load['rows'] * 1e6:.0f} us/row)"),
            f"{load['peak_rss_mb'] * gb:.1f} GB",
        ),
        ("  the study's h5f[key] per image (sample)", f"{load['per_key_lookup_us']:.0f} us/row", "-"),
        ("Table-1 evaluation: manifest + cached embeddings", f"{ev['load_s']:.0f} s", ""),
        (
            f"  IVF nlist={ivf['nlist']} (k-means on a sample), add {ev['index_rows']} rows",
            f"{ivf['index_s']:.0f} s",
            "",
        ),
        ("  exact neighbours of 1,000 sampled queries", f"{ivf['exact_sample_s']:.0f} s", ""),
        (f"  nprobe from the size, checked on them: nprobe={ivf['nprobe']}", f"{ivf.get('tune_s', 0):.0f} s", ""),
        (
            f"  search {ev['queries']} queries, k=100: recall@10 {ivf['recall_at_10']:.4f}",
            f"{ivf['search_s']:.0f} s",
            "",
        ),
        ("  metrics (P@N, breakdowns, curve)", f"{ivf['metrics_s']:.0f} s", ""),
        (
            "  whole evaluation",
            f"{ev['evaluation_s'] / 60:.1f} min",
            (
                f"{ev['evaluation_peak_rss_mb'] * gb:.1f} GB ({ev['peak_to_matrix']:.2f} x the "
                f"{ev['matrix_mb'] * gb:.1f} GB matrix)"
            ),
        ),
        (
            f"exact flat instead (search timed on {exact['sampled_queries']} queries, x all)",
            f"{exact['all_queries_s'] / 60:.0f} min (ratio {ev['ratio_to_exact']:.3f})",
            "",
        ),
        (
            f"exact, per_class={ev['per_class']['per_class']} ({ev['per_class']['index_rows']} rows)",
            f"{ev['per_class']['seconds']:.0f} s",
            f"{ev['peak_rss_mb'] * gb:.1f} GB (whole step)",
        ),
    ]


# ---------------------------------------------------------------- cbir.bench section
def measure(bc, sizes, data_dir: Path, work: Path) -> dict:
    """`python -m cbir.bench bench.sections=[published] bench.published.rows=1600000`: the run
    above, its figures recorded with the other sections (files and cache kept in workdir)."""
    pc = bc.published
    result = benchmark(int(pc.rows), int(pc.dim), Path(pc.workdir).resolve(), int(pc.per_class))
    ev = result["measured"]["evaluate"]
    return {
        **result,
        "ratio": ev["ratio_to_exact"],
        "peak_to_matrix": ev["peak_to_matrix"],
        "target_seconds": float(pc.target_minutes) * 60,
        "target_peak_to_matrix": float(pc.target_peak_to_matrix),
    }


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, measured, baseline, ratio, target) rows for the console and the README."""
    ev = result["measured"]["evaluate"]
    n = result["measured"]["load"]["rows"]
    fast = ev["evaluation_s"] <= result["target_seconds"] and ev["ivf"]["recall_at_10"] >= 0.99
    small = ev["peak_to_matrix"] <= result["target_peak_to_matrix"]
    return [
        (
            f"published {n} rows: Table-1 evaluation (IVF, recall@10 {ev['ivf']['recall_at_10']:.3f})",
            f"{ev['evaluation_s'] / 60:.1f} min",
            f"{ev['exact']['all_queries_s'] / 60:.0f} min exact flat",
            f"{result['ratio']:.3f}",
            (f"<= {result['target_seconds'] / 60:.0f} min, recall >= 0.99 {'ok' if fast else 'MISS'}"),
        ),
        (
            f"published {n} rows: evaluation peak RSS",
            f"{ev['evaluation_peak_rss_mb'] / 1024:.1f} GB",
            f"{ev['matrix_mb'] / 1024:.1f} GB embedding matrix",
            f"{result['peak_to_matrix']:.2f}",
            f"<= {result['target_peak_to_matrix']:.0f} {'ok' if small else 'MISS'}",
        ),
    ]


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from cbir import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench_published")
    def run(cfg: DictConfig) -> None:
        result = benchmark(int(cfg.rows), int(cfg.dim), Path(cfg.workdir), int(cfg.per_class), cfg.nlist, cfg.nprobe)
        print_result(result)
        print(f"written: {Path(cfg.workdir) / 'published_scale.json'}")

    run()


if __name__ == "__main__":
    main()
