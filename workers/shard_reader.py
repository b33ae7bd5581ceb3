"""ShardReader: a Ray actor that owns a set of shards, indexes them and serves reads.

Thin over ``selector.corpus`` and ``selector.index``: the actor adds residency (an LRU of
decoded shards so repeated reads don't rescan) and Ray resources.

Two ways to read texts from the driver:

* by location -- :func:`shard_routes` (shard relpath -> reader, O(shards)) and :func:`read_located`
  (``(shard, row)`` pairs, one :meth:`ShardReader.read_rows` call per shard, in parallel). Nothing in
  the driver grows with the corpus; this is what Quad and ``topk-influence`` use;
* by id -- :func:`owner_map` (doc_id -> reader, O(documents) in the driver) and :func:`read_texts`:
  no job stage uses them any more; they are the plain reference that tests/test_shard_reader.py
  pins the located reads against.

Both return the same texts: the validated text column of the indexed rows (rows rejected at
indexing cannot be read either way).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import pyarrow as pa
import ray

from selector.corpus import Corpus, CorpusConfig, ShardInfo
from selector.errors import CorpusError
from selector.index import find_duplicate_ids, hash_keys, hash_order_prefix, id_keys, index_shard
from selector.workdir import WorkDir
from workers.runtime import job_env


@ray.remote
class ShardReader:
    def __init__(self, corpus_config: dict, tokenizer: str, work_root: str, run_id: str,
                 work_storage_options: dict, shards: list[ShardInfo], cached_shards: int = 2):
        self.corpus = Corpus(CorpusConfig.model_validate(corpus_config))
        self.tokenizer_path = tokenizer
        self.workdir = WorkDir(work_root, run_id, work_storage_options)
        self.shards = {s.relpath: s for s in shards}
        self._counter = None
        self._index: dict[str, pa.Table] = {}
        self._location: dict[str, tuple[str, int]] = {}
        self._cache: OrderedDict[str, dict[int, str]] = OrderedDict()
        self._cached_shards = cached_shards

    def shard_paths(self) -> list[str]:
        return sorted(self.shards)

    def index(self, relpath: str, config_hash: str) -> dict:
        """Index one shard (or load its finished index); returns its stats."""
        from selector.corpus import TokenCounter

        shard = self.shards[relpath]
        if self._counter is None:
            self._counter = TokenCounter(self.tokenizer_path)
        table, stats = index_shard(self.corpus, shard, self._counter, self.workdir, config_hash)
        self._index[relpath] = table
        for doc_id, row in zip(table["doc_id"].to_pylist(), table["row"].to_pylist()):
            self._location[doc_id] = (relpath, row)
        return stats

    def index_table(self) -> pa.Table:
        """The index rows of every shard this reader owns (doc_id, shard, row, n_tokens, ...)."""
        return pa.concat_tables([self._index[p] for p in sorted(self._index)]) if self._index else None

    def id_key_parts(self, parts: int):
        """This reader's document id keys (:func:`selector.index.id_keys`) split by ``key % parts``:
        ``parts`` arrays, one Ray return each (the duplicate check's shuffle)."""
        table = self.index_table()
        keys = id_keys(table["doc_id"].to_pylist()) if table is not None else np.zeros(0, np.uint64)
        split = [keys[keys % np.uint64(parts) == np.uint64(p)] for p in range(parts)]
        return split[0] if parts == 1 else split

    def rows_with_keys(self, keys: np.ndarray) -> pa.Table | None:
        """The index rows whose id key is in ``keys`` (index order)."""
        table = self.index_table()
        if table is None or not len(keys):
            return None
        return table.filter(pa.array(np.isin(id_keys(table["doc_id"].to_pylist()), keys)))

    def hash_order_prefix(self, seed: int, max_tokens: int) -> pa.Table:
        """Documents in seeded hash order while their cumulative tokens fit in ``max_tokens``."""
        return hash_order_prefix(self.index_table(), seed, max_tokens)

    def sample(self, n: int, seed: int) -> dict[str, list]:
        """Up to ``n`` of this reader's documents, uniformly at random (the first ``n`` in hash order):
        columns ``doc_id, shard, row``."""
        table = self.index_table()
        if table is None or n <= 0:
            return {"doc_id": [], "shard": [], "row": []}
        keys = hash_keys(table["doc_id"].to_pylist(), seed)
        order = pa.array(np.argsort(keys, kind="stable")[:n])
        return {name: table[name].take(order).to_pylist() for name in ("doc_id", "shard", "row")}

    def read(self, doc_ids: list[str]) -> list[str]:
        """Texts of ``doc_ids`` (all owned by this reader), in the order given."""
        missing = [d for d in doc_ids if d not in self._location]
        if missing:
            raise KeyError(f"documents not owned by this reader or not indexed: {missing[:5]}")
        texts = []
        for doc_id in doc_ids:
            relpath, row = self._location[doc_id]
            texts.append(self._shard_texts(relpath)[row])
        return texts

    def read_rows(self, relpath: str, rows: list[int]) -> list[str]:
        """Texts at ``rows`` of the shard ``relpath`` (owned by this reader), in the order given: the
        texts :meth:`read` returns for those documents' ids."""
        if relpath not in self._index:
            raise KeyError(f"shard {relpath!r} not owned by this reader or not indexed")
        texts = self._shard_texts(relpath)
        missing = [r for r in rows if r not in texts]
        if missing:
            raise KeyError(f"shard {relpath!r}: rows {missing[:5]} are not indexed documents")
        return [texts[r] for r in rows]

    def _shard_texts(self, relpath: str) -> dict[int, str]:
        if relpath in self._cache:
            self._cache.move_to_end(relpath)
            return self._cache[relpath]
        rows = self._index[relpath]["row"].to_pylist()
        texts = dict(zip(rows, self.corpus.read_rows(self.shards[relpath], rows).texts))
        self._cache[relpath] = texts
        while len(self._cache) > self._cached_shards:
            self._cache.popitem(last=False)
        return texts


def assign_shards(shards: list[ShardInfo], n_readers: int) -> list[list[ShardInfo]]:
    """Round-robin by size (largest first), so readers get similar byte counts."""
    buckets: list[list[ShardInfo]] = [[] for _ in range(min(n_readers, len(shards)))]
    sizes = [0] * len(buckets)
    for shard in sorted(shards, key=lambda s: (-s.size, s.relpath)):
        i = sizes.index(min(sizes))
        buckets[i].append(shard)
        sizes[i] += shard.size
    return buckets


def start_shard_readers(corpus_config: CorpusConfig, tokenizer: str, workdir: WorkDir, shards: list[ShardInfo],
                        n_readers: int, num_cpus: float) -> list:
    return [
        ShardReader.options(**job_env(num_cpus=num_cpus)).remote(
            corpus_config.model_dump(mode="json"), tokenizer, workdir.root, workdir.run_id,
            workdir.storage_options, bucket)
        for bucket in assign_shards(shards, n_readers)
    ]


def index_corpus(readers: list, config_hash: str, progress: bool = True) -> dict:
    """Stage 1 over all readers: each shard indexed once (finished shards are loaded, not redone)."""
    from workers.progress import gather

    shard_lists = ray.get([r.shard_paths.remote() for r in readers])
    futures = [reader.index.remote(path, config_hash) for reader, paths in zip(readers, shard_lists) for path in paths]
    totals = {"documents": 0}

    def running(stats: dict) -> str:
        totals["documents"] += stats["documents"]
        return f"{totals['documents']:,} docs"

    per_shard = gather(futures, "index", enabled=progress, on_result=running)
    duplicates = duplicate_ids(readers)
    if duplicates:
        raise CorpusError("document ids must be unique across the corpus (fix the id column, or drop "
                          "corpus.id_column to use <shard>:<row> ids): " + "; ".join(duplicates))
    return {
        "shards": per_shard,
        "documents": sum(s["documents"] for s in per_shard),
        "tokens": sum(s["tokens"] for s in per_shard),
        "rejected": sum(s["rejected"] for s in per_shard),
        "shards_skipped": sum(1 for s in per_shard if s["skipped"]),
    }


@ray.remote(num_cpus=0.1)
def _repeated_keys(*parts: np.ndarray) -> np.ndarray:
    keys, counts = np.unique(np.concatenate(parts), return_counts=True)
    return keys[counts > 1]


def duplicate_ids(readers: list, limit: int = 5) -> list[str]:
    """Messages for document ids that occur more than once, without the ids passing through the
    driver: each reader splits its 64-bit id keys into one part per reader, one task per part finds
    the repeated keys, and only the rows with those keys come back, where the ids are compared
    (:func:`selector.index.find_duplicate_ids`, so a key collision of distinct ids is no error)."""
    parts = len(readers)
    split = [r.id_key_parts.options(num_returns=parts).remote(parts) for r in readers]
    split = [s if isinstance(s, list) else [s] for s in split]
    repeated = ray.get([_repeated_keys.remote(*[s[p] for s in split]) for p in range(parts)])
    keys = np.concatenate(repeated) if repeated else np.zeros(0, np.uint64)
    if not len(keys):
        return []
    return find_duplicate_ids(ray.get([r.rows_with_keys.remote(keys) for r in readers]), limit)


def random_selection(readers: list, seed: int, budget_tokens: int) -> pa.Table:
    """The ``random`` method: the global hash-order prefix under the budget (exact; see selector.index)."""
    from selector.index import merge_hash_order

    prefixes = ray.get([r.hash_order_prefix.remote(seed, budget_tokens) for r in readers])
    return merge_hash_order(prefixes, budget_tokens)


def shard_routes(readers: list) -> dict[str, int]:
    """Shard relpath -> index of the reader that owns it (O(shards))."""
    return {p: i for i, paths in enumerate(ray.get([r.shard_paths.remote() for r in readers])) for p in paths}


def read_located(readers: list, routes: dict[str, int], shards: Sequence[str], rows: Sequence[int]) -> list[str]:
    """Texts of the documents at ``(shards[i], rows[i])`` (shard relpaths), in order: one
    :meth:`ShardReader.read_rows` call per shard, all in flight at once; O(len(rows)) in the driver."""
    if len(shards) != len(rows):
        raise ValueError(f"read_located: {len(shards)} shards but {len(rows)} rows")
    positions: dict[str, list[int]] = {}
    for i, shard in enumerate(shards):
        positions.setdefault(shard, []).append(i)
    unknown = [s for s in positions if s not in routes]
    if unknown:
        raise KeyError(f"unknown shard {unknown[0]!r} (not in the corpus listing)")
    futures = {s: readers[routes[s]].read_rows.remote(s, [int(rows[i]) for i in pos]) for s, pos in positions.items()}
    texts: list[str] = [""] * len(rows)
    for shard, pos in positions.items():
        for i, text in zip(pos, ray.get(futures[shard])):
            texts[i] = text
    return texts


def owner_map(readers: list) -> dict[str, int]:
    """doc_id -> index of the reader that owns it (O(documents) in the caller: prefer :func:`shard_routes`)."""
    tables = ray.get([r.index_table.remote() for r in readers])
    return {doc_id: i for i, t in enumerate(tables) if t is not None for doc_id in t["doc_id"].to_pylist()}


def read_texts(readers: list, owners: dict[str, int], doc_ids: list[str]) -> list[str]:
    """Texts of ``doc_ids`` in order, each read by the reader that owns it (in parallel)."""
    by_reader: dict[int, list[str]] = {}
    for doc_id in doc_ids:
        if doc_id not in owners:
            raise KeyError(f"unknown document id {doc_id!r}")
        by_reader.setdefault(owners[doc_id], []).append(doc_id)
    futures = {i: readers[i].read.remote(ids) for i, ids in by_reader.items()}
    texts = {}
    for i, ids in by_reader.items():
        texts.update(zip(ids, ray.get(futures[i])))
    return [texts[d] for d in doc_ids]


def random_sample_located(readers: list, n: int, seed: int) -> dict[str, list]:
    """``n`` documents uniformly at random from the whole corpus (same for any reader layout), as
    columns ``doc_id, shard, row``: each reader's first ``n`` in hash order, merged (O(readers x n))."""
    parts = ray.get([r.sample.remote(n, seed) for r in readers])
    columns = {name: [v for p in parts for v in p[name]] for name in ("doc_id", "shard", "row")}
    order = np.argsort(hash_keys(columns["doc_id"], seed), kind="stable")[:n] if columns["doc_id"] else []
    return {name: [values[i] for i in order] for name, values in columns.items()}


def random_sample(readers: list, n: int, seed: int) -> list[str]:
    """The ids of :func:`random_sample_located`."""
    return random_sample_located(readers, n, seed)["doc_id"]


__all__ = ["ShardReader", "assign_shards", "start_shard_readers", "index_corpus", "random_selection", "shard_routes",
           "read_located", "owner_map", "read_texts", "random_sample_located", "random_sample"]
