"""Reads over the work-dir index (workers.index_reads) on a real local Ray: the same answers for
any grouping of the shards into tasks, pinned against the plain reading of the whole index."""

import pytest

from selector.data.corpus import Corpus, CorpusConfig
from selector.demo.corpus import write_shard
from selector.data.index import hash_keys, hash_order_prefix, read_index
from selector.data.workdir import WorkDir


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ray_local, tiny_tokenizer_dir):
    """60 documents in 3 shards (Parquet, gzipped JSONL, JSONL), indexed into a work dir."""
    from workers.indexer import index_corpus

    root = tmp_path_factory.mktemp("reads")
    docs = [{"id": f"doc-{i}", "text": f"text of document {i} " * (1 + i % 5)} for i in range(60)]
    for i, suffix in enumerate(["parquet", "jsonl.gz", "jsonl"]):
        write_shard(root / "corpus" / f"s{i}.{suffix}", docs[i::3])
    cfg = CorpusConfig(uri=str(root / "corpus"), id_column="id", batch_size=7)
    shards = Corpus(cfg).list_shards()
    workdir = WorkDir(str(root / "work"), "r")
    index_corpus(cfg, str(tiny_tokenizer_dir), workdir, shards, "h", concurrency=2, progress=False)
    return cfg, shards, workdir, {d["id"]: d["text"] for d in docs}


def test_shard_groups_cover_every_shard_once_in_bounded_groups():
    from workers.index_reads import GROUP_SHARDS, shard_groups

    names = [f"s{i:04d}" for i in range(3 * GROUP_SHARDS + 5)]
    for min_groups in (1, 2, 7, 10_000):
        groups = shard_groups(names[::-1], min_groups)
        assert [p for g in groups for p in g] == sorted(names)
        assert max(len(g) for g in groups) <= GROUP_SHARDS
        assert len(groups) == min(len(names), max(min_groups, 4))
    assert shard_groups([], 3) == []


def test_random_sample_and_selection_do_not_depend_on_the_grouping(indexed, monkeypatch):
    import workers.index_reads as reads
    from workers.index_reads import random_sample_located, random_selection

    monkeypatch.setattr(reads, "DOCS_PER_BUCKET", reads.DOCS_PER_BUCKET)  # restored after the test

    cfg, shards, workdir, by_id = indexed
    paths = [s.relpath for s in shards]
    index = read_index(workdir, paths)
    where = dict(zip(index["doc_id"].to_pylist(), zip(index["shard"].to_pylist(), index["row"].to_pylist())))
    expected_sample = [d for _, d in sorted(zip(hash_keys(list(by_id), 4), by_id))][:10]
    total = sum(index["n_tokens"].to_pylist())
    for min_groups in (1, 2, 3):
        sample = random_sample_located(workdir, paths, 10, seed=4, min_groups=min_groups)
        assert sample["doc_id"] == expected_sample
        assert list(zip(sample["shard"], sample["row"])) == [where[d] for d in expected_sample]
        # 60 documents: one key bucket by default, then 20 (DOCS_PER_BUCKET 3), so the budget runs out
        # inside a bucket shared by every group; budgets from nothing to the whole corpus
        for docs_per_bucket in (reads.DOCS_PER_BUCKET, 3):
            reads.DOCS_PER_BUCKET = docs_per_bucket
            for budget in (0, 40, 300, total - 1, total, 10 * total):
                chosen = random_selection(workdir, paths, 4, budget, 60, min_groups=min_groups)
                expected = hash_order_prefix(index, 4, budget)
                assert chosen["doc_id"].to_pylist() == expected["doc_id"].to_pylist(), (budget, docs_per_bucket)
                assert chosen["hash_key"].to_pylist() == expected["hash_key"].to_pylist()
        reads.DOCS_PER_BUCKET = 1_000


def test_located_reads_return_each_documents_text(indexed):
    import ray

    from workers.index_reads import read_located

    cfg, shards, workdir, by_id = indexed
    by_path = {s.relpath: s for s in shards}
    index = read_index(workdir, list(by_path))
    ids = index["doc_id"].to_pylist()[::-1]  # every document, shards interleaved
    where = dict(zip(index["doc_id"].to_pylist(), zip(index["shard"].to_pylist(), index["row"].to_pylist())))
    texts = read_located(cfg, by_path, [where[d][0] for d in ids], [where[d][1] for d in ids])
    assert texts == [by_id[d] for d in ids]
    assert read_located(cfg, by_path, [], []) == []
    with pytest.raises(KeyError, match="unknown shard"):
        read_located(cfg, by_path, ["nope.jsonl"], [0])
    with pytest.raises(ValueError, match="2 shards but 1 rows"):
        read_located(cfg, by_path, ["s0.parquet", "s0.parquet"], [0])
    with pytest.raises(ray.exceptions.RayTaskError, match="not found or unreadable"):
        read_located(cfg, by_path, ["s0.parquet"], [10_000])


def test_duplicate_ids_are_found_for_any_grouping_and_shuffle_width(ray_local, tmp_path, tiny_tokenizer_dir,
                                                                    monkeypatch):
    import workers.index_reads as reads
    from workers.indexer import index_corpus

    write_shard(tmp_path / "c" / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}])
    write_shard(tmp_path / "c" / "b.parquet", [{"id": "z", "text": "three"}, {"id": "x", "text": "four"}])
    write_shard(tmp_path / "c" / "c.jsonl", [{"id": "w", "text": "five"}])
    cfg = CorpusConfig(uri=str(tmp_path / "c"), id_column="id")
    shards = Corpus(cfg).list_shards()
    workdir = WorkDir(str(tmp_path / "w"), "r")
    from selector.errors import CorpusError

    with pytest.raises(CorpusError):
        index_corpus(cfg, str(tiny_tokenizer_dir), workdir, shards, "h", progress=False)
    paths = [s.relpath for s in shards]
    for keys_per_part in (reads.KEYS_PER_PART, 2):  # one reduce task, then three
        monkeypatch.setattr(reads, "KEYS_PER_PART", keys_per_part)
        for min_groups in (1, 3):
            found = reads.duplicate_ids(workdir, paths, 5, min_groups=min_groups)
            assert found == ["document id 'x' occurs in shard a.jsonl row 0 and in shard b.parquet row 1"]
        assert reads.duplicate_ids(workdir, ["a.jsonl", "c.jsonl"], 3) == []
