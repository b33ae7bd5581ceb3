"""Quad's cluster queues: every cluster's documents in seeded hash order, read a block at a time.

The order. A cluster's queue holds its documents sorted by the seeded hash key
``key = BLAKE2b-64(f"{seed}:{doc_id}") / 2**64`` (:func:`selector.data.index.hash_keys`, the key of the
``random`` method; a float64 in [0, 1)). Equal keys keep the input order: shards in sorted shard-key
order, then their rows in the order of the cluster stage's table. Queues are concatenated in cluster-id
order (cluster-major), so "queue position p of cluster c" means the same document in every store below.
Clusters without documents have no queue (they are not arms).

An entry (:class:`QueueEntries`, one column per field): ``key`` (float64), ``doc_id``, ``shard`` (the
shard's name: its relative path when the queue step was told it, else its work-dir key), ``row``
(the document's row in that shard) and ``n_tokens``.

Two stores, one interface (:class:`ClusterQueueStore`):

* :class:`ClusterQueues` -- in memory, built from the columns (tests, the baselines, small runs);
* :class:`DiskClusterQueues` -- reads the per-cluster Parquet files that :func:`write_cluster_queues`
  wrote under the work dir (any fsspec filesystem the work dir uses, S3 included).

What is O(clusters). A store's metadata: cluster ids, queue sizes, token totals and a content hash per
cluster, the shard names (O(shards)) and the store fingerprint. :class:`DiskClusterQueues` holds
only that plus a small LRU of recently read row groups (``cache_row_groups`` of ``row_group_size``
rows each, whatever the corpus size). What is read per round: for each pulled arm, the row group(s)
of its cluster file that cover the block ``[cursor, cursor + block_size)``; for the result, the
accepted ranges. The warm-up (once per run) reads the first ``min(size, warmup_size)`` keys of every
cluster to find the corpus-wide smallest keys: O(clusters x warmup_size) keys, once.

The fingerprint (what a bandit checkpoint is checked against) is
``sha256(json([[cluster, size, tokens, cluster_hash], ...]))[:32]`` over the clusters in id order,
with ``cluster_hash = sha256("\\n".join(doc_ids in queue order) + n_tokens as little-endian int64)[:32]``.
Both stores compute it the same way, so a checkpoint taken over one resumes over the other.

Writing the queues (:func:`write_cluster_queues`): two phases, independent per shard and per
partition, run by a ``map_calls`` function (no Ray here: by default a loop in the calling process,
memory bounded by one shard, then by one partition of clusters; the select job passes
:func:`workers.clusterer.queue_calls_on_ray`, which runs each unit as a Ray task):

1. *sort* -- per shard (in sorted key order): read ``cluster/<key>.parquet``, compute the hash keys,
   stable-sort by ``(cluster, key)``, write ``cluster_queues_sorted/<key>.parquet`` (row groups of
   ``row_group_size`` rows, so a reader can skip the row groups of other clusters) with its
   per-cluster counts in the done marker;
2. *merge* -- consecutive cluster ids are grouped into partitions of at most ``max_partition_docs``
   documents (a larger cluster is a partition alone); per partition: read that cluster range of every
   sorted shard file (row groups pruned by their min/max cluster statistics), concatenate in shard
   order, stable-sort by ``(cluster, key)`` and write ``cluster_queues/c<cluster>.parquet`` per cluster
   (columns ``key, doc_id, shard`` (int32 index into the shard names), ``row, n_tokens``) with the
   partition's per-cluster metadata in its done marker;
3. *metadata* -- ``cluster_queues/queues.json`` (seed, shard names, row-group size, per-cluster
   ``[cluster, size, tokens, hash]``, fingerprint), then its done marker.

Each phase's unit is skipped when its marker carries the same hash (a function of the seed, the
cluster stage's per-shard hashes, the layout settings), so a killed queue step resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selector.data.index import hash_keys
from selector.data.workdir import WorkDir, atomic_write_bytes, stable_hash, table_to_parquet_bytes

SORT_STAGE = "cluster_queues_sorted"
QUEUE_STAGE = "cluster_queues"
META_KEY = "queues"
QUEUE_FORMAT = 1
ROW_GROUP_SIZE = 4096
MAX_PARTITION_DOCS = 2_000_000
TEXT_ROW_GROUP_SIZE = 512       # with texts: a sampled text costs decoding 512 texts, not 4096
TEXT_PARTITION_DOCS = 200_000   # with texts: a merge task holds this many texts (~0.5 GB at 2.5 KB each)
TEXT_GROUPS_CACHED = 8          # text row groups a reader of the queues keeps

MapCalls = Callable[[Callable, Iterable[tuple]], Iterator]  # (fn, argument tuples) -> results in call order


@dataclass(frozen=True)
class QueueEntries:
    """Queue entries ``[start, stop)`` of one cluster, as columns."""

    key: np.ndarray       # float64 seeded hash keys (ascending)
    doc_id: list[str]
    shard: list           # shard names (None where the in-memory store was given none)
    row: np.ndarray       # int64 rows in the shards (-1 where unknown)
    n_tokens: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.doc_id)


def cluster_hash(doc_ids: Sequence[str], n_tokens: np.ndarray) -> str:
    """The content hash of one cluster's queue (ids in queue order and their token counts)."""
    h = hashlib.sha256("\n".join(doc_ids).encode())
    h.update(np.asarray(n_tokens, dtype="<i8").tobytes())
    return h.hexdigest()[:32]


def store_fingerprint(cluster_ids: Sequence[int], sizes: Sequence[int], tokens: Sequence[int],
                      hashes: Sequence[str]) -> str:
    rows = [[int(c), int(n), int(t), str(h)] for c, n, t, h in zip(cluster_ids, sizes, tokens, hashes)]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:32]


class ClusterQueueStore:
    """What Quad needs of the queues. Subclasses set the O(clusters) metadata (``seed``,
    ``cluster_ids``, ``sizes``, ``tokens``, ``hashes``) and implement :meth:`read` / :meth:`read_keys`."""

    seed: int
    cluster_ids: np.ndarray   # int64, ascending, non-empty clusters only
    sizes: np.ndarray         # int64 queue length per cluster (same order)
    tokens: np.ndarray        # int64 token total per cluster
    hashes: list[str]         # cluster_hash per cluster

    def _init_metadata(self) -> None:
        self._pos = {int(c): i for i, c in enumerate(self.cluster_ids.tolist())}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    def index(self, cluster: int) -> int:
        """The cluster's position in ``cluster_ids`` (KeyError for a cluster without a queue)."""
        return self._pos[int(cluster)]

    def size(self, cluster: int) -> int:
        return int(self.sizes[self._pos[int(cluster)]])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = store_fingerprint(self.cluster_ids, self.sizes, self.tokens, self.hashes)
        return self._fingerprint

    def read(self, cluster: int, start: int, stop: int) -> QueueEntries:
        """Entries at queue positions ``[start, stop)`` of ``cluster`` (clamped to the queue)."""
        raise NotImplementedError

    def read_keys(self, cluster: int, start: int, stop: int) -> np.ndarray:
        return self.read(cluster, start, stop).key

    def smallest_keys_counts(self, n: int) -> dict[int, int]:
        """How many of the ``n`` smallest hash keys corpus-wide each cluster holds (clusters with
        none left out). They are a prefix of each cluster's queue; equal keys go to the earlier
        queue position in the cluster-major order, as a stable argsort over all queues would."""
        n = min(int(n), len(self))
        if n <= 0:
            return {}
        heads = [self.read_keys(c, 0, min(self.size(c), n)) for c in self.cluster_ids.tolist()]
        keys = np.concatenate(heads)
        owner = np.repeat(self.cluster_ids, [len(h) for h in heads])
        picked = owner[np.sort(np.argsort(keys, kind="stable")[:n])]
        ids, counts = np.unique(picked, return_counts=True)
        return {int(c): int(k) for c, k in zip(ids, counts)}


class ClusterQueues(ClusterQueueStore):
    """All queues in memory, built from per-document columns (input order does not matter, except
    for equal hash keys). ``shards`` / ``rows`` are optional (None / -1 when not given)."""

    def __init__(self, doc_ids: Sequence[str], clusters: Sequence[int], n_tokens: Sequence[int], seed: int,
                 shards: Sequence | None = None, rows: Sequence[int] | None = None):
        ids = [str(d) for d in doc_ids]
        clusters = np.asarray(clusters, dtype=np.int64)
        tokens = np.asarray(n_tokens, dtype=np.int64)
        if not (len(ids) == clusters.shape[0] == tokens.shape[0]):
            raise ValueError(f"doc_ids, clusters and n_tokens differ in length: "
                             f"{len(ids)}, {clusters.shape[0]}, {tokens.shape[0]}")
        if len(set(ids)) != len(ids):
            raise ValueError("doc_ids are not unique")
        if (tokens < 0).any():
            raise ValueError("n_tokens must be >= 0")
        self.seed = int(seed)
        keys = hash_keys(ids, self.seed) if ids else np.zeros(0)
        order = np.lexsort((keys, clusters))  # cluster-major, hash order inside a cluster
        self.order = order  # queue position -> position in the caller's input
        self.doc_ids = np.array(ids, dtype=object)[order] if ids else np.array([], dtype=object)
        self.clusters = clusters[order]
        self.n_tokens = tokens[order]
        self.keys = keys[order]
        self.shards = np.array(list(shards) if shards is not None else [None] * len(ids), dtype=object)[order] \
            if ids else np.array([], dtype=object)
        self.rows = (np.asarray(rows, np.int64) if rows is not None else np.full(len(ids), -1, np.int64))[order]
        self.cluster_ids, starts = np.unique(self.clusters, return_index=True)
        self.starts = starts.astype(np.int64)
        self.ends = np.append(self.starts[1:], len(ids)).astype(np.int64)
        self.sizes = self.ends - self.starts
        self.tokens = np.add.reduceat(self.n_tokens, self.starts) if len(ids) else np.zeros(0, np.int64)
        self.hashes = [cluster_hash(self.doc_ids[a:b].tolist(), self.n_tokens[a:b])
                       for a, b in zip(self.starts.tolist(), self.ends.tolist())]
        self._init_metadata()

    def slice(self, cluster: int, start: int, stop: int) -> slice:
        """Global positions (into the cluster-major arrays) of a cluster's queue positions ``[start, stop)``."""
        base = int(self.starts[self._pos[int(cluster)]])
        return slice(base + start, base + stop)

    def read(self, cluster: int, start: int, stop: int) -> QueueEntries:
        size = self.size(cluster)
        start = min(max(0, int(start)), size)
        sl = self.slice(cluster, start, max(start, min(int(stop), size)))
        return QueueEntries(self.keys[sl], self.doc_ids[sl].tolist(), self.shards[sl].tolist(), self.rows[sl],
                            self.n_tokens[sl])

    def read_keys(self, cluster: int, start: int, stop: int) -> np.ndarray:
        size = self.size(cluster)
        start = min(max(0, int(start)), size)
        return self.keys[self.slice(cluster, start, max(start, min(int(stop), size)))]


# --------------------------------------------------------------------------- on disk


def cluster_file(cluster: int) -> str:
    return f"c{int(cluster):06d}.parquet"


class DiskClusterQueues(ClusterQueueStore):
    """The queues :func:`write_cluster_queues` wrote under ``workdir``; holds O(clusters) metadata and
    an LRU of at most ``cache_row_groups`` row groups."""

    def __init__(self, workdir: WorkDir, cache_row_groups: int = 16):
        marker = workdir.read_marker(QUEUE_STAGE, META_KEY)
        if marker is None:
            raise FileNotFoundError(f"no cluster queues in {workdir.stage_dir(QUEUE_STAGE)} "
                                    "(run selector.clusters.queues.write_cluster_queues first)")
        meta = json.loads(workdir.read_bytes(QUEUE_STAGE, META_KEY, "json"))
        if meta.get("format") != QUEUE_FORMAT:
            raise ValueError(f"cluster queues of format {meta.get('format')!r}, expected {QUEUE_FORMAT}")
        self.workdir = workdir
        self.config_hash = str(marker.get("config_hash"))
        self.seed = int(meta["seed"])
        self.shard_names: list[str] = list(meta["shards"])
        self.row_group_size = int(meta["row_group_size"])
        clusters = meta["clusters"]
        self.cluster_ids = np.array([c[0] for c in clusters], np.int64)
        self.sizes = np.array([c[1] for c in clusters], np.int64)
        self.tokens = np.array([c[2] for c in clusters], np.int64)
        self.hashes = [str(c[3]) for c in clusters]
        self._init_metadata()
        if meta.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError("cluster queue metadata is inconsistent with its fingerprint")
        self.cache_row_groups = int(cache_row_groups)
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self.has_texts = bool(meta.get("texts", False))
        self._columns = ["key", "doc_id", "shard", "row", "n_tokens"]
        self._texts: OrderedDict[tuple[int, int], list[str]] = OrderedDict()  # text row groups, a few

    def cached_rows(self) -> int:
        return sum(t.num_rows for t in self._cache.values())

    def _row_group(self, cluster: int, group: int) -> pa.Table:
        key = (int(cluster), int(group))
        table = self._cache.get(key)
        if table is not None:
            self._cache.move_to_end(key)
            return table
        path = f"{self.workdir.stage_dir(QUEUE_STAGE)}/{cluster_file(cluster)}"
        with self.workdir.fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=self._columns)
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def _read_table(self, cluster: int, start: int, stop: int) -> pa.Table:
        size = self.size(cluster)
        start, stop = max(0, int(start)), min(int(stop), size)
        if stop <= start:
            return self._row_group(cluster, 0).slice(0, 0)
        r = self.row_group_size
        first, last = start // r, (stop - 1) // r
        parts = [self._row_group(cluster, g) for g in range(first, last + 1)]
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return table.slice(start - first * r, stop - start)

    def read(self, cluster: int, start: int, stop: int) -> QueueEntries:
        t = self._read_table(cluster, start, stop)
        names = self.shard_names
        return QueueEntries(t.column("key").to_numpy(), t.column("doc_id").to_pylist(),
                            [names[i] for i in t.column("shard").to_numpy().tolist()],
                            t.column("row").to_numpy().astype(np.int64),
                            t.column("n_tokens").to_numpy().astype(np.int64))

    def read_keys(self, cluster: int, start: int, stop: int) -> np.ndarray:
        return self._read_table(cluster, start, stop).column("key").to_numpy()

    def read_texts(self, cluster: int, positions: Sequence[int]) -> list[str]:
        """The texts at queue ``positions`` of ``cluster`` (queues written with texts only); reads the
        text column of the row groups holding them, keeping the last ``TEXT_GROUPS_CACHED``."""
        if not self.has_texts:
            raise ValueError("these cluster queues were written without texts")
        size, r = self.size(cluster), self.row_group_size
        out = []
        for p in positions:
            p = int(p)
            if not 0 <= p < size:
                raise IndexError(f"cluster {cluster}: queue position {p} outside [0, {size})")
            key = (int(cluster), p // r)
            texts = self._texts.get(key)
            if texts is None:
                path = f"{self.workdir.stage_dir(QUEUE_STAGE)}/{cluster_file(cluster)}"
                with self.workdir.fs.open(path, "rb") as f:
                    texts = pq.ParquetFile(f).read_row_group(p // r, columns=["text"]).column("text").to_pylist()
                self._texts[key] = texts
                while len(self._texts) > TEXT_GROUPS_CACHED:
                    self._texts.popitem(last=False)
            else:
                self._texts.move_to_end(key)
            out.append(texts[p % r])
        return out


# --------------------------------------------------------------------------- the queue step


def _assign_hash(workdir: WorkDir, key: str) -> str:
    from selector.clusters.kmeans import ASSIGN_STAGE

    marker = workdir.read_marker(ASSIGN_STAGE, key)
    if marker is None:
        raise FileNotFoundError(f"shard {key} has no cluster assignment (cluster/{key}.done.json)")
    return str(marker.get("config_hash"))


def sort_shard(workdir: WorkDir, key: str, seed: int, shard_hash: str, row_group_size: int = ROW_GROUP_SIZE,
               text_source: tuple | None = None) -> dict:
    """Phase 1 for one shard: its assignments in ``(cluster, key)`` order; returns the marker stats
    (``counts``: ``[[cluster, documents], ...]``). Skipped when done under ``shard_hash``.
    ``text_source = (corpus config, shard info)``: the documents' texts are read from the shard and
    carried along (a ``text`` column), so the queue files hold them."""
    from selector.clusters.kmeans import ASSIGN_STAGE

    if workdir.is_done(SORT_STAGE, key, shard_hash):
        return dict(workdir.read_marker(SORT_STAGE, key)["stats"], skipped=True)
    t = workdir.read_table(ASSIGN_STAGE, key, columns=["doc_id", "row", "cluster", "n_tokens"])
    ids = t.column("doc_id").to_pylist()
    keys = hash_keys(ids, seed) if ids else np.zeros(0)
    clusters = t.column("cluster").to_numpy().astype(np.int64)
    order = np.lexsort((keys, clusters))
    rows = t.column("row").to_numpy().astype(np.int64)
    columns = {"cluster": pa.array(clusters[order], pa.int32()), "key": pa.array(keys[order], pa.float64()),
               "doc_id": t.column("doc_id").take(pa.array(order)), "row": pa.array(rows[order]),
               "n_tokens": pa.array(t.column("n_tokens").to_numpy().astype(np.int64)[order])}
    if text_source is not None:
        columns["text"] = pa.array(_shard_texts(text_source, rows[order].tolist()), pa.string())
    table = pa.table(columns)
    path = f"{workdir.stage_dir(SORT_STAGE)}/{key}.parquet"
    atomic_write_bytes(workdir.fs, path, table_to_parquet_bytes(table, row_group_size))
    ids_, counts = np.unique(clusters, return_counts=True)
    stats = {"documents": len(ids), "counts": [[int(c), int(n)] for c, n in zip(ids_, counts)]}
    workdir.mark_done(SORT_STAGE, key, shard_hash, stats)
    return dict(stats, skipped=False)


def _shard_texts(text_source: tuple, rows: list[int]) -> list[str]:
    """The texts at ``rows`` of the shard (one streaming read of the shard)."""
    from selector.data.corpus import Corpus

    config, shard = text_source
    batch = Corpus(config).read_rows(shard, rows)
    if list(batch.rows) != list(rows):
        raise ValueError(f"shard {shard.relpath}: rows read back out of order")
    return list(batch.texts)


def read_cluster_range(fs, path: str, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
    """Rows with ``lo <= cluster <= hi`` of a Parquet file sorted by ``cluster``, reading only the row
    groups whose cluster statistics overlap the range (also used by selector.quad.score_cache)."""
    import pyarrow.compute as pc

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        col = pf.schema_arrow.get_field_index("cluster")
        groups = []
        for g in range(pf.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or (st.max >= lo and st.min <= hi):
                groups.append(g)
        empty = pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups, columns=columns) if groups else \
            (empty if columns is None else empty.select(columns))
    c = table.column("cluster")
    return table.filter(pc.and_(pc.greater_equal(c, lo), pc.less_equal(c, hi)))


def _read_cluster_range(workdir: WorkDir, key: str, lo: int, hi: int) -> pa.Table:
    """Rows of a sorted shard file with ``lo <= cluster <= hi``."""
    return read_cluster_range(workdir.fs, f"{workdir.stage_dir(SORT_STAGE)}/{key}.parquet", lo, hi)


def merge_partition(workdir: WorkDir, keys: list[str], clusters: list[int], partition_hash: str,
                    row_group_size: int = ROW_GROUP_SIZE) -> list[list]:
    """Phase 2 for one partition (consecutive cluster ids): write each cluster's queue file;
    returns ``[[cluster, size, tokens, hash], ...]``. Skipped when done under ``partition_hash``."""
    name = f"part-{clusters[0]:06d}-{clusters[-1]:06d}"
    if workdir.is_done(QUEUE_STAGE, name, partition_hash):
        return workdir.read_marker(QUEUE_STAGE, name)["stats"]["clusters"]
    lo, hi = clusters[0], clusters[-1]
    pieces = []
    for s, key in enumerate(keys):  # shard order = the tie order of equal keys
        part = _read_cluster_range(workdir, key, lo, hi)
        pieces.append(part.append_column("shard", pa.array(np.full(part.num_rows, s, np.int32))))
    table = pa.concat_tables(pieces)
    cl = table.column("cluster").to_numpy().astype(np.int64)
    order = np.lexsort((table.column("key").to_numpy(), cl))  # stable: ties keep shard, then in-shard order
    table = table.take(pa.array(order))
    cl = cl[order]
    bounds = np.searchsorted(cl, np.asarray(clusters), side="left").tolist() + [len(cl)]
    meta = []
    columns = ["key", "doc_id", "shard", "row", "n_tokens"] + (["text"] if "text" in table.column_names else [])
    for i, c in enumerate(clusters):
        q = table.slice(bounds[i], bounds[i + 1] - bounds[i]).select(columns)
        if q.num_rows == 0:
            continue
        tokens = q.column("n_tokens").to_numpy()
        atomic_write_bytes(workdir.fs, f"{workdir.stage_dir(QUEUE_STAGE)}/{cluster_file(c)}",
                           table_to_parquet_bytes(q, row_group_size))
        meta.append([int(c), q.num_rows, int(tokens.sum()), cluster_hash(q.column("doc_id").to_pylist(), tokens)])
    workdir.mark_done(QUEUE_STAGE, name, partition_hash, {"clusters": meta})
    return meta


def partition_clusters(counts: dict[int, int], max_docs: int) -> list[list[int]]:
    """Consecutive non-empty cluster ids grouped while their documents stay within ``max_docs``."""
    parts: list[list[int]] = []
    size = 0
    for c in sorted(k for k, n in counts.items() if n > 0):
        if parts and size + counts[c] <= max_docs:
            parts[-1].append(c)
            size += counts[c]
        else:
            parts.append([c])
            size = counts[c]
    return parts


def _in_process(fn: Callable, calls: Iterable[tuple]) -> Iterator:
    for args in calls:
        yield fn(*args)


def write_cluster_queues(workdir: WorkDir, keys: Iterable[str], seed: int,
                         shard_names: dict[str, str] | None = None, row_group_size: int | None = None,
                         max_partition_docs: int | None = None, map_calls: MapCalls | None = None,
                         texts: tuple | None = None) -> dict:
    """The queue step (see the module docstring) over the cluster stage's shards ``keys``.

    ``shard_names``: ``{shard key: name}`` recorded as the entries' ``shard`` (e.g. the shard's
    relative path; default: the key). Returns ``{"clusters", "documents", "skipped", "config_hash"}``.
    ``map_calls(fn, calls)`` runs ``fn(*args)`` for each ``args`` (first: the work dir) and yields
    the results in call order: by default a loop in this process (memory bounded by one shard in
    phase 1, then by one partition); :func:`workers.clusterer.queue_calls_on_ray` runs them as Ray
    tasks, so the caller holds only O(clusters) (the counts, then the per-cluster metadata).

    ``texts = (corpus config, {shard key: shard info})``: the queue files also hold each document's
    text (column ``text``), so Quad's rounds read the sampled texts from the block they already read
    instead of from random shards (:meth:`DiskClusterQueues.read_texts`). Row groups are then
    ``TEXT_ROW_GROUP_SIZE`` rows and partitions at most ``TEXT_PARTITION_DOCS`` documents (a task
    holds a partition's texts), unless given.
    """
    run_calls = map_calls or _in_process
    keys = sorted(keys)
    names = [(shard_names or {}).get(k, k) for k in keys]
    if row_group_size is None:
        row_group_size = TEXT_ROW_GROUP_SIZE if texts else ROW_GROUP_SIZE
    if max_partition_docs is None:
        max_partition_docs = TEXT_PARTITION_DOCS if texts else MAX_PARTITION_DOCS
    sources = None
    if texts is not None:
        corpus_config, infos = texts
        missing = [k for k in keys if k not in infos]
        if missing:
            raise ValueError(f"cluster queues with texts: no shard info for {missing[:3]}")
        sources = {k: (corpus_config, infos[k]) for k in keys}
    layout = {"format": QUEUE_FORMAT, "seed": int(seed), "row_group_size": int(row_group_size),
              "texts": sources is not None}
    shard_hashes = [stable_hash({**layout, "assign": _assign_hash(workdir, k)}) for k in keys]
    config_hash = stable_hash({**layout, "shards": list(zip(keys, shard_hashes)), "names": names,
                               "max_partition_docs": int(max_partition_docs)})
    if workdir.is_done(QUEUE_STAGE, META_KEY, config_hash):
        stats = workdir.read_marker(QUEUE_STAGE, META_KEY)["stats"]
        return dict(stats, skipped=True, config_hash=config_hash)
    counts: dict[int, int] = {}
    for stats in run_calls(sort_shard, ((workdir, key, seed, h, row_group_size, sources[key] if sources else None)
                                        for key, h in zip(keys, shard_hashes))):
        for c, n in stats["counts"]:
            counts[c] = counts.get(c, 0) + n
    meta: list[list] = []
    partitions = partition_clusters(counts, max_partition_docs)
    for part_meta in run_calls(merge_partition, ((workdir, keys, clusters,
                                                  stable_hash({"config": config_hash, "clusters": clusters}),
                                                  row_group_size) for clusters in partitions)):
        meta.extend(part_meta)
    fingerprint = store_fingerprint(*zip(*meta)) if meta else store_fingerprint([], [], [], [])
    payload = {**layout, "shards": names, "clusters": meta, "fingerprint": fingerprint}
    stats = {"clusters": len(meta), "documents": int(sum(m[1] for m in meta)), "fingerprint": fingerprint}
    workdir.write_bytes(QUEUE_STAGE, META_KEY, "json", json.dumps(payload).encode(), config_hash, stats)
    return dict(stats, skipped=False, config_hash=config_hash)
