"""The index stage (workers.indexer) on Ray Data tasks, on a real local Ray."""

import pytest

from selector.data.corpus import Corpus, CorpusConfig
from selector.demo.corpus import write_shard
from selector.errors import CorpusError
from selector.data.index import index_shard, read_index
from selector.data.workdir import WorkDir


def test_the_stage_writes_what_index_shard_writes_and_resumes_per_shard(ray_local, tmp_path, tiny_tokenizer_dir):
    from selector.data.corpus import TokenCounter
    from workers.indexer import index_corpus

    docs = [{"id": f"d{i}", "text": f"document number {i} " * (1 + i % 4)} for i in range(30)]
    docs[7]["text"] = None  # quarantined and counted
    for i in range(3):
        write_shard(tmp_path / "c" / f"part-{i}.jsonl", docs[i::3])
    cfg = CorpusConfig(uri=str(tmp_path / "c"), id_column="id", on_bad_record="quarantine")
    shards = Corpus(cfg).list_shards()
    workdir = WorkDir(str(tmp_path / "w"), "r")
    stats = index_corpus(cfg, str(tiny_tokenizer_dir), workdir, shards, "h", concurrency=2, progress=False)
    assert (stats["documents"], stats["rejected"], stats["shards_skipped"]) == (29, 1, 0)
    assert [s["shard"] for s in stats["shards"]] == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    plain = WorkDir(str(tmp_path / "plain"), "r")
    counter = TokenCounter(str(tiny_tokenizer_dir))
    expected = [index_shard(Corpus(cfg), s, counter, plain, "h")[0] for s in shards]
    assert read_index(workdir, [s.relpath for s in shards]).equals(read_index(plain, [s.relpath for s in shards]))
    assert stats["tokens"] == sum(sum(t["n_tokens"].to_pylist()) for t in expected)

    again = index_corpus(cfg, str(tiny_tokenizer_dir), workdir, shards, "h", progress=False)
    assert again["shards_skipped"] == 3
    assert {k: again[k] for k in ("documents", "tokens", "rejected")} == \
        {k: stats[k] for k in ("documents", "tokens", "rejected")}

    write_shard(tmp_path / "c" / "part-1.jsonl", docs[1::3][:4])  # rewritten: that shard alone is redone
    shards = Corpus(cfg).list_shards()
    changed = index_corpus(cfg, str(tiny_tokenizer_dir), workdir, shards, "h", progress=False)
    assert changed["shards_skipped"] == 2
    assert changed["documents"] == 29 - 10 + 4


def test_duplicate_ids_across_shards_are_an_error_naming_both_places(ray_local, tmp_path, tiny_tokenizer_dir):
    from workers.indexer import index_corpus

    write_shard(tmp_path / "c" / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "y", "text": "two"}])
    write_shard(tmp_path / "c" / "b.parquet", [{"id": "z", "text": "three"}, {"id": "x", "text": "four"}])
    cfg = CorpusConfig(uri=str(tmp_path / "c"), id_column="id")
    with pytest.raises(CorpusError, match=r"'x' occurs in shard a.jsonl row 0 and in shard b.parquet row 1"):
        index_corpus(cfg, str(tiny_tokenizer_dir), WorkDir(str(tmp_path), "r"), Corpus(cfg).list_shards(), "h",
                     progress=False)
