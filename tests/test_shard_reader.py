"""ShardReader actors on a real local Ray: reads and random samples by document id."""

import subprocess
import sys

import pytest

from selector.corpus import Corpus, CorpusConfig
from selector.demo_corpus import write_shard
from selector.index import hash_keys
from selector.workdir import WorkDir


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader-corpus")
    docs = [{"id": f"doc-{i}", "text": f"text of document {i} " * (1 + i % 5)} for i in range(60)]
    for i, suffix in enumerate(["parquet", "jsonl.gz", "jsonl"]):
        write_shard(root / f"s{i}.{suffix}", docs[i::3])
    return root, docs


def readers_for(corpus_dir, tokenizer, tmp_path, n):
    from workers.shard_reader import index_corpus, start_shard_readers

    cfg = CorpusConfig(uri=str(corpus_dir), id_column="id", batch_size=7)
    shards = Corpus(cfg).list_shards()
    readers = start_shard_readers(cfg, str(tokenizer), WorkDir(str(tmp_path), "r"), shards, n, 0.25)
    index_corpus(readers, "h", progress=False)
    return readers


def test_reads_by_id_and_random_samples_are_layout_independent(ray_local, corpus_dir, tmp_path, tiny_tokenizer_dir):
    from workers.shard_reader import owner_map, random_sample, read_texts

    root, docs = corpus_dir
    by_id = {d["id"]: d["text"] for d in docs}
    samples = []
    for n in (1, 2, 3):
        readers = readers_for(root, tiny_tokenizer_dir, tmp_path / f"w{n}", n)
        owners = owner_map(readers)
        assert set(owners) == set(by_id)
        wanted = ["doc-59", "doc-0", "doc-31", "doc-2"]
        assert read_texts(readers, owners, wanted) == [by_id[d] for d in wanted]
        with pytest.raises(KeyError, match="unknown document id"):
            read_texts(readers, owners, ["nope"])
        samples.append(random_sample(readers, 10, seed=4))
    assert samples[0] == samples[1] == samples[2]
    keys = hash_keys(list(by_id), 4)
    expected = [d for _, d in sorted(zip(keys, by_id))][:10]
    assert samples[0] == expected


def test_reads_by_shard_and_row_equal_reads_by_id(ray_local, corpus_dir, tmp_path, tiny_tokenizer_dir):
    """The located path (shard routes from the listing, reads per shard) against the by-id path."""
    import ray

    from workers.shard_reader import (owner_map, random_sample, random_sample_located, read_located, read_texts,
                                      shard_routes)

    root, _ = corpus_dir
    for n in (1, 3):
        readers = readers_for(root, tiny_tokenizer_dir, tmp_path / f"w{n}", n)
        routes = shard_routes(readers)
        assert sorted(routes) == ["s0.parquet", "s1.jsonl.gz", "s2.jsonl"] and len(set(routes.values())) == n
        index = [t for t in ray.get([r.index_table.remote() for r in readers]) if t is not None]
        ids = [d for t in index for d in t["doc_id"].to_pylist()][::-1]  # every document, shards interleaved
        where = {d: (s, r) for t in index for d, s, r in zip(t["doc_id"].to_pylist(), t["shard"].to_pylist(),
                                                             t["row"].to_pylist())}
        by_id = read_texts(readers, owner_map(readers), ids)
        assert read_located(readers, routes, [where[d][0] for d in ids], [where[d][1] for d in ids]) == by_id
        sample = random_sample_located(readers, 12, seed=4)
        assert sample["doc_id"] == random_sample(readers, 12, seed=4)
        assert [(s, r) for s, r in zip(sample["shard"], sample["row"])] == [where[d] for d in sample["doc_id"]]
        assert read_located(readers, routes, sample["shard"], sample["row"]) == \
            read_texts(readers, owner_map(readers), sample["doc_id"])
        with pytest.raises(KeyError, match="unknown shard"):
            read_located(readers, routes, ["nope.jsonl"], [0])
        with pytest.raises(ray.exceptions.RayTaskError, match="not indexed documents"):
            read_located(readers, routes, ["s0.parquet"], [10_000])


def test_selector_package_never_imports_ray():
    code = (
        "import importlib, pkgutil, sys, selector\n"
        "for m in pkgutil.iter_modules(selector.__path__):\n"
        "    importlib.import_module('selector.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_duplicate_ids_across_shards_are_an_error_naming_both_places(ray_local, tmp_path, tiny_tokenizer_dir):
    from selector.errors import CorpusError
    from workers.shard_reader import index_corpus, start_shard_readers

    write_shard(tmp_path / "c" / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}])
    write_shard(tmp_path / "c" / "b.parquet", [{"id": "z", "text": "three"}, {"id": "x", "text": "four"}])
    cfg = CorpusConfig(uri=str(tmp_path / "c"), id_column="id")
    readers = start_shard_readers(cfg, str(tiny_tokenizer_dir), WorkDir(str(tmp_path), "r"),
                                  Corpus(cfg).list_shards(), 2, 0.25)
    with pytest.raises(CorpusError, match=r"'x' occurs in shard (a.jsonl row 0|b.parquet row 1) and in shard"):
        index_corpus(readers, "h", progress=False)
