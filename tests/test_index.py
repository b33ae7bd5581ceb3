import numpy as np
import pyarrow as pa

from selector.data.index import INDEX_SCHEMA, hash_keys, hash_order_prefix


def table(n, seed=0):
    rng = np.random.default_rng(seed)
    return pa.Table.from_pydict({
        "doc_id": [f"doc-{i}" for i in range(n)], "shard": [f"s{i % 3}" for i in range(n)],
        "row": list(range(n)), "n_tokens": rng.integers(1, 500, n).tolist(), "n_chars": [1] * n,
        "content_hash": ["h"] * n}, schema=INDEX_SCHEMA)


def naive_random_selection(t, seed, budget):
    """The definition: documents in seeded hash order, stop before the budget would be passed."""
    keys = hash_keys(t["doc_id"].to_pylist(), seed)
    chosen, total = [], 0
    for i in sorted(range(t.num_rows), key=lambda i: keys[i]):
        n = t["n_tokens"][i].as_py()
        if total + n > budget:
            break
        chosen.append(t["doc_id"][i].as_py())
        total += n
    return chosen


def test_hash_keys_are_uniform_and_seeded():
    ids = [f"x{i}" for i in range(20000)]
    k0, k1 = hash_keys(ids, 0), hash_keys(ids, 1)
    assert np.all((k0 >= 0) & (k0 < 1))
    assert abs(k0.mean() - 0.5) < 0.01 and abs(np.median(k1) - 0.5) < 0.02
    assert not np.array_equal(k0, k1)
    assert np.array_equal(k0, hash_keys(ids, 0))


def test_bucketed_random_selection_equals_the_definition_for_any_partition_and_bucket_count():
    """The three passes of workers.index_reads.random_selection, run on in-process parts."""
    import pyarrow.compute as pc

    from selector.data.index import (bucket_tokens, crossing_bucket, cut_in_hash_order, in_hash_order,
                                     rows_in_buckets)

    full = table(3000)
    rng = np.random.default_rng(7)
    total = sum(full["n_tokens"].to_pylist())
    for seed, budget, n_buckets in [(0, 10_000, 64), (1, 123_456, 4), (2, 1, 16), (3, 10**9, 8),
                                    (4, total, 1), (5, total - 1, 1), (6, 0, 3)]:
        cuts = np.sort(rng.choice(np.arange(1, 3000), size=4, replace=False))
        parts = [full.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, 3000])]
        counts = sum(bucket_tokens(p, seed, n_buckets) for p in parts)
        crossing = crossing_bucket(counts, budget)
        if crossing is None:
            chosen = pa.concat_tables([rows_in_buckets(p, seed, n_buckets, 0, n_buckets) for p in parts])
        else:
            b, before = crossing
            edge = cut_in_hash_order(pa.concat_tables([rows_in_buckets(p, seed, n_buckets, b, b + 1) for p in parts]),
                                     budget - before)
            below = [rows_in_buckets(p, seed, n_buckets, 0, b) for p in parts]
            chosen = pa.concat_tables([*below, edge])
        chosen = in_hash_order(chosen)
        assert chosen["doc_id"].to_pylist() == naive_random_selection(full, seed, budget), (seed, budget, n_buckets)
        assert (pc.sum(chosen["n_tokens"]).as_py() or 0) <= budget


def test_empty_inputs():
    assert hash_order_prefix(None, 0, 10).num_rows == 0


def test_indexed_documents_are_the_index_rows_with_their_texts(tmp_path, tiny_tokenizer_dir):
    """What a per-shard stage reads: the shard's finished index from the work dir and the texts of
    exactly those rows (a rejected record is in neither)."""
    from selector.data.corpus import Corpus, CorpusConfig, TokenCounter
    from selector.demo.corpus import write_shard
    from selector.data.index import index_shard, indexed_documents
    from selector.data.workdir import WorkDir

    docs = [{"text": f"document number {i} " * (i + 1)} for i in range(6)]
    docs[3] = {"text": ""}  # rejected at indexing (empty), quarantined
    write_shard(tmp_path / "corpus" / "a.jsonl", docs)
    corpus = Corpus(CorpusConfig(uri=str(tmp_path / "corpus"), on_bad_record="quarantine"))
    (shard,) = corpus.list_shards()
    workdir = WorkDir(str(tmp_path / "work"), "run")
    table, _ = index_shard(corpus, shard, TokenCounter(str(tiny_tokenizer_dir)), workdir, "h")
    index, texts = indexed_documents(corpus, shard, workdir)
    assert index["row"].to_pylist() == table["row"].to_pylist() == [0, 1, 2, 4, 5]
    assert index["doc_id"].to_pylist() == table["doc_id"].to_pylist()
    assert index["n_tokens"].to_pylist() == table["n_tokens"].to_pylist()
    assert texts == [docs[r]["text"] for r in (0, 1, 2, 4, 5)]


def test_selector_package_never_imports_ray():
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, selector\n"
        "names = [m.name for m in pkgutil.walk_packages(selector.__path__, 'selector.')]\n"
        "assert len(names) > 40, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
