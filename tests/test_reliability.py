"""Bad inputs, faults and safety (SPEC section 7): clear errors, counted skips, no lost work."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PROJECT, run_cbir, run_cbir_at_once, run_cbir_hang_guarded
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cbir.data.synthetic import SyntheticDataset
from cbir.encoders.classical import ClassicalEncoder
from cbir.extract.single import extract_embeddings
from cbir.extract.store import EmbeddingStore

SMALL = ["debug=smoke", "dataset.max_per_class=6", "dataset.min_per_class=4"]
EXTRACT = OmegaConf.create(
    dict(
        batch_size=8, num_workers=0, accelerator="cpu", devices=1, strategy="auto", precision="32-true", progress=False
    )
)


def output(proc) -> str:
    return proc.stdout + proc.stderr


def only_run(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cbir").experiment_id])
    return client, run


# ---------------------------------------------------------------------------- bad images
@pytest.fixture()
def damaged_data(tmp_path):
    """A small synthetic set with four broken images of different kinds."""
    data = tmp_path / "data"
    manifest = SyntheticDataset(
        root=data / "synthetic", max_per_class=6, min_per_class=4, image_size=48
    ).load_manifest()
    paths = manifest.table["path"].tolist()
    root = manifest.root
    (root / paths[0]).write_bytes(b"")  # zero bytes
    png = (root / paths[1]).read_bytes()
    (root / paths[1]).write_bytes(png[: len(png) // 2])  # truncated
    (root / paths[2]).write_text("this is not an image")  # wrong content
    (root / paths[3]).unlink()  # missing
    return data, paths[:4]


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_listed(tmp_path, damaged_data):
    data, broken = damaged_data
    proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={data}", "data.max_skip_fraction=0.1")
    assert "4 images could not be loaded" in output(proc)
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["data/skipped"] == 4
    local = client.download_artifacts(run.info.run_id, "skipped.csv", str(tmp_path))
    skipped = pd.read_csv(local)
    assert sorted(Path(p).name for p in skipped["path"]) == sorted(Path(p).name for p in broken)
    reasons = " ".join(skipped["reason"])
    assert "file not found" in reasons and "cannot decode" in reasons
    # skipped rows are neither queries nor index rows
    assert run.data.metrics["queries/total"] + run.data.metrics["index/size"] <= 6 * 36 - 4


@pytest.mark.slow
def test_on_error_raise_names_the_file(tmp_path, damaged_data):
    data, broken = damaged_data
    proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={data}", "data.on_error=raise", check=False)
    assert proc.returncode != 0
    text = output(proc)
    assert any(Path(b).name in text for b in broken) and "data.on_error=skip" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_on_error_raise_also_stops_on_a_cache_hit_holding_skipped_rows(tmp_path, damaged_data):
    data, broken = damaged_data
    run_cbir(tmp_path, *SMALL, f"paths.data_dir={data}", "data.max_skip_fraction=0.1", "tracking.enabled=false")
    proc = run_cbir(
        tmp_path, *SMALL, f"paths.data_dir={data}", "data.on_error=raise", "tracking.enabled=false", check=False
    )
    text = output(proc)
    assert proc.returncode == 2 and "Traceback" not in text
    assert Path(broken[0]).name in text and "data.on_error=skip" in text  # the first failed row


@pytest.mark.slow
def test_too_many_skips_abort_but_keep_the_embeddings(tmp_path, damaged_data):
    data, _ = damaged_data
    proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={data}", "data.max_skip_fraction=0.001", check=False)
    assert proc.returncode != 0 and "data.max_skip_fraction=0.001" in output(proc)
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    # nothing computed is lost: a second run with a looser limit reuses the extraction
    run_cbir(tmp_path, *SMALL, f"paths.data_dir={data}", "data.max_skip_fraction=0.1")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    latest = client.search_runs(
        [client.get_experiment_by_name("cbir").experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    assert latest.data.tags["cache"] == "hit" and latest.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_a_fifo_named_like_an_image_is_a_failed_row_not_a_hang(tmp_path, on_error):
    """Reading a FIFO waits for a writer forever: only regular files are opened."""
    root = (
        SyntheticDataset(root=tmp_path / "synthetic", max_per_class=6, min_per_class=4, image_size=48)
        .load_manifest()
        .root
    )
    os.mkfifo(root / "CT" / "chest" / "lesion" / "x.png")
    proc = run_cbir_hang_guarded(
        tmp_path,
        "debug=smoke",
        "encoder=baseline",
        "dataset=folder",
        f"dataset.root={root}",
        "extract.num_workers=1",
        "data.max_skip_fraction=0.1",
        f"data.on_error={on_error}",
        "tracking.enabled=false",
    )
    text = output(proc)
    assert "Traceback" not in text
    if on_error == "raise":
        assert proc.returncode == 2 and "x.png: a FIFO (named pipe), not an image file" in text
        return
    assert proc.returncode == 0 and "1 images could not be loaded" in text
    skipped = pd.read_csv(tmp_path / re.search(r"list: (\S+skipped\.csv)", text).group(1))
    assert [Path(p).name for p in skipped["path"]] == ["x.png"] and "FIFO" in skipped["reason"].iloc[0]


# ---------------------------------------------------------------------------- bad config
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["index.type=NoSuchIndex"], "index.type=NoSuchIndex: not a known index"),
        (["eval.n=[0,5]"], "eval.n=[0, 5]: give positive integers"),
        (["eval.n=[1,100000]"], "N=100000 is larger than the index"),
        (["eval.query_split=val2"], "eval.query_split=val2: "),
        (["index.per_class=-3"], "index.per_class=-3: must be positive"),
        (["data.on_error=ignore"], "data.on_error=ignore: use skip or raise"),
        (["encoder=biomedclip"], "Fix: run once with network access"),  # no cached weights offline
        (["index=hnsw", "index.params.M=0"], "index.params.M=0: give an integer >= 2"),  # FAISS would abort
        # the baseline's dimension is known once it is built (cheap): still before any extraction
        (
            ["index=ivfpq", "index.params.m=16"],
            "index.params.m=16: must divide the embedding dimension 285; use one of [1, 3, 5, 15, 19, 57, 95, 285]",
        ),
        # the index size is known from the manifest and index.per_class: PQ training needs 2^nbits rows
        (
            ["index=ivfpq", "index.params.m=5", "index.params.nbits=12"],
            "index.params.nbits=12: product quantisation needs at least 4096 index rows",
        ),
    ],
)
@pytest.mark.slow
def test_config_errors_are_one_line_and_come_before_any_work(tmp_path, shared_data_dir, overrides, message):
    proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={shared_data_dir}", *overrides, check=False)
    assert proc.returncode == 2
    assert message in output(proc) and "Traceback" not in output(proc)
    assert not (tmp_path / ".cache" / "cbir" / "embeddings").exists()  # no extraction
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # no run created


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["seed=-1"], "seed=-1: give an integer >= 0"),  # crashed in the gallery, after extraction
        (["index.seed=-1", "index.per_class=5"], "index.seed=-1: give an integer >= 0"),  # crashed sampling the index
        (["extract.accelerator=gpu"], "extract.accelerator=gpu: PyTorch sees no such device"),  # Lightning traceback
        (["paths.cache_dir={file}"], "paths.cache_dir={file}: {file} is a file, not a folder"),
        (["paths.cache_dir={file}/cache"], "paths.cache_dir={file}/cache: {file} is a file, not a folder"),
    ],
)
@pytest.mark.slow
def test_config_errors_come_before_data_generation(tmp_path, overrides, message):
    if "gpu" in str(overrides) and __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    file = tmp_path / "a_file"
    file.write_text("")
    overrides = [o.format(file=file) for o in overrides]
    proc = run_cbir(tmp_path, "dataset=synthetic_small", "paths.data_dir=data", *overrides, check=False)
    assert proc.returncode == 2 and "Traceback" not in output(proc)
    assert message.format(file=file) in output(proc)
    assert not (tmp_path / "data").exists() and not (tmp_path / ".cache").exists()  # no data, no cache entry
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


@pytest.mark.slow
def test_index_params_are_decided_before_extraction_and_logged_as_used(tmp_path, shared_data_dir):
    proc = run_cbir(tmp_path, *SMALL, f"paths.data_dir={shared_data_dir}", "index=ivf", "index.params.nlist=100000")
    text = output(proc)
    warning = "index.params.nlist=100000 > "
    assert text.count(warning) == 1 and text.index(warning) < text.index("embeddings baseline-")
    _, run = only_run(tmp_path)
    rows = int(run.data.metrics["index/size"])
    assert run.data.params["index.params.nlist"] == str(rows // 39)  # the value used, not the one asked for
    # the ivfpq preset works with the baseline's 285-d embeddings (m from its divisors)
    folder = tmp_path / "pq"
    folder.mkdir()
    run_cbir(folder, *SMALL, f"paths.data_dir={shared_data_dir}", "index=ivfpq", "index.params.nbits=4")
    _, run = only_run(folder)
    assert run.info.status == "FINISHED" and run.data.params["index.params.m"] == "15"


def test_unknown_encoder_lists_the_choices(tmp_path):
    proc = run_cbir(tmp_path, "encoder=nope", check=False)
    assert proc.returncode != 0
    assert "baseline" in output(proc) and "resnet50" in output(proc)


def test_unreachable_tracking_server_fails_fast_with_the_uri(tmp_path, shared_data_dir):
    # one probe, not MLflow's minutes of retries: a hang shows as the subprocess time-out (a guard
    # against hanging, not a speed measure)
    proc = run_cbir(
        tmp_path,
        *SMALL,
        f"paths.data_dir={shared_data_dir}",
        "tracking.uri=http://127.0.0.1:9",
        check=False,
        timeout=180,
    )
    assert proc.returncode == 2
    assert "tracking.uri=http://127.0.0.1:9: MLflow server not reachable" in output(proc)
    assert not (tmp_path / ".cache").exists()


# ---------------------------------------------------------------------------- data edge cases
def test_duplicate_paths_are_dropped_and_a_single_class_works():
    from cbir.evaluate import retrieval
    from cbir.job import checks

    table = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "a.png", "c.png", "d.png"],
            "dataset": "x",
            "split": ["train", "train", "test", "test", "test"],
            "modality": "CT",
            "anatomy": "abd",
            "label": "CT/abd/normal",
        }
    )
    deduped, count = checks.drop_duplicate_paths(table)
    assert count == 1 and deduped["path"].tolist() == ["a.png", "b.png", "c.png", "d.png"]
    embeddings = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    setup = retrieval.choose_rows(deduped, np.ones(4, bool), "train", "test", None, 0)
    result = retrieval.run_retrieval(
        deduped, embeddings, setup, OmegaConf.create({"type": "flat", "use_gpu": False}), [1, 2]
    )
    assert result.metrics["micro/P_at_1"] == 1.0 and result.metrics["macro/P_at_2"] == 1.0


# ---------------------------------------------------------------------------- faults
def test_damaged_cache_is_detected_and_recomputed(tmp_path):
    manifest = SyntheticDataset(root=tmp_path / "d", max_per_class=3, min_per_class=3, image_size=32).load_manifest()
    encoder, store = ClassicalEncoder(), EmbeddingStore(tmp_path / "cache")
    first = extract_embeddings(encoder, manifest, store, EXTRACT)
    reference = np.array(first.embeddings)
    path = first.cached.path / "embeddings.npy"
    del first
    # flip bytes inside the data: same size, different content
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))
    again = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert not again.cache_hit and np.array_equal(np.asarray(again.embeddings), reference)
    # truncated file
    path.write_bytes(path.read_bytes()[:-1000])
    third = extract_embeddings(encoder, manifest, store, EXTRACT)
    assert not third.cache_hit and np.array_equal(np.asarray(third.embeddings), reference)
    assert extract_embeddings(encoder, manifest, store, EXTRACT).cache_hit


def test_a_damaged_entry_is_reported_once(tmp_path, caplog):
    manifest = SyntheticDataset(root=tmp_path / "d", max_per_class=3, min_per_class=3, image_size=32).load_manifest()
    encoder, store = ClassicalEncoder(), EmbeddingStore(tmp_path / "cache")
    path = extract_embeddings(encoder, manifest, store, EXTRACT).cached.path / "embeddings.npy"
    for damage in range(2):  # each damage is news: one line each, though the entry is looked at twice
        data = bytearray(path.read_bytes())
        data[-64:] = bytes([damage + 1]) * 64
        path.write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level("WARNING", logger="cbir.extract.store"):
            assert not extract_embeddings(encoder, manifest, store, EXTRACT).cache_hit
        assert sum("is damaged" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_embeddings(tmp_path, shared_data_dir):
    """SIGKILL in the middle of extraction; the re-run finishes the missing rows only."""
    overrides = [
        *SMALL,
        f"paths.data_dir={shared_data_dir}",
        "encoder=resnet50",
        "encoder.pretrained=false",
        "encoder.input_size=128",
        "extract.batch_size=4",
        "tracking.enabled=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cbir.run", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done_files = lambda: list((tmp_path / ".cache/cbir/embeddings").glob("*.partial/done.npy"))  # noqa: E731
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        files = done_files()
        if files:
            done = np.load(files[0], mmap_mode="r")
            if 8 <= int((done > 0).sum()) < len(done) // 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = int((done > 0).sum())
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "extraction finished before it could be interrupted"
    resumed = run_cbir(tmp_path, *overrides)
    assert "resuming extraction" in output(resumed)
    (entry,) = (tmp_path / ".cache/cbir/embeddings").glob("resnet50-*[!k]")
    resumed_embeddings = np.load(entry / "embeddings.npy")
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    run_cbir(clean_dir, *overrides)
    (clean,) = (clean_dir / ".cache/cbir/embeddings").glob("resnet50-*[!k]")
    assert np.allclose(resumed_embeddings, np.load(clean / "embeddings.npy"), atol=1e-5)


@pytest.mark.slow
def test_a_full_cache_disk_is_one_line_and_the_same_command_works_once_there_is_room(tmp_path, shared_data_dir):
    """The cache on a real 432 KB file system (tmpfs), then grown to 4 MB. The 369 x 285 float32
    embeddings (421 KB) fit, the files the commit writes do not: that must be refused before any
    row is computed, not lost at the commit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=432k", "tmpfs", str(disk)], check=False, capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(mounted.stderr or mounted.stdout).strip()[:120]})")
    try:
        overrides = [
            "debug=smoke",
            f"paths.data_dir={shared_data_dir}",
            f"paths.cache_dir={disk}",
            "tracking.enabled=false",
        ]
        proc = run_cbir(tmp_path, *overrides, check=False)
        text = output(proc)
        assert proc.returncode == 2 and "Traceback" not in text
        assert re.search(rf"not enough space in {disk}: need .*KB, have .*KB; free some space there", text)
        assert not list(disk.glob("embeddings/*.partial"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert "micro" in output(run_cbir(tmp_path, *overrides))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_concurrent_jobs_extract_a_key_once(tmp_path, shared_data_dir):
    overrides = [*SMALL, f"paths.data_dir={shared_data_dir}", "tracking.enabled=false", "extract.batch_size=4"]
    finished = run_cbir_at_once(tmp_path, *overrides, timeout=300)
    assert all(code == 0 for code, _ in finished)
    text = "\n".join(out for _, out in finished)
    assert text.count(": extracted (") == 1 and text.count(": cache hit (") == 1


# ---------------------------------------------------------------------------- safety
def test_no_unsafe_deserialisation_or_shell_in_the_package():
    offenders = []
    for path in (PROJECT / "cbir").rglob("*.py"):
        text = path.read_text()
        for pattern in (
            r"allow_pickle\s*=\s*True",
            r"pickle\.loads?\(",
            r"\bshell\s*=\s*True",
            r"os\.system\(",
            r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)",
        ):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------- odd images
def _dicom(path: Path, transfer_syntax, pixel_data: bytes | None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixel_data is not None:
        ds.PixelData = pixel_data
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_odd_but_valid_images_go_through_the_preprocessing(tmp_path):
    from PIL import Image

    from cbir.data.images import load_image
    from cbir.encoders.preprocess import Preprocess

    files = {
        "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 128, 255, 10)),
        "one_pixel.png": Image.new("L", (1, 1), 200),
        "large.png": Image.new("L", (5000, 4000), 90),
        "rgba.png": Image.new("RGBA", (20, 20), (10, 20, 30, 0)),
    }
    transform = Preprocess(mode="shortest", resize=256, crop=224).build()
    for name, image in files.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode in ("L", "RGB"), name
        tensor = transform(loaded)
        assert tuple(tensor.shape) == (3, 224, 224) and torch_finite(tensor), name


def torch_finite(tensor) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


def test_dicom_without_pixels_or_with_unsupported_compression_is_a_clear_error(tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from cbir.data.images import ImageLoadError, load_image

    no_pixels = _dicom(tmp_path / "empty.dcm", ExplicitVRLittleEndian, None)
    with pytest.raises(ImageLoadError, match="empty.dcm.*no pixel data"):
        load_image(no_pixels)
    from pydicom.encaps import encapsulate

    compressed = _dicom(tmp_path / "j2k.dcm", JPEG2000Lossless, encapsulate([b"\xff\x4f\xff\x51 not really jpeg2000"]))
    with pytest.raises(ImageLoadError, match="j2k.dcm"):
        load_image(compressed)


# ---------------------------------------------------------------------- bad manifests
def _manifest(folder: Path, rows: list[str]) -> Path:
    from PIL import Image

    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (8, 8), 100).save(folder / name)
    path = folder / "manifest.csv"
    path.write_text("path,split,modality,anatomy,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("label", ["NaN", "nan", "NA", "null", "None", "", "  ", "<NA>"])
def test_a_missing_label_is_refused_naming_the_row_not_made_a_class(tmp_path, label):
    from cbir.data.csv_manifest import CSVManifestDataset
    from cbir.data.manifest import ManifestError

    file = _manifest(
        tmp_path, ["a.png,train,CT,abd,CT/abd/x", "b.png,train,CT,abd,CT/abd/x", f"c.png,test,CT,abd,{label}"]
    )
    with pytest.raises(ManifestError) as caught:
        CSVManifestDataset(file=str(file)).load_manifest()
    assert f"{file}, row 4: label is " in str(caught.value) and "\n" not in str(caught.value)


def test_a_parquet_manifest_with_nulls_is_refused_naming_the_row(tmp_path):
    from cbir.data.csv_manifest import CSVManifestDataset
    from cbir.data.manifest import ManifestError

    _manifest(tmp_path, [])
    table = pd.DataFrame(
        {
            "path": ["a.png", "b.png"],
            "split": ["train", "test"],
            "modality": "CT",
            "anatomy": "abd",
            "label": ["CT/abd/x", None],
        }
    )
    table.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m.parquet, row 2: label is "):  # was a class "None" or "nan"
        CSVManifestDataset(file=str(tmp_path / "m.parquet")).load_manifest()


def test_a_literal_class_name_is_kept(tmp_path):
    from cbir.data.csv_manifest import CSVManifestDataset

    file = _manifest(tmp_path, ["a.png,train,CT,abd,CT/abd/NaN-like", "b.png,test,CT,abd,None of these"])
    assert list(CSVManifestDataset(file=str(file)).load_manifest().table["label"]) == [
        "CT/abd/NaN-like",
        "None of these",
    ]


@pytest.mark.parametrize("content", [bytes(range(256)) * 40, b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 500, b""])
def test_a_binary_file_given_as_manifest_is_a_one_line_error(tmp_path, content):
    from cbir.data.csv_manifest import CSVManifestDataset
    from cbir.data.manifest import ManifestError

    (tmp_path / "scan.csv").write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        CSVManifestDataset(file=str(tmp_path / "scan.csv")).load_manifest()
    message = str(caught.value)
    assert "\n" not in message and (
        f"dataset.file={tmp_path / 'scan.csv'}: not a readable UTF-8 CSV file" in message
        or "missing column(s)" in message
    )


def test_a_binary_manifest_through_the_cli(tmp_path):
    (tmp_path / "scan.csv").write_bytes(bytes(range(256)) * 40)
    proc = run_cbir(
        tmp_path, "dataset=csv", f"dataset.file={tmp_path / 'scan.csv'}", "tracking.enabled=false", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in output(proc)
    assert f"dataset.file={tmp_path / 'scan.csv'}: not a readable UTF-8 CSV file" in output(proc)
