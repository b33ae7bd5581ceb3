"""Influence scores carried from one run of a refresh lineage to the next.

Why. A refresh that adds 10% new shards runs Quad's bandit over the whole corpus again (its arm
statistics carried, decayed), and on the scale bench the bandit's rounds are two thirds of a full
run, nearly all of it influence scoring of sampled documents. A document's influence score
``s(x) = g_ref^T (G + lambda I)^-1 g(x)`` depends on its text, the proxy model, the reference set and
the K-FAC factors; a lineage fixes all but the text (a config change starts a new lineage, and the
factors and the query are fitted once per lineage), so a score the previous run computed for an
unchanged document is the score this run would compute. It is looked up instead.

The log. A run that keeps one (``score_log`` of the bandit actor: the refresh's runs) writes every
sample score its rounds used, computed or looked up, as segments::

    quad_scores/<run_id>-<segment:06d>.parquet   cluster (int32), key (float64), shard (string), score (float64)

sorted by ``(cluster, key)``, one per segment of the bandit's round log, written by the bandit actor
(the scores never pass through the driver). Marker stats: ``rows``, ``run_id``. Rounds applied
after the last segment and before a kill are not logged: the cache misses them and they are scored
again, nothing else changes.

The cache. When a refresh keeps the previous k-means fit (cluster ids name the same clusters), the
previous run's segments become this run's cache::

    quad_score_cache/<run_id>-r<lo>-<hi>.parquet   cluster (int32), key (float64), score (float64)
    quad_score_cache/<run_id>.json                 the ranges [lo, hi, rows] and the source run

one file per range of cluster ids, each built by one call (``map_calls``: Ray tasks in the refresh)
that reads only the row groups of every segment whose cluster statistics overlap its range, drops
documents of shards outside ``valid_shards`` (changed or removed shards: their texts may differ),
and keeps one score per ``(cluster, key)`` (the latest segment's). :class:`ScoreCache` answers a
lookup for one cluster by reading that cluster's row groups of its range file; it holds the range
list and an LRU of ``cache_clusters`` clusters: O(clusters) metadata, whatever the corpus size.

The document key is the queue key ``BLAKE2b-64(seed:doc_id)`` (:func:`selector.data.index.hash_keys`;
the lineage fixes the seed) within its cluster.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selector.clusters.queues import read_cluster_range
from selector.data.workdir import WorkDir, atomic_write_bytes, table_to_parquet_bytes

LOG_STAGE = "quad_scores"
CACHE_STAGE = "quad_score_cache"
ROW_GROUP_SIZE = 4096
MAX_RANGE_ROWS = 2_000_000
LOG_SCHEMA = pa.schema([("cluster", pa.int32()), ("key", pa.float64()), ("shard", pa.string()),
                        ("score", pa.float64())])

MapCalls = Callable[[Callable, Iterable[tuple]], Iterator]


def segment_key(run_id: str, segment: int) -> str:
    return f"{run_id}-{int(segment):06d}"


def write_log_segment(workdir: WorkDir, run_id: str, segment: int, clusters: Sequence[int], keys: Sequence[float],
                      shards: Sequence[str], scores: Sequence[float]) -> str | None:
    """One segment of ``run_id``'s score log, sorted by ``(cluster, key)``; nothing for no rows."""
    if len(scores) == 0:
        return None
    c = np.asarray(clusters, np.int64)
    k = np.asarray(keys, np.float64)
    s = np.asarray(scores, np.float64)
    if not (len(c) == len(k) == len(shards) == len(s)):
        raise ValueError("score log: clusters, keys, shards and scores differ in length")
    order = np.lexsort((k, c))
    table = pa.table({"cluster": pa.array(c[order], pa.int32()), "key": pa.array(k[order]),
                      "shard": pa.array([shards[i] for i in order.tolist()], pa.string()),
                      "score": pa.array(s[order])}, schema=LOG_SCHEMA)
    key = segment_key(run_id, segment)
    return workdir.write_table(LOG_STAGE, key, table, run_id, {"rows": table.num_rows, "run_id": run_id},
                               row_group_size=ROW_GROUP_SIZE)


def _names(workdir: WorkDir, stage: str) -> list[str]:
    directory = workdir.stage_dir(stage)
    if not workdir.fs.exists(directory):
        return []
    return sorted(path.rsplit("/", 1)[-1] for path in workdir.fs.ls(directory, detail=False))


def log_segments(workdir: WorkDir, run_id: str) -> list[str]:
    """The keys of ``run_id``'s logged segments (their markers written), in segment order."""
    prefix, suffix = f"{run_id}-", ".done.json"
    keys = [n[: -len(suffix)] for n in _names(workdir, LOG_STAGE) if n.startswith(prefix) and n.endswith(suffix)]
    return [k for k in keys if k[len(prefix):].isdigit() and workdir.is_done(LOG_STAGE, k, run_id)]


def prune(workdir: WorkDir, keep_runs: Iterable[str]) -> int:
    """Delete the score logs and caches of every run not in ``keep_runs`` (a lineage needs only the
    previous run's log and this run's); returns the number of files deleted."""
    keep = sorted(set(keep_runs))
    deleted = 0
    for stage in (LOG_STAGE, CACHE_STAGE):
        for name in _names(workdir, stage):
            if not any(name == f"{r}.json" or name.startswith(f"{r}-") for r in keep):
                workdir.fs.rm(f"{workdir.stage_dir(stage)}/{name}")
                deleted += 1
    return deleted


def build_range(workdir: WorkDir, run_id: str, segments: list[str], lo: int, hi: int,
                valid_shards: list[str] | None) -> int:
    """One range file of the cache built from ``segments`` (see the module docstring); its row count."""
    pieces = []
    for order, seg in enumerate(segments):
        t = read_cluster_range(workdir.fs, f"{workdir.stage_dir(LOG_STAGE)}/{seg}.parquet", lo, hi,
                               ["cluster", "key", "shard", "score"])
        if valid_shards is not None:
            t = t.filter(pc.is_in(t.column("shard"), value_set=pa.array(valid_shards, pa.string())))
        pieces.append(t.select(["cluster", "key", "score"]).append_column(
            "segment", pa.array(np.full(t.num_rows, order, np.int32))))
    table = pa.concat_tables(pieces) if pieces else pa.table(
        {"cluster": pa.array([], pa.int32()), "key": pa.array([], pa.float64()), "score": pa.array([], pa.float64()),
         "segment": pa.array([], pa.int32())})
    c = table.column("cluster").to_numpy().astype(np.int64)
    k = table.column("key").to_numpy()
    seg = table.column("segment").to_numpy()
    order = np.lexsort((-seg, k, c))  # per (cluster, key): the latest segment first
    c, k = c[order], k[order]
    first = np.ones(len(c), bool)
    first[1:] = (c[1:] != c[:-1]) | (k[1:] != k[:-1])
    keep = order[first]
    out = pa.table({"cluster": pa.array(c[first], pa.int32()), "key": pa.array(k[first]),
                    "score": table.column("score").take(pa.array(keep))})
    atomic_write_bytes(workdir.fs, f"{workdir.stage_dir(CACHE_STAGE)}/{run_id}-r{lo:06d}-{hi:06d}.parquet",
                       table_to_parquet_bytes(out, ROW_GROUP_SIZE))
    return out.num_rows


def _in_process(fn: Callable, calls: Iterable[tuple]) -> Iterator:
    for args in calls:
        yield fn(*args)


def build_score_cache(workdir: WorkDir, source_run_id: str, n_clusters: int, valid_shards: Iterable[str] | None,
                      max_range_rows: int = MAX_RANGE_ROWS, map_calls: MapCalls | None = None) -> dict:
    """The cache of ``source_run_id``'s score log for clusters ``0 .. n_clusters - 1``; returns its
    metadata (``{"source", "ranges": [[lo, hi, rows], ...], "rows", "segments"}``), also written as
    ``quad_score_cache/<source_run_id>.json``. The driver holds the segment list and the ranges only."""
    run_calls = map_calls or _in_process
    segments = log_segments(workdir, source_run_id)
    total = sum(int(workdir.read_marker(LOG_STAGE, s)["stats"]["rows"]) for s in segments)
    n_ranges = max(1, -(-total // max(1, int(max_range_rows))))
    width = max(1, -(-int(n_clusters) // n_ranges))
    bounds = [(lo, min(lo + width, int(n_clusters)) - 1) for lo in range(0, max(int(n_clusters), 1), width)]
    valid = None if valid_shards is None else sorted(set(valid_shards))
    rows = list(run_calls(build_range, ((workdir, source_run_id, segments, lo, hi, valid) for lo, hi in bounds)))
    meta = {"source": source_run_id, "segments": len(segments), "rows": int(sum(rows)),
            "ranges": [[lo, hi, int(n)] for (lo, hi), n in zip(bounds, rows)]}
    atomic_write_bytes(workdir.fs, f"{workdir.stage_dir(CACHE_STAGE)}/{source_run_id}.json",
                       json.dumps(meta, sort_keys=True).encode())
    return meta


class ScoreCache:
    """Lookups in the cache built from ``source_run_id``'s log (see the module docstring)."""

    def __init__(self, workdir: WorkDir, source_run_id: str, cache_clusters: int = 64):
        path = f"{workdir.stage_dir(CACHE_STAGE)}/{source_run_id}.json"
        if not workdir.fs.exists(path):
            raise FileNotFoundError(f"no score cache for run {source_run_id} ({path}): build_score_cache first")
        with workdir.fs.open(path, "rb") as f:
            self.meta = json.loads(f.read())
        self.workdir = workdir
        self.source = source_run_id
        self._lo = np.array([r[0] for r in self.meta["ranges"]], np.int64)
        self._hi = np.array([r[1] for r in self.meta["ranges"]], np.int64)
        self.cache_clusters = int(cache_clusters)
        self._lru: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.hits = self.misses = 0

    def _cluster(self, cluster: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._lru.get(cluster)
        if got is not None:
            self._lru.move_to_end(cluster)
            return got
        i = int(np.searchsorted(self._lo, cluster, side="right")) - 1
        if i < 0 or cluster > self._hi[i] or self.meta["ranges"][i][2] == 0:
            got = (np.zeros(0), np.zeros(0))
        else:
            lo, hi = int(self._lo[i]), int(self._hi[i])
            path = f"{self.workdir.stage_dir(CACHE_STAGE)}/{self.source}-r{lo:06d}-{hi:06d}.parquet"
            t = read_cluster_range(self.workdir.fs, path, cluster, cluster, ["cluster", "key", "score"])
            got = (t.column("key").to_numpy(), t.column("score").to_numpy())
        self._lru[cluster] = got
        while len(self._lru) > self.cache_clusters:
            self._lru.popitem(last=False)
        return got

    def lookup(self, cluster: int, keys: Sequence[float]) -> list[float | None]:
        """The cached score of each of ``keys`` in ``cluster``, None where there is none."""
        known, scores = self._cluster(int(cluster))
        q = np.asarray(keys, np.float64)
        pos = np.minimum(np.searchsorted(known, q), max(len(known) - 1, 0))
        found = (len(known) > 0) & (known[pos] == q) if len(known) else np.zeros(len(q), bool)
        out = [float(scores[p]) if f else None for p, f in zip(pos.tolist(), found.tolist())]
        n = int(np.count_nonzero(found))
        self.hits += n
        self.misses += len(q) - n
        return out
