"""Query by image on a saved index: `python -m cbir.search search.index_dir=<dir> 'search.images=[...]'`,
or by free text when the index's encoder has a text tower: `search.text='chest X-ray with pneumothorax'`.

A run with `index.save=true` writes the index folder (into its job dir and to MLflow):
    index.faiss    the FAISS index (CPU form), vectors L2-normalised, inner product = cosine
    manifest.csv   the indexed rows in index order (path relative to `root`, split, classes)
    index.json     the encoder config and seed (to rebuild the same encoder), the image root,
                   index type and parameters, where the index came from, and what ties the
                   folder together (see check_files and check_encoder)

What is checked before a search answers, so that it never serves another index's neighbours:
- at load: SHA-256 of index.faiss and manifest.csv against index.json (a file swapped or edited
  since saving), the row counts and dimension, and every manifest path inside the image root;
- when the encoder is built, before any query is embedded: its identity (the key of its embedding
  cache entry) against index.json, then a fingerprint: a few index rows whose image is unchanged
  (same SHA-256) are embedded again and must give the stored vectors (cosine >= FINGERPRINT_COSINE);
  where the index gives back a row's vector (flat, HNSW), the stored vectors must match it too.
A mismatch is a SearchError naming the file and the command that rebuilds the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as cbir.run: never wait on an unreachable hub

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger("cbir.search")
INDEX_FILE, MANIFEST_FILE, META_FILE = "index.faiss", "manifest.csv", "index.json"
MANIFEST_COLUMNS = ["path", "dataset", "split", "modality", "anatomy", "label"]
FINGERPRINT_ROWS = 4  # index rows embedded again when the encoder is built
# the same image through the same encoder: 1 up to float noise (a GPU bf16 run read back on a CPU stays
# above 0.99); another encoder of the same dimension gives unrelated vectors (about 0 to 0.5)
FINGERPRINT_COSINE = 0.98


class SearchError(ValueError):
    """A missing or inconsistent index folder or query; the message says what to do."""


# ------------------------------------------------------------------ saving (cbir.run side)
def save_index(
    folder: Path, search, table: pd.DataFrame, root: Path, cfg, run_name: str, encoder, embeddings: np.ndarray
) -> Path:
    """Write the index folder of a run. `search` is the run's cbir.evaluate.retrieval.SearchOutput, `embeddings`
    the run's embeddings of every manifest row (a few index rows are kept as the fingerprint)."""
    import faiss
    from omegaconf import OmegaConf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from cbir.evaluate.index import gpu_available

    index = search.index
    if gpu_available():  # a GPU index (or shards over GPUs) cannot be written as it is
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(folder / INDEX_FILE))
    rows = table.iloc[search.setup.index_rows]
    rows[[c for c in MANIFEST_COLUMNS if c in rows]].to_csv(folder / MANIFEST_FILE, index=False)
    meta = {
        "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
        "seed": int(cfg.seed),  # random-init encoders (pretrained=false) are rebuilt from it
        "root": str(Path(root).resolve()),
        "rows": int(index.ntotal),
        "dim": int(index.d),
        "index": {
            "type": str(cfg.index.type),
            "params": OmegaConf.to_container(cfg.index.params, resolve=True),
            "per_class": OmegaConf.to_container(cfg.index, resolve=True).get("per_class"),
            "split": str(cfg.index.split),
        },
        "dataset": str(cfg.dataset.name),
        "run_name": run_name,
        "similarity": "cosine (inner product of L2-normalised embeddings)",
        "command": rebuild_command(cfg),
        "files": {name: file_digest(folder / name) for name in (INDEX_FILE, MANIFEST_FILE)},
        "encoder_key": encoder.cache_key(),
        "fingerprint": fingerprint(search.setup.index_rows, embeddings, [Path(root) / p for p in table["path"]]),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return folder


def file_digest(path: Path) -> str:
    """SHA-256 of a regular file (anything else is an ImageLoadError, see open_regular)."""
    from cbir.data.images import open_regular

    with open_regular(path) as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(index_rows: np.ndarray, embeddings: np.ndarray, paths: list[Path]) -> list[dict]:
    """A few index positions, spread over the index, with the SHA-256 of their image and their stored
    (L2-normalised) embedding; rows whose image cannot be read now are left out."""
    from cbir.data.images import ImageLoadError
    from cbir.evaluate import index as cbir_index

    out = []
    for position in np.unique(np.linspace(0, len(index_rows) - 1, FINGERPRINT_ROWS).round().astype(int)):
        row = int(index_rows[position])
        try:
            digest = file_digest(paths[row])
        except (OSError, ImageLoadError):
            continue
        vector = cbir_index.l2_normalise(np.asarray(embeddings[row : row + 1]))[0]
        out.append(
            {"position": int(position), "image_sha256": digest, "embedding": [round(float(v), 6) for v in vector]}
        )
    return out


def rebuild_command(cfg) -> str:
    """The command that makes this index again: the job's overrides plus index.save=true."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (called from Python)
        overrides = [f"dataset={cfg.dataset.name}", f"encoder={cfg.encoder.name}"]
    overrides = [o for o in overrides if not o.startswith("index.save=")] + ["index.save=true"]
    return "python -m cbir.run " + " ".join(shlex.quote(o) for o in overrides)


# ------------------------------------------------------------------ loading and searching
@dataclass
class SavedIndex:
    index: object
    manifest: pd.DataFrame
    meta: dict
    root: Path
    folder: Path

    @classmethod
    def load(cls, folder: str | Path, root: str | Path | None = None) -> SavedIndex:
        """The index folder, checked: every damaged or foreign file is a SearchError naming it.
        Nothing in the folder is run: index.json is data (see build_encoder)."""
        folder = Path(folder)
        missing = [name for name in (INDEX_FILE, MANIFEST_FILE, META_FILE) if not (folder / name).is_file()]
        if missing:
            raise SearchError(
                f"search.index_dir={folder}: missing {', '.join(missing)}; point it at the "
                "`index` folder of a run made with index.save=true"
            )
        meta = read_meta(folder / META_FILE)
        check_files(folder, meta)
        root = Path(root) if root else Path(meta["root"])
        manifest = read_index_manifest(folder / MANIFEST_FILE, root, meta)
        index = read_faiss(folder / INDEX_FILE)
        if index.ntotal != len(manifest) or index.ntotal != meta["rows"] or index.d != meta["dim"]:
            raise SearchError(
                f"{folder}: the index holds {index.ntotal} {index.d}-d vectors, manifest.csv "
                f"{len(manifest)} rows, index.json says {meta['rows']} {meta['dim']}-d; "
                "the folder is damaged, save the index again"
            )
        check_index_vectors(folder, index, meta)
        return cls(index, manifest, meta, root, folder)

    def build_encoder(self):
        """The run's encoder: same config, same seed (hence the same random init if any). Only
        an encoder class shipped with cbir is built from index.json, with plain values."""
        import torch
        from hydra.errors import InstantiationException
        from omegaconf import OmegaConf

        from cbir.common.safe_config import check_trusted
        from cbir.job.inputs import build

        check_trusted(self.meta["encoder"], "cbir.encoders", f"{META_FILE} encoder")
        torch.manual_seed(self.meta["seed"])
        try:
            encoder = build(OmegaConf.create(self.meta["encoder"]))
        except InstantiationException as e:  # e.g. an option the class does not take
            reason = str(e.__cause__ or e).strip().splitlines()[-1][:200]
            raise SearchError(
                f"{META_FILE} encoder: cannot build {self.meta['encoder'].get('_target_')} ({reason}); "
                f"{self.rebuild_hint()}"
            ) from None
        encoder.eval()
        if encoder.dim != self.index.d:
            raise SearchError(
                f"encoder {encoder.name} gives {encoder.dim}-d embeddings, the index holds {self.index.d}-d vectors"
            )
        self.check_encoder(encoder)
        return encoder

    def rebuild_hint(self) -> str:
        return f"rebuild the index: {self.meta['command']}"

    def check_encoder(self, encoder) -> None:
        """The encoder is the one the index rows were embedded with: same identity as recorded, and the
        fingerprint rows whose image is unchanged give their stored vectors again."""
        from cbir.data.images import ImageLoadError

        source = self.folder / META_FILE
        if encoder.cache_key() != self.meta["encoder_key"]:
            raise SearchError(
                f"{source}: the encoder it describes ({encoder.name}, key {encoder.cache_key()}) is not "
                f"the one the index was made with (key {self.meta['encoder_key']}); {self.rebuild_hint()}"
            )
        images, stored = [], []
        for entry in self.meta["fingerprint"]:
            path = self.root / self.manifest["path"].iat[entry["position"]]
            try:
                unchanged = file_digest(path) == entry["image_sha256"]
            except (OSError, ImageLoadError):
                unchanged = False
            if unchanged:
                images.append(path)
                stored.append(entry["embedding"])
        if not images:
            log.warning(
                "%s: none of its fingerprint images is unchanged under %s; the encoder is checked by its identity only",
                source,
                self.root,
            )
            return
        from cbir.evaluate import index as cbir_index

        stored = cbir_index.l2_normalise(np.asarray(stored, dtype=np.float32))
        again = cbir_index.l2_normalise(embed_images(encoder, images))
        worst = int(np.argmin((again * stored).sum(1)))
        cosine = float((again[worst] * stored[worst]).sum())
        if cosine < FINGERPRINT_COSINE:
            raise SearchError(
                f"{source}: the encoder it describes does not give the index's vectors (cosine "
                f"{cosine:.3f} for {images[worst]}, expected >= {FINGERPRINT_COSINE}); "
                f"{self.rebuild_hint()}"
            )

    def search(self, images: list[str | Path], k: int = 5, encoder=None, batch_size: int = 16):
        """(scores, positions) of the k nearest index rows for each image (positions into manifest)."""
        from cbir.evaluate import index as cbir_index

        vectors = embed_images(encoder or self.build_encoder(), images, batch_size)
        return cbir_index.search(self.index, cbir_index.l2_normalise(vectors), min(int(k), self.index.ntotal))

    def search_text(self, texts: list[str], k: int = 5, tokenizers_dir: str | None = None):
        """(scores, positions) of the k nearest index rows for each free-text query, embedded by the
        text tower of the index's encoder (same config and seed as the run)."""
        from omegaconf import OmegaConf

        from cbir.encoders.text import build_text_tower, has_text_tower
        from cbir.evaluate import index as cbir_index

        encoder_cfg = OmegaConf.create(self.meta["encoder"])
        if not has_text_tower(encoder_cfg):
            raise SearchError(
                f"search.text: the index's encoder {encoder_cfg.get('name')} has no text tower; text "
                "queries need an index made with one that has (clip, biomedclip, bmc_clip, medsiglip), "
                "or query by image with search.images"
            )
        vectors = build_text_tower(encoder_cfg, self.meta["seed"], tokenizers_dir).encode(list(texts)).numpy()
        if vectors.shape[1] != self.index.d:
            raise SearchError(
                f"encoder {encoder_cfg.get('name')}: its text tower gives {vectors.shape[1]}-d "
                f"embeddings, the index holds {self.index.d}-d vectors"
            )
        return cbir_index.search(self.index, cbir_index.l2_normalise(vectors), min(int(k), self.index.ntotal))


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SearchError(f"{path}: not valid JSON ({e}); the index folder is damaged, save the index again") from None
    if not isinstance(meta, dict):
        raise SearchError(f"{path}: expected a JSON object; the index folder is damaged, save the index again")
    from cbir.common.safe_config import check_trusted

    check_trusted(meta.get("encoder"), "cbir.encoders", f"{path} encoder")  # before anything else uses it
    for key, kind in (("rows", int), ("dim", int), ("seed", int), ("root", str)):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), kind):
            raise SearchError(
                f"{path}: '{key}' is missing or not a {kind.__name__}; the index folder is damaged, "
                "save the index again"
            )
    command = meta.get("command") if isinstance(meta.get("command"), str) else "python -m cbir.run ... index.save=true"
    meta["command"] = " ".join(command.split())  # shown in messages: one line
    ties = (
        isinstance(meta.get("files"), dict)
        and all(isinstance(meta["files"].get(n), str) for n in (INDEX_FILE, MANIFEST_FILE))
        and isinstance(meta.get("encoder_key"), str)
        and isinstance(meta.get("fingerprint"), list)
        and all(_fingerprint_entry(e, meta["rows"], meta["dim"]) for e in meta["fingerprint"])
    )
    if not ties:
        raise SearchError(
            f"{path}: no checksums, encoder key or fingerprint tie the folder's files to its rows "
            f"(saved by an older cbir, or edited); rebuild the index: {command}"
        )
    return meta


def _fingerprint_entry(entry, rows: int, dim: int) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("position"), int)
        and 0 <= entry["position"] < rows
        and isinstance(entry.get("image_sha256"), str)
        and isinstance(entry.get("embedding"), list)
        and len(entry["embedding"]) == dim
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry["embedding"])
    )


def check_files(folder: Path, meta: dict) -> None:
    """index.faiss and manifest.csv are the files saved with index.json (their SHA-256 as recorded)."""
    for name in (INDEX_FILE, MANIFEST_FILE):
        if file_digest(folder / name) != meta["files"][name]:
            raise SearchError(
                f"{folder / name}: not the file saved with {META_FILE} (its SHA-256 differs: replaced or "
                f"edited since); rebuild the index: {meta['command']}"
            )


def check_index_vectors(folder: Path, index, meta: dict) -> None:
    """Where the index gives back a row's vector (flat, HNSW), the fingerprint rows must hold the
    vectors index.json records: an index file swapped along with its checksum is caught too."""
    positions = [entry["position"] for entry in meta["fingerprint"]]
    kept = stored_vectors(index, positions)
    if kept is None:
        return
    stored = np.asarray([entry["embedding"] for entry in meta["fingerprint"]], dtype=np.float32)
    stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    if float((kept * stored).sum(1).min()) < FINGERPRINT_COSINE:
        raise SearchError(
            f"{folder / INDEX_FILE}: does not hold the vectors {META_FILE} records for its rows "
            f"(another index); rebuild the index: {meta['command']}"
        )


def stored_vectors(index, positions: list[int]) -> np.ndarray | None:
    """The vectors at these positions, when the index structure keeps them (None for IVF, PQ, ...)."""
    import faiss

    if not positions:
        return None
    inner = faiss.downcast_index(index)
    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if not isinstance(storage, faiss.IndexFlat):
        return None
    return np.stack([index.reconstruct(int(p)) for p in positions])


def read_index_manifest(path: Path, root: Path, meta: dict) -> pd.DataFrame:
    """The indexed rows; every path must stay inside the image root, as in a CSV manifest."""
    from cbir.data.manifest import path_inside

    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except ValueError as e:  # pandas' ParserError, EmptyDataError, UnicodeDecodeError
        raise SearchError(
            f"{path}: not a readable CSV file ({type(e).__name__}); the index folder is damaged, save the index again"
        ) from None
    missing = [c for c in ("path", "label") if c not in manifest.columns]
    if missing:
        raise SearchError(f"{path}: missing column(s) {missing}; the index folder is damaged, save the index again")
    inside = [path_inside(root, p) for p in manifest["path"]]
    if None in inside:
        row = inside.index(None)
        raise SearchError(
            f"{path}, row {row + 2}: path {manifest['path'].iat[row]!r} is outside the image root "
            f"{os.path.abspath(root)}; rebuild the index: {meta['command']}"
        )
    manifest["path"] = inside
    return manifest


def read_faiss(path: Path):
    import faiss

    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise SearchError(
            f"{path}: not a readable FAISS index ({reason}); the index folder is damaged, save the index again"
        ) from None


def embed_images(encoder, images, batch_size: int = 16) -> np.ndarray:
    """Embeddings of image files (PNG/JPEG/DICOM), preprocessed as in extraction."""
    import torch

    from cbir.data.images import load_image

    transform = encoder.transform()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(load_image(p)) for p in images[start : start + batch_size]])
        with torch.inference_mode():
            out.append(encoder(batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def results_table(saved: SavedIndex, images, scores, positions) -> pd.DataFrame:
    rows = []
    for q, image in enumerate(images):
        for rank, (position, score) in enumerate(zip(positions[q], scores[q]), start=1):
            if position < 0:
                continue
            hit = saved.manifest.iloc[int(position)]
            rows.append(
                {
                    "query": str(image),
                    "rank": rank,
                    "similarity": float(score),
                    "label": hit["label"],
                    "path": str(saved.root / hit["path"]),
                    "index_row": int(position),
                }
            )
    return pd.DataFrame(rows)


def write_gallery(saved: SavedIndex, images, scores, positions, path: Path) -> Path:
    """Gallery of outside queries: the index manifest plus the query files as extra rows
    (absolute paths, unknown class), so one table serves cbir.report.gallery.draw_gallery."""
    from cbir.report.gallery import draw_gallery

    queries = pd.DataFrame({"path": [str(Path(p).resolve()) for p in images], "label": ""})
    table = pd.concat([saved.manifest[["path", "label"]], queries], ignore_index=True)
    query_rows = np.arange(len(saved.manifest), len(table))
    return draw_gallery(
        table,
        saved.root,
        query_rows,
        positions,
        scores,
        path,
        title=f"nearest images in {saved.meta.get('run_name', 'the index')} "
        f"({saved.meta['encoder'].get('name', '')}, cosine similarity)",
    )


def print_results(results: pd.DataFrame, saved: SavedIndex) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"top-{results['rank'].max() if len(results) else 0} of {saved.index.ntotal} indexed images "
        f"({saved.meta['encoder'].get('name', '?')})"
    )
    for column in ("query", "rank", "similarity", "label", "path"):
        table.add_column(column, justify="right" if column in ("rank", "similarity") else "left")
    for row in results.itertuples():
        table.add_row(Path(row.query).name, str(row.rank), f"{row.similarity:.4f}", row.label, row.path)
    Console(width=200).print(table)


def search_command(cfg) -> pd.DataFrame:
    from cbir.job.checks import integer

    k = integer(cfg.search.k, "search.k", minimum=1)
    images = cfg.search.images or []
    images = [Path(images)] if isinstance(images, str) else [Path(p) for p in images]  # one file or a list
    texts = cfg.search.get("text") or []
    texts = [str(texts)] if isinstance(texts, str) else [str(t) for t in texts]
    if texts and images:
        raise SearchError("give either search.images or search.text, not both (one search, one kind of query)")
    if texts:
        return text_search_command(cfg, texts, k)
    if not images:
        raise SearchError(
            "search.images is empty; give query files, e.g. 'search.images=[scan.png]', or a text "
            "query, e.g. \"search.text='chest X-ray with pleural effusion'\""
        )
    absent = [str(p) for p in images if not p.exists()]
    if absent:
        raise SearchError(f"search.images: no such file(s): {', '.join(absent)}")
    from cbir.data.images import not_regular

    odd = [f"{p} ({not_regular(p.stat().st_mode)})" for p in images if not_regular(p.stat().st_mode)]
    if odd:
        raise SearchError(f"search.images: not image file(s): {', '.join(odd)}; give PNG, JPEG or DICOM files")
    saved = SavedIndex.load(cfg.search.index_dir, cfg.search.get("root"))
    scores, positions = saved.search(images, k)
    results = results_table(saved, images, scores, positions)
    print_results(results, saved)
    if cfg.search.get("output"):
        Path(cfg.search.output).parent.mkdir(parents=True, exist_ok=True)
        results.to_csv(cfg.search.output, index=False)
        log.info("results written to %s", cfg.search.output)
    if cfg.search.get("gallery"):
        log.info("gallery written to %s", write_gallery(saved, images, scores, positions, Path(cfg.search.gallery)))
    return results


def text_search_command(cfg, texts: list[str], k: int) -> pd.DataFrame:
    saved = SavedIndex.load(cfg.search.index_dir, cfg.search.get("root"))
    scores, positions = saved.search_text(texts, k, cfg.search.get("tokenizers_dir"))
    results = results_table(saved, texts, scores, positions)
    print_results(results, saved)
    if cfg.search.get("output"):
        Path(cfg.search.output).parent.mkdir(parents=True, exist_ok=True)
        results.to_csv(cfg.search.output, index=False)
        log.info("results written to %s", cfg.search.output)
    if cfg.search.get("gallery"):
        from cbir.report.gallery import draw_gallery

        path = draw_gallery(
            saved.manifest[["path", "label"]],
            saved.root,
            np.zeros(len(texts), dtype=int),
            positions,
            scores,
            Path(cfg.search.gallery),
            query_texts=texts,
            title=f"nearest images to text queries in {saved.meta.get('run_name', 'the index')} "
            f"({saved.meta['encoder'].get('name', '')}, cosine similarity)",
        )
        log.info("gallery written to %s", path)
    return results


def main():
    import hydra

    from cbir import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="search")
    def search_main(cfg) -> None:
        from cbir.data.images import ImageLoadError
        from cbir.job.inputs import user_errors

        try:
            search_command(cfg)
        except (SearchError, ImageLoadError, *user_errors()) as e:
            log.error("%s", e)
            sys.exit(2)

    search_main()


if __name__ == "__main__":
    main()
