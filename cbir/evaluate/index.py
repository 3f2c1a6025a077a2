"""Index subset sampling, FAISS index construction and batched k-NN search."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def sample_per_class(labels: pd.Series | np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Positions of at most `per_class` rows of each class, sorted.

    One seeded permutation ranks all rows; each class keeps its first `per_class` rows in
    that ranking. The ranking does not depend on `per_class`, so subsets are nested (the
    100-row subset of a class is inside its 1000-row subset)."""
    labels = np.asarray(labels)
    n = len(labels)
    if per_class is None:
        return np.arange(n)
    per_class = int(per_class)
    if per_class <= 0:
        raise ValueError(f"index.per_class={per_class}: must be a positive number, or null for all rows")
    rank = np.empty(n, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(n)] = np.arange(n)
    codes, _ = pd.factorize(labels)
    order = np.lexsort((rank, codes))  # by class, then by random rank
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    position_in_class = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(order[position_in_class < per_class])


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit-length float32 rows (a copy; all-zero rows stay zero)."""
    import faiss

    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


# index.type names; anything else is passed to faiss.index_factory as it is
INDEX_TYPES = {"flat": "Flat", "ivf": "IVF{nlist},Flat", "hnsw": "HNSW{M},Flat", "ivfpq": "IVF{nlist},PQ{m}x{nbits}"}
# build-time parameters that go into the factory string, with defaults
FACTORY_PARAMS = {"nlist": 1024, "M": 32, "m": None, "nbits": 8}  # m=None: pq_size(dim)
MAX_PQ_SIZE = 16
# search/build-time parameters set on the index (through faiss.ParameterSpace, so they reach
# the IVF/HNSW level inside wrappers); efConstruction must be set before adding vectors
RUNTIME_PARAMS = ("nprobe", "efSearch", "efConstruction")


# smallest value FAISS accepts for each integer parameter (HNSW with M < 2 and PQ with
# nbits=0 crash the process; nlist/nprobe=0 fail at search time)
PARAM_MINIMUM = {"nlist": 1, "M": 2, "m": 1, "nbits": 1, "nprobe": 1, "efSearch": 1, "efConstruction": 1}
MAX_NBITS = 16  # 2**nbits centroids per sub-quantiser; more is neither useful nor trainable


def check_params(type: str, params: dict | None, dim: int | None = None) -> None:
    """Reject index.params that FAISS would refuse late (or crash on): unknown keys, values that
    are not integers or below FAISS's minimum, and (when `dim` is known) a PQ size `m` that does
    not divide the embedding dimension."""
    from cbir.common.errors import ConfigError

    params = dict(params or {})
    known = set(FACTORY_PARAMS) | set(RUNTIME_PARAMS) | {"shard"}
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"index.params: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    for name, minimum in PARAM_MINIMUM.items():
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"index.params.{name}={value}: give an integer >= {minimum}")
    if params.get("shard") is not None and not isinstance(params["shard"], bool):
        raise ConfigError(f"index.params.shard={params['shard']}: give true or false")
    if int(params.get("nbits", FACTORY_PARAMS["nbits"])) > MAX_NBITS:
        raise ConfigError(f"index.params.nbits={params['nbits']}: give at most {MAX_NBITS} (8 is usual)")
    m = params.get("m")
    if dim and m is not None and "{m}" in INDEX_TYPES.get(type, "") and dim % int(m):
        raise ConfigError(
            f"index.params.m={m}: must divide the embedding dimension {dim}; use one of "
            f"{divisors(dim)}, or leave it unset (null) to take {pq_size(dim)}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pq_size(dim: int) -> int:
    """index.params.m when unset: the largest divisor of the embedding dimension up to 16 (16 for
    the usual 384/512/768/1024/2048-d embeddings, 15 for the baseline's 285)."""
    return max(d for d in divisors(dim) if d <= MAX_PQ_SIZE)


def settled_params(type: str, params: dict | None, n_rows: int, dim: int) -> dict:
    """index.params as an index of `n_rows` rows of `dim`-d vectors is built with them: an unset
    PQ size chosen from the dimension, nlist lowered (with a warning) when it exceeds the rows,
    and a ConfigError when product quantisation has too few rows to train. A run settles them
    before extraction (from the planned index size), so the values used are the ones logged."""
    from cbir.common.errors import ConfigError

    params = dict(params or {})
    factory = INDEX_TYPES.get(type, "")
    if "{m}" in factory and params.get("m") is None:
        params["m"] = pq_size(dim)
    nlist = params.get("nlist", FACTORY_PARAMS["nlist"])  # None: chosen from the index size (sized_params)
    if "{nlist}" in factory and nlist is not None and int(nlist) > n_rows:
        params["nlist"] = max(1, n_rows // 39)  # FAISS wants >= 39 training vectors per list
        log.warning("index.params.nlist=%d > %d index rows: using nlist=%d", nlist, n_rows, params["nlist"])
    nbits = int(params.get("nbits", FACTORY_PARAMS["nbits"]))
    if "{nbits}" in factory and n_rows < 2**nbits:
        raise ConfigError(
            f"index.params.nbits={nbits}: product quantisation needs at least {2**nbits} index rows "
            f"to train, the index has {n_rows}; lower nbits or use index=ivf"
        )
    return params


def factory_string(type: str, params: dict | None = None) -> str:
    params = {**FACTORY_PARAMS, **(params or {})}
    return INDEX_TYPES.get(type, type).format(**params) if type in INDEX_TYPES else type


def apply_params(index, params: dict) -> None:
    """Set nprobe / efSearch / efConstruction on a (CPU) index, if the structure has them."""
    import faiss

    space = faiss.ParameterSpace()
    for name in RUNTIME_PARAMS:
        if params.get(name) is not None:
            value = int(params[name])
            if name == "efConstruction":
                hnsw = faiss.downcast_index(index)
                if hasattr(hnsw, "hnsw"):
                    hnsw.hnsw.efConstruction = value
                continue
            space.set_index_parameter(index, name, value)


# IVF defaults from the index size (index.params.nlist / nprobe null): nlist ~ 2 sqrt(rows), k-means
# trained on TRAIN_PER_LIST sampled vectors per list; nprobe scans ~1/NPROBE_SHARE of the lists,
# at least MIN_NPROBE (recall@10 >= 0.99 on the study-shaped data at 100k and 1.6M rows; measured
# by every run, see cbir.evaluate.retrieval.neighbour_recall)
TRAIN_PER_LIST = 50
MIN_NPROBE = 32
NPROBE_SHARE = 48
ADD_BLOCK = 65536  # rows normalised and added at a time: no second full copy of the vectors


def sized_params(type: str, params: dict | None, n_rows: int) -> dict:
    """index.params with nlist and nprobe chosen from the index size where they are unset (null)."""
    params = dict(params or {})
    if "{nlist}" not in INDEX_TYPES.get(type, ""):
        return params
    if params.get("nlist") is None:
        params["nlist"] = int(min(max(1, n_rows // 39), max(16, round(2 * n_rows**0.5))))
    if params.get("nprobe") is None:
        params["nprobe"] = int(min(params["nlist"], max(MIN_NPROBE, params["nlist"] // NPROBE_SHARE)))
    return params


def training_sample(vectors, n_lists: int, seed: int = 0):
    """TRAIN_PER_LIST rows per list, sampled with a fixed seed (all rows when there are fewer)."""
    n = len(vectors)
    size = TRAIN_PER_LIST * n_lists
    if n <= size:
        return vectors[:]
    return vectors[np.sort(np.random.default_rng(seed).choice(n, size, replace=False))]


def build_index(vectors, type: str = "flat", use_gpu="auto", params: dict | None = None):
    """A FAISS inner-product index over L2-normalised `vectors` (inner product = cosine).
    `vectors` is an array, or anything with len(), .shape and row indexing (slices, sorted
    positions) that returns normalised float32 blocks (cbir.evaluate.retrieval.NormalisedRows): rows are
    added block by block, and an IVF is trained on a sample, so no full copy is made besides
    the index's own."""
    import faiss

    dim = vectors.shape[1]
    params = sized_params(type, params, len(vectors))
    check_params(type, params, dim)
    params = settled_params(type, params, len(vectors), dim)
    factory = factory_string(type, params)
    if factory == "Flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    apply_params(index, params)
    # IVF k-means on a sample; other trained structures (index_factory strings) on every row
    lists = (
        int(params.get("nlist", FACTORY_PARAMS["nlist"])) if "{nlist}" in INDEX_TYPES.get(type, "") else len(vectors)
    )
    if use_gpu is True or (use_gpu == "auto" and gpu_available()):
        if not gpu_available():
            raise RuntimeError(
                "index.use_gpu=true but FAISS sees no GPU; install cbir[gpu] on a GPU machine or set index.use_gpu=auto"
            )
        if not index.is_trained:  # train on the CPU index; GPU cloning of HNSW is not supported
            index.train(np.ascontiguousarray(training_sample(vectors, lists)))
        options = faiss.GpuMultipleClonerOptions()
        options.shard = bool(params.get("shard", True))  # split the rows over the GPUs
        index = faiss.index_cpu_to_all_gpus(index, co=options)
        if params.get("nprobe") is not None:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))
    if not index.is_trained:
        index.train(np.ascontiguousarray(training_sample(vectors, lists)))
    for start in range(0, len(vectors), ADD_BLOCK):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_BLOCK], dtype=np.float32))
    return index


def search(
    index, queries: np.ndarray, k: int, batch_size: int = 4096, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, positions) for each query, in batches (no full query x index matrix).

    exclude[q] = index position of query q itself (or -1): that hit is removed, and one extra
    neighbour is fetched in its place. Ties in score are ordered by index position, so results
    are deterministic."""
    n_queries = len(queries)
    has_exclude = exclude is not None and np.any(exclude >= 0)
    fetch = min(k + (1 if has_exclude else 0), index.ntotal)
    scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    ids = np.full((n_queries, k), -1, dtype=np.int64)
    for start in range(0, n_queries, batch_size):
        stop = min(start + batch_size, n_queries)
        s, i = index.search(np.ascontiguousarray(queries[start:stop], dtype=np.float32), fetch)
        if has_exclude:
            own = i == exclude[start:stop, None]
            s = np.where(own, -np.inf, s)
            i = np.where(own, -1, i)
        # stable order: score descending, then index position ascending, missing (-1) last
        order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), -s), axis=1)
        s = np.take_along_axis(s, order, 1)[:, :k]
        i = np.take_along_axis(i, order, 1)[:, :k]
        scores[start:stop, : s.shape[1]] = s
        ids[start:stop, : i.shape[1]] = i
    return scores, ids
