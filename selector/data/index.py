"""Stage 1, index: one row per good document of a shard, and seeded random order.

The index table (``INDEX_SCHEMA``) is the document table every later stage joins on:
``doc_id, shard (relpath), row, n_tokens, n_chars, content_hash``. Texts are not stored; they
are re-read from the shard by row when needed. Quarantined records go to
``runs/<run_id>/rejects/<shard_key>.jsonl`` and are counted in the stats.

Random order for sampling and the ``random`` method is *hash order*: document ``d`` gets
the key ``u(d) = BLAKE2b(seed, doc_id) / 2^64``; sorting by ``u`` is a uniform random
permutation that any worker computes for its own documents without coordination, so the
global order is the merge of the workers' local orders.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from selector.data.corpus import Corpus, RejectSink, ShardInfo, TokenCounter
from selector.data.workdir import WorkDir, atomic_write_bytes, shard_key

INDEX_STAGE = "index"
INDEX_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("n_tokens", pa.int64()),
    ("n_chars", pa.int64()), ("content_hash", pa.string()),
])


def shard_index_hash(config_hash: str, shard: ShardInfo) -> str:
    """The done-marker hash of a shard's index: the shard's size and version are part of it, so a
    rewritten shard is re-indexed."""
    return f"{config_hash}-{shard.size}-{shard.version}"


def index_shard(corpus: Corpus, shard: ShardInfo, counter: TokenCounter, workdir: WorkDir,
                config_hash: str) -> tuple[pa.Table, dict]:
    """Index ``shard`` (or load the finished index with the same config hash)."""
    key = shard_key(shard.relpath)
    full_hash = shard_index_hash(config_hash, shard)
    if workdir.is_done(INDEX_STAGE, key, full_hash):
        marker = workdir.read_marker(INDEX_STAGE, key)
        return workdir.read_table(INDEX_STAGE, key), dict(marker["stats"], skipped=True)
    rejects = RejectSink()
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    for batch in corpus.iter_batches(shard, rejects=rejects):
        columns["doc_id"].extend(batch.doc_ids)
        columns["shard"].extend([shard.relpath] * len(batch))
        columns["row"].extend(batch.rows)
        columns["n_tokens"].extend(counter.count(batch.texts))
        columns["n_chars"].extend(len(t) for t in batch.texts)
        columns["content_hash"].extend(batch.content_hashes)
    table = pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)
    if len(rejects):
        atomic_write_bytes(workdir.fs, workdir.rejects_path(key), rejects.to_jsonl())
    stats = {"shard": shard.relpath, "documents": table.num_rows, "tokens": int(sum(columns["n_tokens"])),
             "rejected": len(rejects), "skipped": False}
    workdir.write_table(INDEX_STAGE, key, table, full_hash, stats)
    return table, stats


def read_index(workdir: WorkDir, relpaths: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """The finished index tables of ``relpaths`` (shard relpaths), concatenated in that order; None if empty."""
    tables = [workdir.read_table(INDEX_STAGE, shard_key(p), columns=columns) for p in relpaths]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def indexed_documents(corpus: Corpus, shard: ShardInfo, workdir: WorkDir) -> tuple[pa.Table, list[str]]:
    """``(index, texts)`` of ``shard``: its finished index from the work dir (``doc_id, row, n_tokens``:
    the documents that passed validation) and their texts, read from the shard (what a per-shard
    scoring stage needs; one shard, read by the worker that scores it)."""
    index = workdir.read_table(INDEX_STAGE, shard_key(shard.relpath), columns=["doc_id", "row", "n_tokens"])
    rows = index["row"].to_pylist()
    return index, (corpus.read_rows(shard, rows).texts if rows else [])


def hash_keys(doc_ids: list[str], seed: int) -> np.ndarray:
    """Uniform [0, 1) keys, a deterministic function of (seed, doc_id)."""
    prefix = f"{seed}:".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + d.encode(), digest_size=8).digest(), "little")
                     for d in doc_ids], dtype=np.float64) / 2.0**64


def id_keys(doc_ids: list[str]) -> np.ndarray:
    """The 64-bit key of each document id (unseeded BLAKE2b-64, uint64): equal ids, equal keys."""
    return np.array([int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little")
                     for d in doc_ids], dtype=np.uint64)


def hash_order_prefix(table: pa.Table | None, seed: int, max_tokens: int) -> pa.Table:
    """Rows of ``table`` in hash order, cut where the cumulative token count would pass ``max_tokens``.

    The random selection under a budget B is this prefix of the whole index: the documents, in
    hash order, whose cumulative tokens stay <= B. The job computes it without collecting the
    index, in bounded passes over key buckets (below); this is the definition they are pinned to.
    """
    if table is None or table.num_rows == 0:
        return INDEX_SCHEMA.empty_table().append_column("hash_key", pa.array([], pa.float64()))
    keys = hash_keys(table["doc_id"].to_pylist(), seed)
    order = np.argsort(keys, kind="stable")
    tokens = table["n_tokens"].to_numpy()[order]
    n_keep = int(np.searchsorted(np.cumsum(tokens), max_tokens, side="right"))
    keep = order[:n_keep]
    return table.take(pa.array(keep)).append_column("hash_key", pa.array(keys[keep]))


# The random selection without collecting candidates: the hash keys are uniform on [0, 1), so
# equal-width key buckets hold about equal numbers of documents. Three passes over the index:
# (1) each part's tokens per bucket, summed -> the first bucket b* where the running total passes the
# budget (every bucket before it is selected whole, none after it); (2) the rows of bucket b* only
# (about n / n_buckets of them), cut in hash order at the budget left; (3) each part's rows below b*,
# plus its rows chosen in b*. What any one process holds: n_buckets counts, one bucket, or its part.


def key_buckets(keys: np.ndarray, n_buckets: int) -> np.ndarray:
    """The bucket (0 .. n_buckets - 1) of each hash key in [0, 1)."""
    return np.minimum((keys * n_buckets).astype(np.int64), n_buckets - 1)


def bucket_tokens(table: pa.Table | None, seed: int, n_buckets: int) -> np.ndarray:
    """Pass 1 over one part of the index: its tokens per key bucket (int64, length ``n_buckets``)."""
    if table is None or table.num_rows == 0:
        return np.zeros(n_buckets, np.int64)
    buckets = key_buckets(hash_keys(table["doc_id"].to_pylist(), seed), n_buckets)
    return np.bincount(buckets, weights=table["n_tokens"].to_numpy(), minlength=n_buckets).astype(np.int64)


def crossing_bucket(tokens_per_bucket: np.ndarray, max_tokens: int) -> tuple[int, int] | None:
    """``(b*, tokens before it)``: the first bucket where the running token total passes ``max_tokens``;
    None when the whole corpus fits."""
    running = np.cumsum(tokens_per_bucket)
    crossing = int(np.searchsorted(running, max_tokens, side="right"))
    if crossing >= len(tokens_per_bucket):
        return None
    return crossing, int(running[crossing - 1]) if crossing else 0


def rows_in_buckets(table: pa.Table | None, seed: int, n_buckets: int, low: int, high: int) -> pa.Table:
    """Rows of ``table`` whose key bucket is in ``[low, high)``, with their ``hash_key``."""
    if table is None or table.num_rows == 0:
        return INDEX_SCHEMA.empty_table().append_column("hash_key", pa.array([], pa.float64()))
    keys = hash_keys(table["doc_id"].to_pylist(), seed)
    buckets = key_buckets(keys, n_buckets)
    keep = np.flatnonzero((buckets >= low) & (buckets < high))
    return table.take(pa.array(keep)).append_column("hash_key", pa.array(keys[keep]))


def in_hash_order(table: pa.Table) -> pa.Table:
    """``table`` (with ``hash_key``) sorted by key, ties by shard and row: the order of
    a stable sort of the parts concatenated in shard order (:func:`hash_order_prefix` of the whole)."""
    return table.sort_by([("hash_key", "ascending"), ("shard", "ascending"), ("row", "ascending")])


def cut_in_hash_order(table: pa.Table, max_tokens: int) -> pa.Table:
    """The hash-order prefix of ``table`` whose cumulative tokens stay <= ``max_tokens``."""
    ordered = in_hash_order(table)
    n_keep = int(np.searchsorted(np.cumsum(ordered["n_tokens"].to_numpy()), max_tokens, side="right"))
    return ordered.slice(0, n_keep)


def find_duplicate_ids(tables: list[pa.Table | None], limit: int = 5) -> list[str]:
    """Messages for document ids that occur more than once (with both locations)."""
    seen: dict[str, tuple[str, int]] = {}
    problems: list[str] = []
    for table in tables:
        if table is None:
            continue
        for doc_id, shard, row in zip(table["doc_id"].to_pylist(), table["shard"].to_pylist(), table["row"].to_pylist()):
            if doc_id in seen:
                first = seen[doc_id]
                problems.append(f"document id {doc_id!r} occurs in shard {first[0]} row {first[1]} "
                                f"and in shard {shard} row {row}")
                if len(problems) >= limit:
                    return problems
            else:
                seen[doc_id] = (shard, row)
    return problems
