"""Reads over the work-dir index: Ray tasks, each over a group of shards, with nothing O(documents)
in the driver.

The index stage (:mod:`workers.indexer`) leaves one index table per shard in the work dir
(``selector.data.index``); every later question about "all documents" is answered by tasks that load
their group's tables there and send back only the answer:

* :func:`duplicate_ids` -- the distributed duplicate check: each group task splits its 64-bit id
  keys by ``key % parts`` (one Ray return per part), one task per part finds the repeated keys,
  and only the rows holding those keys come back, where the ids themselves are compared
  (:func:`selector.data.index.find_duplicate_ids`, so a key collision of distinct ids is no error);
* :func:`random_selection` -- the ``random`` method, exact, in three passes over the groups (see
  ``selector.data.index``): tokens per hash-key bucket, summed as they arrive; the (key, shard, row,
  tokens) of the one bucket where the budget runs out, cut in hash order; every group's rows below
  that bucket and its chosen rows in it. The driver holds the bucket counts and one bucket's keys,
  then the selection (Arrow columns);
* :func:`random_sample_located` -- ``n`` documents uniformly at random (the first ``n`` in hash order
  of the whole corpus): each group's first ``n``, merged (O(groups x n));
* :func:`read_located` -- texts by ``(shard, row)``: one task per shard, reading those rows from the
  shard itself (``Corpus.read_rows``: the validated text; a row rejected at indexing is an error).

The answers do not depend on how the shards are grouped (tests/test_index_reads.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import ray

from selector.data.corpus import Corpus, CorpusConfig, ShardInfo
from selector.data.index import (bucket_tokens, crossing_bucket, cut_in_hash_order, find_duplicate_ids, hash_keys,
                                 id_keys, in_hash_order, key_buckets, read_index, rows_in_buckets)
from selector.data.workdir import WorkDir
from workers.runtime import job_env

GROUP_SHARDS = 64  # shards per task: enough work per task, few enough tables in one process
TASK_CPUS = 0.25
KEYS_PER_PART = 20_000_000  # id keys per duplicate-check reduce task (160 MB of uint64)
MAX_PARTS = 256


def shard_groups(relpaths: Sequence[str], min_groups: int = 1) -> list[list[str]]:
    """Contiguous groups of at most :data:`GROUP_SHARDS` shards, at least ``min_groups`` of them
    (when there are that many shards)."""
    paths = sorted(relpaths)
    if not paths:
        return []
    n = min(len(paths), max(min_groups, -(-len(paths) // GROUP_SHARDS)))
    bounds = np.linspace(0, len(paths), n + 1).round().astype(int)
    return [paths[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _workdir(work: tuple) -> WorkDir:
    return WorkDir(*work)


def _work(workdir: WorkDir) -> tuple:
    return (workdir.root, workdir.run_id, workdir.storage_options)


_TASKS: dict = {}  # fn -> its Ray remote function (exported to the cluster once)


def _remote(fn, **options):
    if fn not in _TASKS:
        _TASKS[fn] = ray.remote(fn)
    return _TASKS[fn].options(**job_env(num_cpus=TASK_CPUS, **options))


# --------------------------------------------------------------------------- the tasks' bodies


def _id_key_parts(work: tuple, relpaths: list[str], parts: int):
    table = read_index(_workdir(work), relpaths, columns=["doc_id"])
    keys = id_keys(table["doc_id"].to_pylist()) if table is not None else np.zeros(0, np.uint64)
    split = [keys[keys % np.uint64(parts) == np.uint64(p)] for p in range(parts)]
    return split[0] if parts == 1 else split


def _repeated_keys(*parts: np.ndarray) -> np.ndarray:
    keys, counts = np.unique(np.concatenate(parts), return_counts=True)
    return keys[counts > 1]


def _rows_with_keys(work: tuple, relpaths: list[str], keys: np.ndarray) -> pa.Table | None:
    table = read_index(_workdir(work), relpaths, columns=["doc_id", "shard", "row"])
    if table is None:
        return None
    return table.filter(pa.array(np.isin(id_keys(table["doc_id"].to_pylist()), keys)))


def _bucket_tokens(work: tuple, relpaths: list[str], seed: int, n_buckets: int) -> np.ndarray:
    return bucket_tokens(read_index(_workdir(work), relpaths, columns=["doc_id", "n_tokens"]), seed, n_buckets)


EDGE_COLUMNS = ["hash_key", "shard", "row", "n_tokens"]  # what the driver needs to cut the edge bucket


def _rows_in_buckets(work: tuple, relpaths: list[str], seed: int, n_buckets: int, low: int, high: int,
                     columns: list[str] | None = None) -> pa.Table:
    rows = rows_in_buckets(read_index(_workdir(work), relpaths), seed, n_buckets, low, high)
    return rows.select(columns) if columns else rows


def _selected_rows(work: tuple, relpaths: list[str], seed: int, n_buckets: int, bucket: int,
                   edge: pa.Table) -> pa.Table:
    """The group's rows below ``bucket``, and those of ``bucket`` that ``edge`` (shard, row) names."""
    rows = rows_in_buckets(read_index(_workdir(work), relpaths), seed, n_buckets, 0, bucket + 1)
    buckets = key_buckets(rows["hash_key"].to_numpy(), n_buckets)
    keep = buckets < bucket
    at_edge = np.flatnonzero(buckets == bucket)  # about n / n_buckets rows in all: checked one by one
    if edge.num_rows and len(at_edge):
        wanted = set(zip(edge["shard"].to_pylist(), edge["row"].to_pylist()))
        located = zip(rows["shard"].take(at_edge).to_pylist(), rows["row"].take(at_edge).to_pylist())
        keep[at_edge] = [where in wanted for where in located]
    return rows.filter(pa.array(keep))


def _first_in_hash_order(work: tuple, relpaths: list[str], n: int, seed: int) -> dict[str, list]:
    table = read_index(_workdir(work), relpaths, columns=["doc_id", "shard", "row"])
    if table is None or n <= 0:
        return {"doc_id": [], "shard": [], "row": []}
    keys = hash_keys(table["doc_id"].to_pylist(), seed)
    order = pa.array(np.argsort(keys, kind="stable")[:n])
    return {name: table[name].take(order).to_pylist() for name in ("doc_id", "shard", "row")}


def _read_rows(corpus_config: dict, shard: ShardInfo, rows: list[int]) -> list[str]:
    return Corpus(CorpusConfig.model_validate(corpus_config)).read_rows(shard, rows).texts


# --------------------------------------------------------------------------- the driver's side


def duplicate_ids(workdir: WorkDir, relpaths: Sequence[str], documents: int, min_groups: int = 1,
                  limit: int = 5) -> list[str]:
    """Messages naming both places of each document id that occurs more than once (at most
    ``limit``), found without the ids passing through the driver; ``documents``: the corpus's
    document count (it sizes the shuffle: one reduce task per :data:`KEYS_PER_PART` keys)."""
    groups = shard_groups(relpaths, min_groups)
    if not groups:
        return []
    parts = max(1, min(MAX_PARTS, -(-documents // KEYS_PER_PART)))
    work = _work(workdir)
    split = [_remote(_id_key_parts, num_returns=parts).remote(work, g, parts) for g in groups]
    split = [s if isinstance(s, list) else [s] for s in split]
    repeated = ray.get([_remote(_repeated_keys).remote(*[s[p] for s in split]) for p in range(parts)])
    del split
    keys = np.concatenate(repeated)
    if not len(keys):
        return []
    return find_duplicate_ids(ray.get([_remote(_rows_with_keys).remote(work, g, keys) for g in groups]), limit)


DOCS_PER_BUCKET = 1_000  # random selection: documents per hash-key bucket (the one bucket the driver reads)
MAX_BUCKETS = 1 << 16


def random_selection(workdir: WorkDir, relpaths: Sequence[str], seed: int, budget_tokens: int, documents: int,
                     min_groups: int = 1) -> pa.Table:
    """The ``random`` method: the global hash-order prefix under the budget (index rows + ``hash_key``,
    in hash order), the same for any grouping; ``documents``: the corpus's count (it sizes the buckets)."""
    work, groups = _work(workdir), shard_groups(relpaths, min_groups)
    n_buckets = int(min(MAX_BUCKETS, max(1, documents // DOCS_PER_BUCKET)))
    counts = np.zeros(n_buckets, np.int64)
    pending = [_remote(_bucket_tokens).remote(work, g, seed, n_buckets) for g in groups]
    while pending:  # summed as they arrive: the driver holds one histogram, not one per group
        done, pending = ray.wait(pending, num_returns=1)
        counts += ray.get(done[0])
    crossing = crossing_bucket(counts, budget_tokens)
    if crossing is None:  # the whole corpus fits
        parts = [_remote(_rows_in_buckets).remote(work, g, seed, n_buckets, 0, n_buckets) for g in groups]
        return in_hash_order(pa.concat_tables(ray.get(parts)))
    bucket, before = crossing
    # the edge bucket's candidates as (key, shard, row, tokens) only: ids can be long
    edge = cut_in_hash_order(pa.concat_tables(ray.get(
        [_remote(_rows_in_buckets).remote(work, g, seed, n_buckets, bucket, bucket + 1, EDGE_COLUMNS)
         for g in groups])), budget_tokens - before)
    group_of = {p: i for i, g in enumerate(groups) for p in g}
    owner = np.array([group_of[p] for p in edge["shard"].to_pylist()], dtype=np.int64)
    parts = ray.get([_remote(_selected_rows).remote(work, g, seed, n_buckets, bucket,
                                                    edge.filter(pa.array(owner == i)).select(["shard", "row"]))
                     for i, g in enumerate(groups)])
    return in_hash_order(pa.concat_tables(parts))


def random_sample_located(workdir: WorkDir, relpaths: Sequence[str], n: int, seed: int,
                          min_groups: int = 1) -> dict[str, list]:
    """``n`` documents uniformly at random from the whole corpus (the same for any grouping), as
    columns ``doc_id, shard, row``."""
    work = _work(workdir)
    parts = ray.get([_remote(_first_in_hash_order).remote(work, g, n, seed) for g in shard_groups(relpaths, min_groups)])
    columns = {name: [v for p in parts for v in p[name]] for name in ("doc_id", "shard", "row")}
    order = np.argsort(hash_keys(columns["doc_id"], seed), kind="stable")[:n] if columns["doc_id"] else []
    return {name: [values[i] for i in order] for name, values in columns.items()}


def read_located(corpus_config: CorpusConfig, shards: dict[str, ShardInfo], at_shards: Sequence[str],
                 rows: Sequence[int]) -> list[str]:
    """Texts of the documents at ``(at_shards[i], rows[i])`` (shard relpaths; ``shards``: the listing by
    relpath), in order: one task per shard, all in flight at once; O(len(rows)) in the driver."""
    if len(at_shards) != len(rows):
        raise ValueError(f"read_located: {len(at_shards)} shards but {len(rows)} rows")
    positions: dict[str, list[int]] = {}
    for i, shard in enumerate(at_shards):
        positions.setdefault(shard, []).append(i)
    unknown = [s for s in positions if s not in shards]
    if unknown:
        raise KeyError(f"unknown shard {unknown[0]!r} (not in the corpus listing)")
    config = corpus_config.model_dump(mode="json")
    futures = {s: _remote(_read_rows).remote(config, shards[s], [int(rows[i]) for i in pos])
               for s, pos in positions.items()}
    texts: list[str] = [""] * len(rows)
    for shard, pos in positions.items():
        for i, text in zip(pos, ray.get(futures[shard])):
            texts[i] = text
    return texts


__all__ = ["GROUP_SHARDS", "duplicate_ids", "random_sample_located", "random_selection", "read_located",
           "shard_groups"]
