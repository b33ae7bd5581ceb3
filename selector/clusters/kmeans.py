"""k-means over document embeddings: Quad's clusters (its bandit arms) and their neighbours.

Geometry. Embeddings are L2-normalised, so we run *spherical* k-means (faiss ``Kmeans`` with
``spherical=True``: centroids are re-normalised every iteration) and measure everything in
**cosine distance** ``d(u, v) = 1 - u.v`` on unit vectors (``= ||u - v||^2 / 2``):

* a document's ``distance`` is the cosine distance to its assigned (nearest) centroid;
* two clusters are *neighbours* when the cosine distance between their unit centroids is
  below ``neighbour_radius`` (default 0.2, Quad's value); Quad spreads a cluster's reward to
  its neighbours with weight ``1 - d / radius``;
* the within-cluster sum of squares (WCSS) is ``sum ||x - c(x)||^2`` over the sample.

Choosing k (``k: auto``). Fit k-means on the elbow sample (a seeded subset of the sample, at
most ``elbow_sample_size`` documents) for each k of a grid (default: powers of two from 2 up to
``elbow sample / 20``, at most 16384), compute WCSS(k) there, and take the *elbow*: put
the points on axes ``x = log k`` and ``y = WCSS``, scale both to [0, 1], draw the chord from
the first to the last point, and pick the k whose point lies furthest below that chord (the
kneedle rule for a decreasing convex curve). If no point lies below the chord (no bend), the
largest k of the grid is used. Ties go to the smaller k. The chosen k is then fit on the whole
sample. For corpus-scale runs (Quad used ~10,000 clusters for ~600M documents) give k.

Work-dir outputs::

    cluster_fit/centroids.npy            float32 [k, dim], unit rows (+ marker: k, elbow table)
    cluster/<shard_key>.parquet          doc_id, row, cluster (int32), distance (float32), n_tokens
    cluster_summary/clusters.parquet     cluster, size, tokens, mean_distance
    cluster_summary/neighbours.parquet   cluster, neighbour, distance  (d < radius; each cluster's
                                         max_neighbours nearest; both directions)

Assignment streams one shard at a time and searches in chunks of ``assign_batch_size``, so
memory is bounded by one shard's embeddings plus a chunk's results. faiss-gpu is used when
the ``faiss`` module has GPU support and sees a GPU (``use_gpu: auto``), faiss-cpu otherwise.
On CPU, the same seed gives the same centroids and assignments.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from selector.config_base import StrictModel
from selector.clusters.embedding import STAGE as EMBED_STAGE
from selector.errors import StageError
from selector.data.workdir import WorkDir, stable_hash

FIT_STAGE = "cluster_fit"
ASSIGN_STAGE = "cluster"
SUMMARY_STAGE = "cluster_summary"
MAX_AUTO_K = 16384


class ClusterConfig(StrictModel):
    """The cluster stage: k-means fit on a sample, then assignment of every document."""

    k: int | Literal["auto"] = Field("auto", description="Number of clusters, or 'auto' for the WCSS elbow "
                                     "over k_grid.")
    k_grid: list[int] | None = Field(None, description="k values tried when k is 'auto' (default: powers of "
                                     "two from 2 to sample/20, at most 16384).")
    sample_size: int = Field(100_000, ge=1, description="Documents sampled (uniformly, seeded) to fit k-means.")
    elbow_sample_size: int = Field(20_000, ge=1, description="With k 'auto', the grid fits use a seeded subset "
                                   "of the sample this large (one fit per grid k), then the chosen k is fit on "
                                   "the whole sample.")
    niter: int = Field(20, ge=1, description="k-means iterations.")
    nredo: int = Field(1, ge=1, description="Independent k-means runs; the best objective is kept.")
    max_points_per_centroid: int = Field(256, ge=1, description="faiss subsamples (seeded) the sample to "
                                         "k * this many points per fit, bounding fit time.")
    init: Literal["random", "kmeans++", "afk-mc2"] = Field(
        "random", description="Centroid initialisation: random sample (faiss default, cheapest), k-means++ "
        "(better, O(n k d)) or AFK-MC2 (near k-means++ at lower cost); needs faiss >= 1.12.")
    seed: int = 0
    neighbour_radius: float = Field(0.2, gt=0.0, le=2.0, description="Clusters whose unit centroids are "
                                    "closer than this cosine distance are neighbours.")
    max_neighbours: int | None = Field(64, ge=1, description="Each cluster keeps at most its this many "
                                       "nearest neighbours within the radius (null: all), so the neighbour "
                                       "graph and the bandit are O(k * max_neighbours), not O(k^2).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="faiss-gpu when importable and a GPU is "
                                            "visible (auto), forced (true) or never (false).")
    assign_batch_size: int = Field(65_536, ge=1, description="Documents per faiss search call.")

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"cluster.k must be >= 1 or 'auto', got {v}")
        return v

    @field_validator("k_grid")
    @classmethod
    def _grid_valid(cls, v):
        if v is not None:
            if not v:
                raise ValueError("cluster.k_grid is empty")
            if any(k < 1 for k in v):
                raise ValueError(f"cluster.k_grid values must be >= 1: {v}")
            v = sorted(set(v))
        return v

    def fit_identity(self) -> dict:
        """The fields that change the centroids (not the device, not the search chunk size)."""
        return self.model_dump(include={"k", "k_grid", "sample_size", "niter", "nredo", "init", "seed", "elbow_sample_size",
                                        "max_points_per_centroid"})


# --------------------------------------------------------------------------------- devices


def faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_use_gpu(setting: bool | str) -> bool:
    if setting == "auto":
        return faiss_gpu_available()
    if setting and not faiss_gpu_available():
        raise StageError("cluster.use_gpu is true but faiss has no GPU support or sees no GPU "
                         "(install the gpu extra, faiss-gpu, in place of faiss-cpu)")
    return bool(setting)


# --------------------------------------------------------------------------------- checks


def check_finite(x: np.ndarray, where: str, row_offset: int = 0) -> None:
    """Raise :class:`StageError` naming ``where`` and the first rows holding NaN or inf."""
    finite = np.isfinite(x).all(axis=1) if x.ndim == 2 else np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite)[:5] + row_offset
        raise StageError(f"{where}: non-finite embedding (NaN or inf) at row(s) {bad.tolist()} "
                         f"({int((~finite).sum())} in total); re-embed the shard")


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------- fitting


@dataclass
class KMeansFit:
    centroids: np.ndarray  # float32 [k, dim], unit rows
    wcss: float  # on the fitting sample
    seconds: float


def fit_kmeans(x: np.ndarray, k: int, config: ClusterConfig, use_gpu: bool | None = None) -> KMeansFit:
    """Spherical k-means of ``x`` (rows L2-normalised) into ``k`` clusters with faiss."""
    import faiss

    x = _as_f32(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise StageError(f"k-means needs a non-empty 2-D sample, got shape {x.shape}")
    check_finite(x, "k-means sample")
    if k > x.shape[0]:
        raise StageError(f"k={k} is larger than the k-means sample ({x.shape[0]} documents); "
                         "lower cluster.k or raise cluster.sample_size / add documents")
    gpu = resolve_use_gpu(config.use_gpu) if use_gpu is None else use_gpu
    start = time.perf_counter()
    # min_points_per_centroid=1: small k-vs-sample ratios are the user's choice, not a warning.
    # max_points_per_centroid: faiss subsamples (seeded) beyond k * that many points, bounding fit time.
    extra = {}
    if config.init != "random":
        name = {"kmeans++": "ClusteringInitMethod_KMEANS_PLUS_PLUS", "afk-mc2": "ClusteringInitMethod_AFK_MC2"}
        if not hasattr(faiss, name[config.init]):
            raise StageError(f"cluster.init={config.init!r} needs a newer faiss (has {faiss.__version__})")
        extra["init_method"] = getattr(faiss, name[config.init])
    km = faiss.Kmeans(x.shape[1], int(k), niter=config.niter, nredo=config.nredo, seed=config.seed,
                      spherical=True, gpu=gpu, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=config.max_points_per_centroid, **extra)
    km.train(x)
    centroids = _as_f32(km.centroids)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    model = ClusterModel(centroids, use_gpu=gpu)
    _, dist = model.assign(x)
    wcss = float(_sq_dist_from_cos(x, dist).sum())
    return KMeansFit(centroids, wcss, time.perf_counter() - start)


def _sq_dist_from_cos(x: np.ndarray, cos_dist: np.ndarray) -> np.ndarray:
    """||x - c||^2 for unit c from the cosine distance and ||x|| (x is only ~unit in float16)."""
    norms2 = np.einsum("ij,ij->i", x, x)
    sim = 1.0 - cos_dist
    return np.maximum(norms2 + 1.0 - 2.0 * sim * np.sqrt(norms2), 0.0)


def default_k_grid(n_sample: int) -> list[int]:
    top = max(2, min(n_sample // 20, MAX_AUTO_K))
    grid = [2 ** i for i in range(1, int(math.log2(top)) + 1)]
    return [k for k in grid if k <= n_sample] or [min(2, n_sample)]


def elbow_k(ks: list[int], wcss: list[float]) -> int:
    """The elbow of WCSS over k (see the module docstring for the rule)."""
    if len(ks) != len(wcss) or not ks:
        raise StageError("elbow needs one WCSS value per k")
    if len(ks) < 3:
        return max(ks)
    x = np.log(np.asarray(ks, dtype=np.float64))
    y = np.asarray(wcss, dtype=np.float64)
    xs = (x - x[0]) / (x[-1] - x[0])
    span = y.max() - y.min()
    if span <= 0:
        return ks[0]  # flat curve: more clusters explain nothing
    ys = (y - y.min()) / span
    chord = ys[0] + (ys[-1] - ys[0]) * xs
    gap = chord - ys
    best = int(np.argmax(gap))  # argmax returns the first maximum: ties go to the smaller k
    return ks[best] if gap[best] > 1e-12 else ks[-1]


def choose_k(sample: np.ndarray, config: ClusterConfig, use_gpu: bool = False) -> tuple[int, list[dict]]:
    """``(k, [{k, wcss, seconds}, ...])``: the configured k, or the elbow over the grid."""
    n = sample.shape[0]
    if config.k != "auto":
        if config.k > n:
            raise StageError(f"cluster.k={config.k} is larger than the k-means sample ({n} documents)")
        return int(config.k), []
    if n > config.elbow_sample_size:  # the grid costs one fit per k: a smaller (seeded) subset bounds it
        pick = np.sort(np.random.default_rng(config.seed + 1).choice(n, config.elbow_sample_size, replace=False))
        sample = sample[pick]
        n = sample.shape[0]
    grid = config.k_grid or default_k_grid(n)
    too_big = [k for k in grid if k > n]
    if too_big:
        raise StageError(f"cluster.k_grid values {too_big} are larger than the elbow sample ({n} documents)")
    table = []
    for k in grid:
        fit = fit_kmeans(sample, k, config, use_gpu=use_gpu)
        table.append({"k": k, "wcss": fit.wcss, "seconds": round(fit.seconds, 3)})
    return elbow_k([r["k"] for r in table], [r["wcss"] for r in table]), table


# --------------------------------------------------------------------------------- assignment


class ClusterModel:
    """Unit centroids and a faiss inner-product index over them (nearest = most similar)."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool = False):
        import faiss

        self.centroids = _as_f32(centroids)
        check_finite(self.centroids, "centroids")
        self.k, self.dim = self.centroids.shape
        index = faiss.IndexFlatIP(self.dim)
        index.add(self.centroids)
        self.index = faiss.index_cpu_to_all_gpus(index) if use_gpu else index

    def assign(self, x: np.ndarray, batch_size: int = 65_536, where: str = "embeddings",
               row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(cluster int32, cosine distance float32)`` for each row of ``x``, in chunks."""
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise StageError(f"{where}: embeddings of shape {x.shape} do not match centroids of dim {self.dim}")
        labels = np.empty(n, np.int32)
        dists = np.empty(n, np.float32)
        for lo in range(0, n, batch_size):
            chunk = _as_f32(x[lo:lo + batch_size])
            check_finite(chunk, where, row_offset + lo)
            sim, idx = self.index.search(chunk, 1)
            labels[lo:lo + len(chunk)] = idx[:, 0]
            dists[lo:lo + len(chunk)] = np.maximum(1.0 - sim[:, 0], 0.0)
        return labels, dists


def centroid_neighbours(centroids: np.ndarray, radius: float, block: int = 2048,
                        max_neighbours: int | None = None) -> pa.Table:
    """Pairs of distinct clusters whose unit centroids are within cosine distance ``radius``;
    with ``max_neighbours = m``, only each cluster's ``m`` nearest of those (exact distance ties at the m-th place
    are broken by numpy's introselect, deterministically).

    Both directions are listed (``a -> b`` and ``b -> a``), sorted by cluster then distance,
    so reward propagation can read one cluster's neighbours as a contiguous run. The cap keeps
    the graph O(k m) where a dense embedding space puts every centroid pair within the radius
    (k^2 pairs: 1e8 at the paper's k = 10,000). A pair kept from one side only is listed from
    that side; the bandit symmetrises it.
    """
    c = _as_f32(centroids)
    k = c.shape[0]
    src, dst, dist = [], [], []
    for lo in range(0, k, block):  # blocks keep the k x k similarity matrix out of memory
        d = 1.0 - c[lo:lo + block] @ c.T
        d[np.arange(d.shape[0]), np.arange(lo, lo + d.shape[0])] = np.inf  # not its own neighbour
        d[~(d < radius)] = np.inf
        if max_neighbours is not None and max_neighbours < k - 1:
            m = int(max_neighbours)
            cols = np.argpartition(d, m - 1, axis=1)[:, :m]  # the m smallest per row, unordered
            vals = np.take_along_axis(d, cols, axis=1)
            rows = np.repeat(np.arange(d.shape[0]), m)
            cols, vals = cols.ravel(), vals.ravel()
            ok = np.isfinite(vals)
            rows, cols, vals = rows[ok], cols[ok], vals[ok]
        else:
            rows, cols = np.nonzero(np.isfinite(d))
            vals = d[rows, cols]
        src.append(rows + lo)
        dst.append(cols)
        dist.append(np.maximum(vals, 0.0))
    a = np.concatenate(src).astype(np.int32) if src else np.zeros(0, np.int32)
    b = np.concatenate(dst).astype(np.int32) if dst else np.zeros(0, np.int32)
    dd = np.concatenate(dist).astype(np.float32) if dist else np.zeros(0, np.float32)
    order = np.lexsort((b, dd, a))
    return pa.table({"cluster": a[order], "neighbour": b[order], "distance": dd[order]})


# --------------------------------------------------------------------------------- stage


@dataclass
class ClusterStageResult:
    k: int
    fit_hash: str
    assign_hash: str
    n_docs: int = 0
    skipped_shards: int = 0
    elbow: list[dict] = field(default_factory=list)
    fit_seconds: float = 0.0
    assign_seconds: float = 0.0
    fit_skipped: bool = False


def embedded_counts(workdir: WorkDir, keys: Iterable[str]) -> dict[str, int]:
    """Documents per embedded shard, from the embed stage's markers (no array is read)."""
    counts = {}
    for key in keys:
        marker = workdir.read_marker(EMBED_STAGE, key)
        if marker is None:
            raise StageError(f"shard {key} has no embeddings (run the embed stage first)")
        counts[key] = int(marker.get("stats", {}).get("n_docs", workdir.read_array(EMBED_STAGE, key).shape[0]))
    return counts


def sample_embeddings(workdir: WorkDir, keys: list[str], sample_size: int, seed: int) -> np.ndarray:
    """A uniform (seeded) sample of up to ``sample_size`` embeddings across shards, float32.

    Global positions are drawn first, then each shard is read once and only its drawn rows
    are kept, so memory is one shard plus the sample.
    """
    counts = embedded_counts(workdir, keys)
    total = sum(counts.values())
    if total == 0:
        raise StageError("no embedded documents to cluster")
    m = min(sample_size, total)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=m, replace=False))
    out = []
    offset = 0
    for key in keys:
        n = counts[key]
        lo, hi = np.searchsorted(picks, [offset, offset + n])
        if hi > lo:
            emb = workdir.read_array(EMBED_STAGE, key)
            if emb.shape[0] != n:
                raise StageError(f"shard {key}: {emb.shape[0]} embeddings but its marker says {n}")
            local = picks[lo:hi] - offset
            part = _as_f32(emb[local])
            bad = ~np.isfinite(part).all(axis=1)
            if bad.any():
                raise StageError(f"shard {key}: non-finite embedding (NaN or inf) at row(s) "
                                 f"{local[bad][:5].tolist()}; re-embed the shard")
            out.append(part)
        offset += n
    return np.concatenate(out)


def fit_hash_for(workdir: WorkDir, keys: list[str], config: ClusterConfig) -> str:
    """Centroids depend on the cluster settings and exactly which embeddings exist."""
    embed = {key: (workdir.read_marker(EMBED_STAGE, key) or {}).get("config_hash") for key in keys}
    return stable_hash({"cluster": config.fit_identity(), "embed": embed})


def fit_stage(workdir: WorkDir, keys: list[str], config: ClusterConfig) -> tuple[ClusterModel, ClusterStageResult]:
    """Fit (or reload, when done under the same hash) the centroids; write them and the elbow table."""
    keys = sorted(keys)
    use_gpu = resolve_use_gpu(config.use_gpu)
    fhash = fit_hash_for(workdir, keys, config)
    if workdir.is_done(FIT_STAGE, "centroids", fhash):
        stats = workdir.read_marker(FIT_STAGE, "centroids")["stats"]
        model = ClusterModel(workdir.read_array(FIT_STAGE, "centroids"), use_gpu=use_gpu)
        return model, ClusterStageResult(model.k, fhash, "", elbow=stats.get("elbow", []), fit_skipped=True)
    start = time.perf_counter()
    sample = sample_embeddings(workdir, keys, config.sample_size, config.seed)
    k, elbow = choose_k(sample, config, use_gpu=use_gpu)
    fit = fit_kmeans(sample, k, config, use_gpu=use_gpu)
    seconds = time.perf_counter() - start
    workdir.write_array(FIT_STAGE, "centroids", fit.centroids, fhash,
                        stats={"k": k, "dim": int(fit.centroids.shape[1]), "sample": int(sample.shape[0]),
                               "wcss": fit.wcss, "elbow": elbow, "use_gpu": use_gpu,
                               "seconds": round(seconds, 3), "distance": "cosine"})
    model = ClusterModel(fit.centroids, use_gpu=use_gpu)
    return model, ClusterStageResult(k, fhash, "", elbow=elbow, fit_seconds=seconds)


def assign_hash_for(fit_hash: str, model: ClusterModel) -> str:
    return stable_hash({"fit": fit_hash, "centroids": hashlib.sha256(model.centroids.tobytes()).hexdigest()})


INDEX_STAGE = "index"  # selector.data.index writes index/<key>.parquet (doc_id, row, n_tokens, ...)


def _index_tokens(workdir: WorkDir, key: str, rows: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Trainer-tokenizer counts from the index stage, aligned to ``rows``; None when not indexed."""
    marker = workdir.read_marker(INDEX_STAGE, key)
    if marker is None:
        return None
    index = workdir.read_table(INDEX_STAGE, key, columns=["row", "n_tokens"])
    irows = index.column("row").to_numpy()
    itok = index.column("n_tokens").to_numpy()
    order = np.argsort(irows)
    pos = np.searchsorted(irows[order], rows)
    ok = (pos < len(irows)) & (irows[order][np.minimum(pos, len(irows) - 1)] == rows)
    if not ok.all():
        raise StageError(f"shard {key}: rows {rows[~ok][:5].tolist()} are embedded but not in the index "
                         "(the shard changed between stages?)")
    return itok[order][pos].astype(np.int64), str(marker.get("config_hash"))


def assign_shard(workdir: WorkDir, key: str, model: ClusterModel, assign_hash: str,
                 batch_size: int = 65_536, n_tokens: np.ndarray | None = None) -> dict:
    """Assign one embedded shard's documents to clusters; write ``cluster/<key>.parquet``.

    Token counts (``n_tokens`` column, summed into the cluster table) are, in order of
    preference: ``n_tokens`` given (aligned with the shard's embed ids), the index stage's
    trainer-tokenizer counts when ``index/<key>`` exists, else the encoder's untruncated
    counts. Returns the shard's stats (``skipped`` when already done under the same hash).
    """
    ids = workdir.read_table(EMBED_STAGE, f"{key}.ids")
    rows = ids.column("row").to_numpy()
    if n_tokens is not None:
        tokens = np.asarray(n_tokens, dtype=np.int64)
        if tokens.shape[0] != ids.num_rows:
            raise StageError(f"shard {key}: {tokens.shape[0]} token counts for {ids.num_rows} documents")
        source = "given:" + hashlib.sha256(tokens.tobytes()).hexdigest()
    else:
        indexed = _index_tokens(workdir, key, rows)
        if indexed is not None:
            tokens, source = indexed[0], "index:" + indexed[1]
        else:
            tokens, source = ids.column("n_tokens_encoder").to_numpy().astype(np.int64), "encoder"
    # The token source is part of the output, so of its hash.
    full_hash = stable_hash({"assign": assign_hash, "tokens": source})
    if workdir.is_done(ASSIGN_STAGE, key, full_hash):
        stats = dict((workdir.read_marker(ASSIGN_STAGE, key) or {}).get("stats", {}))
        stats["skipped"] = True
        return stats
    start = time.perf_counter()
    emb = workdir.read_array(EMBED_STAGE, key)
    if ids.num_rows != emb.shape[0]:
        raise StageError(f"shard {key}: {emb.shape[0]} embeddings but {ids.num_rows} ids")
    labels, dists = model.assign(emb, batch_size=batch_size, where=f"shard {key}")
    table = pa.table({"doc_id": ids.column("doc_id"), "row": ids.column("row"),
                      "cluster": pa.array(labels, pa.int32()), "distance": pa.array(dists, pa.float32()),
                      "n_tokens": pa.array(tokens, pa.int64())})
    stats = {"n_docs": int(emb.shape[0]), "seconds": round(time.perf_counter() - start, 3),
             "tokens_source": source.split(":")[0]}
    workdir.write_table(ASSIGN_STAGE, key, table, full_hash, stats=stats)
    stats["skipped"] = False
    return stats


def cluster_table(workdir: WorkDir, keys: list[str], k: int) -> pa.Table:
    """Per cluster: size, tokens and mean distance, aggregated shard by shard."""
    size = np.zeros(k, np.int64)
    tokens = np.zeros(k, np.int64)
    dist_sum = np.zeros(k, np.float64)
    for key in keys:
        t = workdir.read_table(ASSIGN_STAGE, key, columns=["cluster", "distance", "n_tokens"])
        c = t.column("cluster").to_numpy()
        size += np.bincount(c, minlength=k)
        tokens += np.bincount(c, weights=t.column("n_tokens").to_numpy(), minlength=k).astype(np.int64)
        dist_sum += np.bincount(c, weights=t.column("distance").to_numpy().astype(np.float64), minlength=k)
    mean = np.divide(dist_sum, size, out=np.full(k, np.nan), where=size > 0)
    return pa.table({"cluster": pa.array(np.arange(k), pa.int32()), "size": size, "tokens": tokens,
                     "mean_distance": mean.astype(np.float32)})


def write_summaries(workdir: WorkDir, keys: list[str], model: ClusterModel, assign_hash: str,
                    config: ClusterConfig) -> tuple[pa.Table, pa.Table]:
    """Write the cluster table and the neighbour table; returns both."""
    table = cluster_table(workdir, keys, model.k)
    neighbours = centroid_neighbours(model.centroids, config.neighbour_radius, max_neighbours=config.max_neighbours)
    summary_hash = stable_hash({"assign": assign_hash, "radius": config.neighbour_radius,
                                "max_neighbours": config.max_neighbours, "keys": sorted(keys)})
    workdir.write_table(SUMMARY_STAGE, "clusters", table, summary_hash,
                        stats={"k": model.k, "n_docs": int(table.column("size").to_numpy().sum()),
                               "empty_clusters": int((table.column("size").to_numpy() == 0).sum())})
    workdir.write_table(SUMMARY_STAGE, "neighbours", neighbours, summary_hash,
                        stats={"radius": config.neighbour_radius, "max_neighbours": config.max_neighbours,
                               "distance": "cosine", "pairs": neighbours.num_rows})
    return table, neighbours


def cluster_stage(workdir: WorkDir, keys: list[str], config: ClusterConfig,
                  n_tokens: dict[str, np.ndarray] | None = None) -> ClusterStageResult:
    """The whole stage in-process: fit on a sample, assign every shard, write the tables.

    (``workers.clusterer`` runs the assignment of shards in parallel on Ray.)
    """
    keys = sorted(keys)
    model, result = fit_stage(workdir, keys, config)
    result.assign_hash = assign_hash_for(result.fit_hash, model)
    start = time.perf_counter()
    for key in keys:
        stats = assign_shard(workdir, key, model, result.assign_hash, config.assign_batch_size,
                             None if n_tokens is None else n_tokens.get(key))
        result.n_docs += int(stats.get("n_docs", 0))
        result.skipped_shards += int(stats["skipped"])
    write_summaries(workdir, keys, model, result.assign_hash, config)
    result.assign_seconds = time.perf_counter() - start
    return result


def load_centroids(workdir: WorkDir) -> np.ndarray:
    return workdir.read_array(FIT_STAGE, "centroids")
