"""The study's published artifacts (split CSVs, HDF5 embeddings) as inputs, export back to them,
and the embedding parity check, on fabricated files in exactly the study's shape."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import compose, run_cbir
from omegaconf import OmegaConf

from cbir.bench.published import fabricate
from cbir.data.manifest import ManifestError
from cbir.data.study_splits import StudySplitsDataset
from cbir.encoders.base import EncoderError
from cbir.encoders.precomputed import PrecomputedEncoder
from cbir.evaluate.retrieval import choose_rows, run_retrieval
from cbir.extract.single import extract_embeddings
from cbir.extract.store import EmbeddingStore
from cbir.job.checks import DataError
from cbir.study.export import export_embeddings, manifest_and_embeddings
from cbir.study.parity import compare

EXTRACT = OmegaConf.create(
    dict(
        batch_size=32, num_workers=0, accelerator="cpu", devices=1, strategy="auto", precision="32-true", progress=False
    )
)
HEADER = "filepath,dataset,split,modality,anatomic_region"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """datasets/{nih14,radimagenet}.csv and embeddings/BiomedCLIPVitB16_224/{nih14,radiology_ai}.h5;
    300 rows, 16-d, plus 2 NIH rows with the study's `File Missing` path."""
    out = tmp_path_factory.mktemp("published")
    fabricate(out, rows=300, dim=16, file_missing=2)
    return out


def reader(published: Path, **kw) -> StudySplitsDataset:
    return StudySplitsDataset(root=kw.pop("root", published), dir=published / "datasets", images_needed=False, **kw)


def h5_files(published: Path) -> list[Path]:
    return sorted((published / "embeddings" / "BiomedCLIPVitB16_224").glob("*.h5"))


def load(encoder, manifest, tmp_path, on_error="raise"):
    return extract_embeddings(encoder, manifest, EmbeddingStore(tmp_path / "cache"), EXTRACT, on_error=on_error)


# ------------------------------------------------------------------------------ split CSVs
def test_one_hot_columns_become_the_label_by_arg_max(tmp_path):
    csv = tmp_path / "mimic.csv"
    csv.write_text(
        f"{HEADER},XR/chest/Edema,XR/chest/No Finding,XR/chest/Pleural Effusion\n"
        "mimic/a.jpg,mimic,train,XR,chest,0.0,1.0,0.0\n"
        "mimic/b.jpg,mimic,test,XR,chest,1,0,0\n"
        "mimic/c.jpg,mimic,val,XR,chest,,,1.0\n"
    )  # blanks (combined CSVs) count as 0
    table = StudySplitsDataset(root=tmp_path, files=[csv], images_needed=False).load_manifest().table
    assert table["label"].tolist() == ["XR/chest/No Finding", "XR/chest/Edema", "XR/chest/Pleural Effusion"]
    assert table["split"].tolist() == ["train", "test", "val"]
    assert set(table["anatomy"]) == {"chest"} and set(table["dataset"]) == {"mimic"}

    csv.write_text(
        f"{HEADER},XR/chest/Edema,XR/chest/No Finding\n"
        "mimic/a.jpg,mimic,train,XR,chest,1,0\n"
        "mimic/b.jpg,mimic,train,XR,chest,1,1\n"
        "mimic/c.jpg,mimic,train,XR,chest,0,0\n"
    )
    with pytest.raises(ManifestError, match=r"2 row\(s\) do not hold exactly one 1.*lines \[3, 4\]"):
        StudySplitsDataset(root=tmp_path, files=[csv], images_needed=False).load_manifest()


def test_a_csv_without_the_study_header_is_refused(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("path,split,label\na.png,train,XR/chest/Edema\n")
    with pytest.raises(ManifestError, match="x.csv: not a study split CSV"):
        StudySplitsDataset(root=tmp_path, files=[csv], images_needed=False).load_manifest()


def test_file_missing_rows_are_dropped_and_counted(published):
    data = reader(published)
    manifest = data.load_manifest()
    assert len(manifest) == 300 and "File Missing" not in set(manifest.table["path"])
    assert data.last_scan.dropped == {"rows with filepath 'File Missing' (images the study did not find)": 2}
    csv = pd.read_csv(published / "datasets" / "nih14.csv")
    nih = manifest.table[manifest.table["dataset"] == "nih14"]
    assert len(nih) == len(csv) - 2  # every other row kept, split and anatomy carried over
    first = csv.iloc[0]
    row = manifest.table.set_index("path").loc[first["filepath"]]
    assert (row["split"], row["anatomy"]) == (first["split"], first["anatomic_region"])


def test_image_files_are_checked_only_when_an_encoder_reads_images(published, tmp_path):
    absent_root = tmp_path / "no_images"
    # precomputed embeddings: no image check, the root need not even exist
    assert len(reader(published, root=absent_root).load_manifest()) == 300
    with pytest.raises(ManifestError, match=r"300 image\(s\) listed in the metadata are missing"):
        StudySplitsDataset(root=published, dir=published / "datasets", images_needed=True).load_manifest()
    image = published / reader(published).load_manifest().table["path"].iloc[0]
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"png")
    try:
        data = StudySplitsDataset(root=published, dir=published / "datasets", images_needed=True, missing="drop")
        assert len(data.load_manifest()) == 1 and data.last_scan.dropped["image file missing"] == 299
    finally:
        image.unlink()


def test_config_wires_the_image_check_to_the_encoder():
    assert compose("dataset=study_splits", "encoder=precomputed").dataset.images_needed is False
    assert compose("dataset=study_splits", "encoder=baseline").dataset.images_needed is True


# ------------------------------------------------------------------------ precomputed encoder
def test_precomputed_embeddings_land_in_the_cache_by_key(published, tmp_path):
    manifest = reader(published).load_manifest()
    encoder = PrecomputedEncoder("biomedclip", dir=published / "embeddings")
    assert encoder.files == h5_files(published) and encoder.dim == 16
    first = load(encoder, manifest, tmp_path)
    assert not first.cache_hit and first.valid.all()
    with h5py.File(published / "embeddings" / "BiomedCLIPVitB16_224" / "radiology_ai.h5") as h5:
        for row in [0, 7, 299]:
            path = manifest.table["path"].iloc[row]
            if path.startswith("radiology_ai/"):
                np.testing.assert_array_equal(first.embeddings[row], h5[path][()])
    assert load(PrecomputedEncoder("biomedclip", dir=published / "embeddings"), manifest, tmp_path).cache_hit
    # the files' identity keys the entry: a rewritten file is a new entry
    copy = tmp_path / "copy"
    shutil.copytree(published / "embeddings", copy)
    moved = PrecomputedEncoder("biomedclip", dir=copy)
    assert moved.cache_key() != encoder.cache_key()


def test_rows_without_an_embedding_stop_the_run_or_are_counted(published, tmp_path):
    manifest = reader(published).load_manifest()
    only_nih = PrecomputedEncoder("biomedclip", files=[published / "embeddings/BiomedCLIPVitB16_224/nih14.h5"])
    n_rad = int((manifest.table["dataset"] == "radiology_ai").sum())
    with pytest.raises(DataError, match=rf"{n_rad} of 300 manifest rows have no embedding.*'radiology_ai/"):
        load(only_nih, manifest, tmp_path, on_error="raise")
    skipped = load(only_nih, manifest, tmp_path / "skip", on_error="skip")
    assert (~skipped.valid).sum() == n_rad
    listed = pd.read_csv(skipped.cached.path / "skipped.csv")
    assert len(listed) == n_rad and listed["path"].str.startswith("radiology_ai/").all()


def test_a_cached_missing_key_under_on_error_raise_names_the_key_and_the_files(published, tmp_path):
    manifest = reader(published).load_manifest()
    nih = published / "embeddings/BiomedCLIPVitB16_224/nih14.h5"
    only_nih = PrecomputedEncoder("biomedclip", files=[nih])
    load(only_nih, manifest, tmp_path, on_error="skip")
    first = next(p for p in manifest.table["path"] if p.startswith("radiology_ai/"))
    with pytest.raises(
        DataError,
        match=rf"key '{first}': no embedding under this key in {nih} \(row .*"
        r"on_error=raise; add or fix the HDF5 file holding this key in encoder.files",
    ) as e:
        load(only_nih, manifest, tmp_path, on_error="raise")  # the failure is cached: no image, no image advice
    advice = str(e.value).split("on_error=raise")[1]
    assert "image" not in advice and "retry_failed" not in advice


def test_nan_or_inf_embeddings_are_failed_rows_or_stop_naming_file_and_key(published, tmp_path):
    from cbir.evaluate.retrieval import choose_rows

    manifest = reader(published).load_manifest()
    nih = tmp_path / "nih14.h5"
    shutil.copy(published / "embeddings/BiomedCLIPVitB16_224/nih14.h5", nih)
    keys = sorted(p for p in manifest.table["path"] if p.startswith("nih14/"))[3:5]
    with h5py.File(nih, "a") as h5:
        h5[keys[0]][0] = np.nan
        h5[keys[1]][5] = np.inf
    files = [published / "embeddings/BiomedCLIPVitB16_224/radiology_ai.h5", nih]
    with pytest.raises(DataError, match=rf"{nih}: the embedding under key '{keys[0]}' holds NaN or inf values"):
        load(PrecomputedEncoder("biomedclip", files=files), manifest, tmp_path / "raise", on_error="raise")
    loaded = load(PrecomputedEncoder("biomedclip", files=files), manifest, tmp_path, on_error="skip")
    bad = [int(np.flatnonzero(manifest.table["path"] == k)[0]) for k in keys]
    assert sorted(np.flatnonzero(~loaded.valid).tolist()) == sorted(bad)
    assert np.isfinite(loaded.embeddings).all()
    listed = pd.read_csv(loaded.cached.path / "skipped.csv")
    assert sorted(listed["path"]) == keys and listed["reason"].str.contains("NaN or inf").all()
    setup = choose_rows(manifest.table, loaded.valid, "train", "test", None, 0)
    assert not set(bad) & (set(setup.index_rows) | set(setup.query_rows))
    with pytest.raises(DataError, match=rf"key '{keys[0]}': the embedding in {nih} holds NaN or inf"):
        load(PrecomputedEncoder("biomedclip", files=files), manifest, tmp_path, on_error="raise")  # a cache hit


def test_a_corrupt_or_truncated_hdf5_file_is_a_clear_error(published, tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(EncoderError, match="garbage.h5: not a readable HDF5 file"):
        PrecomputedEncoder("biomedclip", files=[garbage])
    good = published / "embeddings/BiomedCLIPVitB16_224/nih14.h5"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EncoderError, match="truncated.h5: not a readable HDF5 file"):
        PrecomputedEncoder("biomedclip", files=[truncated])


def test_a_key_in_two_files_is_an_error(published, tmp_path):
    manifest = reader(published).load_manifest()
    nih = published / "embeddings/BiomedCLIPVitB16_224/nih14.h5"
    again = tmp_path / "nih14_again.h5"
    shutil.copy(nih, again)
    encoder = PrecomputedEncoder("biomedclip", files=[*h5_files(published), again])
    with pytest.raises(
        DataError, match=r"appear in more than one file, e\.g\. 'nih14/.*nih14\.h5 and .*nih14_again\.h5"
    ):
        load(encoder, manifest, tmp_path)


def test_files_of_different_dimensions_are_an_error(published, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5.create_dataset("CheXpert/x.jpg", data=np.ones(8, np.float32))
    with pytest.raises(EncoderError, match=r"different lengths \(.*nih14.h5: 16.*other.h5: 8"):
        PrecomputedEncoder("biomedclip", files=[*h5_files(published), other])
    # one odd vector inside a file: caught while reading, naming the key
    odd = tmp_path / "odd.h5"
    shutil.copy(published / "embeddings/BiomedCLIPVitB16_224/nih14.h5", odd)
    manifest = reader(published).load_manifest()
    key = max(p for p in manifest.table["path"] if p.startswith("nih14/"))  # not the first one visited
    with h5py.File(odd, "a") as h5:
        del h5[key]
        h5.create_dataset(key, data=np.ones(8, np.float32))
    rad = published / "embeddings/BiomedCLIPVitB16_224/radiology_ai.h5"
    with pytest.raises(DataError, match=rf"embedding '{key}' has shape \(8,\), the others \(16,\)"):
        load(PrecomputedEncoder("biomedclip", files=[rad, odd]), manifest, tmp_path)


def test_precomputed_encoder_cannot_embed_images(published):
    with pytest.raises(EncoderError, match="cannot embed new images"):
        PrecomputedEncoder("biomedclip", dir=published / "embeddings").transform()


# ------------------------------------------------------------------- round trip and parity
@pytest.fixture(scope="module")
def baseline_export(tmp_path_factory, shared_data_dir):
    """The baseline encoder on the small synthetic set, extracted once and exported."""
    work = tmp_path_factory.mktemp("roundtrip")
    cfg = compose(
        "debug=smoke", f"paths.data_dir={shared_data_dir}", f"paths.cache_dir={work / 'cache'}", "encoder=baseline"
    )
    manifest, encoder, extraction = manifest_and_embeddings(cfg)
    files = export_embeddings(manifest.table, extraction.embeddings, extraction.valid, work / "export", encoder.name)
    return cfg, manifest, extraction, work, files


def metrics(cfg, manifest, embeddings, valid) -> dict:
    setup = choose_rows(manifest.table, valid, "train", "test", None, 0)
    return run_retrieval(manifest.table, embeddings, setup, cfg.index, [1, 3, 5, 10], 20).metrics


def test_export_then_import_gives_identical_metrics(baseline_export):
    cfg, manifest, extraction, work, files = baseline_export
    assert [f.name for f in files["csv"]] == ["synthetic.csv"]
    assert [f.relative_to(work / "export").as_posix() for f in files["h5"]] == ["embeddings/baseline/synthetic.h5"]
    header = pd.read_csv(files["csv"][0], nrows=0).columns.tolist()
    assert header[:5] == ["filepath", "dataset", "split", "modality", "anatomic_region"]
    again = compose(
        "debug=smoke",
        f"paths.cache_dir={work / 'cache'}",
        "dataset=study_splits",
        f"dataset.files=[{files['csv'][0]}]",
        f"dataset.root={work / 'nowhere'}",
        "encoder=precomputed",
        "encoder.name=baseline",
        f"encoder.dir={work / 'export' / 'embeddings'}",
    )
    manifest2, _, imported = manifest_and_embeddings(again)
    pd.testing.assert_frame_equal(manifest2.table, manifest.table)
    assert metrics(cfg, manifest, extraction.embeddings, extraction.valid) == metrics(
        again, manifest2, imported.embeddings, imported.valid
    )


def test_parity_passes_for_the_same_preprocessing_and_catches_a_wrong_resize(baseline_export):
    cfg, manifest, extraction, work, files = baseline_export
    published = PrecomputedEncoder("baseline", files=files["h5"])
    theirs = extract_embeddings(published, manifest, EmbeddingStore(work / "cache"), EXTRACT, on_error="skip")
    same = compare(manifest.table, extraction.embeddings, extraction.valid, theirs.embeddings, theirs.valid)
    assert same.passed and same.compared == len(manifest) and same.summary["min"].min() > 0.9999
    assert set(same.summary["modality"]) == {"CT", "MR", "US", "XR", "all"}

    resized = compose(
        "debug=smoke",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={work / 'cache'}",
        "encoder=baseline",
        "encoder.image_size=40",
    )  # the deliberate preprocessing error
    _, _, wrong = manifest_and_embeddings(resized)
    report = compare(manifest.table, wrong.embeddings, wrong.valid, theirs.embeddings, theirs.valid, threshold=0.99)
    assert not report.passed and report.verdict == "FAIL"
    overall = report.summary.set_index("dataset").loc["all"]
    assert overall["p1"] < 0.99 and overall["below_threshold"] > 0
    assert len(report.worst) == 20 and report.worst["cosine"].is_monotonic_increasing
    assert report.worst["cosine"].iloc[0] == pytest.approx(overall["min"])

    with pytest.raises(DataError, match="8-d, the published ones"):
        compare(
            manifest.table, np.ones((len(manifest), 8), np.float32), extraction.valid, theirs.embeddings, theirs.valid
        )


def test_parity_fails_when_too_few_rows_are_compared(baseline_export, tmp_path, caplog):
    from cbir.job.checks import ConfigError
    from cbir.study.parity import parity_command, write_report

    cfg, manifest, extraction, work, files = baseline_export
    theirs = extract_embeddings(
        PrecomputedEncoder("baseline", files=files["h5"]),
        manifest,
        EmbeddingStore(work / "cache"),
        EXTRACT,
        on_error="skip",
    )
    n = len(manifest)
    one = np.zeros(n, bool)
    one[0] = True  # the published files hold a single row: identical, but it says nothing about the rest
    report = compare(manifest.table, extraction.embeddings, extraction.valid, theirs.embeddings, one)
    assert not report.passed and report.verdict == "FAIL" and report.compared == 1
    assert report.summary.set_index("dataset").loc["all", "p1"] > 0.9999
    assert report.coverage().startswith(
        f"1 of {n} rows compared; not compared: {n - 1} rows without a published embedding, 0 rows cbir could not embed"
    )
    assert "FAIL: fewer than parity.min_compared=0.95 of the rows compared in" in report.coverage()
    saved = write_report(report, tmp_path / "out")["json"].read_text()
    assert f'"manifest_rows": {n}' in saved and '"verdict": "FAIL"' in saved
    # the command: published files holding that one row
    export_embeddings(manifest.table, extraction.embeddings, one, tmp_path / "one", "baseline")
    common = [
        "debug=smoke",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={work / 'cache'}",
        "encoder=baseline",
    ]
    with caplog.at_level("ERROR", logger="cbir.study.parity"):
        report = parity_command(
            compose(
                *common,
                f"parity.dir={tmp_path / 'one' / 'embeddings'}",
                f"parity.output_dir={tmp_path / 'parity'}",
                config_name="parity",
            )
        )
    assert not report.passed and report.compared == 1
    assert f"1 of {n} rows compared" in caplog.text and "skipped.csv" in caplog.text

    # enough rows overall, but one dataset/modality group short of its share
    modality = manifest.table["modality"].to_numpy()
    group = np.flatnonzero(modality == "CT")
    most = np.ones(n, bool)
    most[group[: max(1, len(group) // 10)]] = False
    report = compare(manifest.table, extraction.embeddings, most, theirs.embeddings, theirs.valid)
    shares = report.summary.set_index("modality")["share"]
    assert shares["all"] >= 0.95 and shares["CT"] < 0.95 and not report.passed
    assert "rows cbir could not embed" in report.coverage() and "synthetic/CT" in report.coverage()
    assert compare(
        manifest.table, extraction.embeddings, most, theirs.embeddings, theirs.valid, min_compared=0.8
    ).passed  # the key lowers the bar

    assert compose("encoder=baseline", config_name="parity").parity.min_compared == 0.95
    with pytest.raises(ConfigError, match=r"parity.min_compared=2: give the share of rows that must be compared"):
        parity_command(
            compose(
                "encoder=baseline", "parity.min_compared=2", f"paths.data_dir={tmp_path / 'no'}", config_name="parity"
            )
        )
    assert not (tmp_path / "no").exists()  # refused before any work


@pytest.fixture(scope="module")
def two_models(published, tmp_path_factory) -> Path:
    """The published set with a second model folder (the same vectors under the DINOv2 name)."""
    out = tmp_path_factory.mktemp("two_models")
    shutil.copytree(published, out, dirs_exist_ok=True)
    shutil.copytree(out / "embeddings" / "BiomedCLIPVitB16_224", out / "embeddings" / "DINOv2ViTB14")
    return out


@pytest.mark.slow
def test_cbir_run_sweeps_published_embeddings(two_models, tmp_path):
    """The user's command: a sweep over two published models and two index sizes, no images."""
    run_cbir(
        tmp_path,
        "-m",
        "debug=smoke",
        "dataset=study_splits",
        f"dataset.dir={two_models / 'datasets'}",
        f"dataset.root={tmp_path / 'no_images'}",
        "encoder=precomputed",
        f"encoder.dir={two_models / 'embeddings'}",
        "encoder.name=biomedclip,dinov2",
        "index.per_class=5,null",
        "eval.gallery=false",
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["encoder"] for r in children} == {"biomedclip", "dinov2"}
    # same vectors under both names: both full-index runs score the same
    full = {
        r.data.tags["encoder"]: r.data.metrics["micro/P_at_1"] for r in children if r.data.tags["per_class"] == "all"
    }
    assert full["biomedclip"] == full["dinov2"]
    for name in ("biomedclip", "dinov2"):  # the second index size of a model reuses its cache entry
        assert sorted(r.data.tags["cache"] for r in children if r.data.tags["encoder"] == name) == ["hit", "miss"]


@pytest.mark.slow
def test_paper_table1_from_published_embeddings(two_models, tmp_path):
    import sys

    from conftest import PROJECT

    sys.path.insert(0, str(PROJECT))
    from experiments import paper_table1
    from experiments.common import load_config

    cfg = load_config(
        "paper_table1",
        ["source=published", f"published_dir={two_models}", f"workdir={tmp_path}", "cbir=['debug=smoke']"],
    )
    files = paper_table1.run(cfg)
    table = pd.read_csv(files["table1.csv"]).set_index("encoder")
    assert sorted(table.index) == ["biomedclip", "dinov2"]
    comparison = pd.read_csv(files["comparison.csv"]).set_index("encoder")
    measured = table.loc["biomedclip", "micro P@1"]
    assert comparison.loc["biomedclip", "micro P@1"] == f"{measured:.3f} ({measured - 0.594:+.3f} vs 0.594)"


@pytest.mark.slow
def test_scale_benchmark_measures_every_step(tmp_path):
    from cbir.bench.published import benchmark

    result = benchmark(rows=3000, dim=16, workdir=tmp_path, per_class=50)
    load, evaluation = result["measured"]["load"], result["measured"]["evaluate"]
    assert load["rows"] == 3000 and load["dim"] == 16 and not load["cache_hit"]
    assert evaluation["cache_hit"]  # the evaluation reads the entry the load step wrote
    assert evaluation["per_class"]["index_rows"] <= 12 * 50 < evaluation["index_rows"]
    ivf = evaluation["ivf"]
    assert ivf["recall_at_10"] >= 0.99  # nprobe unset: raised until the sampled recall reaches 0.99
    stages = ("index_s", "exact_sample_s", "tune_s", "search_s", "metrics_s", "intervals_s")
    assert set(stages) <= set(ivf)
    assert evaluation["evaluation_s"] == pytest.approx(evaluation["load_s"] + sum(ivf[k] for k in stages))
    low, high = ivf["micro_P_at_1_interval"]  # the run's bootstrap interval around its P@1
    assert low <= ivf["micro_P_at_1"] <= high and high - low > 0
    assert evaluation["exact"]["sampled_queries"] == min(2000, evaluation["queries"])
    assert evaluation["ratio_to_exact"] > 0 and evaluation["peak_to_matrix"] > 0
    assert (tmp_path / "published_scale.json").is_file()


def test_export_and_parity_commands_from_their_configs(baseline_export, tmp_path):
    """`python -m cbir.export` / `python -m cbir.parity` as composed from conf/export.yaml and
    conf/parity.yaml (the run's own overrides pick its cache entry)."""
    from cbir.study.export import export_command
    from cbir.study.parity import parity_command

    cfg, manifest, extraction, work, files = baseline_export
    common = [
        "debug=smoke",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.cache_dir={work / 'cache'}",
        "encoder=baseline",
    ]
    written = export_command(compose(*common, f"export.dir={tmp_path / 'export'}", config_name="export"))
    assert [f.name for f in written["h5"]] == ["synthetic.h5"]
    parity = compose(
        *common,
        f"parity.dir={tmp_path / 'export' / 'embeddings'}",
        f"parity.output_dir={tmp_path / 'parity'}",
        config_name="parity",
    )
    report = parity_command(parity)
    assert report.passed and report.compared == len(manifest)
    saved = pd.read_csv(tmp_path / "parity" / "parity_summary.csv")
    assert saved["rows"].iloc[-1] == len(manifest) and (tmp_path / "parity" / "parity.json").is_file()


def test_fast_reader_gives_what_hdf5_reads_for_every_layout_and_type(tmp_path):
    """Contiguous little-endian float32 datasets (what write_h5 and h5py write) are copied from the
    file's bytes at their offset; chunked, compressed, big-endian or float64 ones go through HDF5.
    Every one must come back with the values h5py reads."""
    from cbir.study.format import dataset_keys, read_vectors, write_h5

    rng = np.random.default_rng(0)
    file = write_h5(
        tmp_path / "mixed.h5",
        [f"nih14/images_00{i % 2}/{i}.png" for i in range(6)],
        rng.standard_normal((6, 8)).astype(np.float32),
    )
    with h5py.File(file, "a") as h5:
        h5.create_dataset("radiology_ai/CT/f64.png", data=rng.standard_normal(8))  # float64
        h5.create_dataset("radiology_ai/CT/be.png", data=rng.standard_normal(8).astype(">f4"))
        h5.create_dataset(
            "radiology_ai/MR/zip.png", data=rng.standard_normal(8).astype(np.float32), chunks=(8,), compression="gzip"
        )
    with h5py.File(file, "r") as h5:
        keys = dataset_keys(h5)
        expected = np.stack([h5[k][:].astype(np.float32) for k in keys])
        read = np.concatenate([block.copy() for _, block in read_vectors(h5, file, keys, 8, batch=4)])
    assert len(keys) == 9
    np.testing.assert_array_equal(read, expected)
