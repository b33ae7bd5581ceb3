import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from selector.data.corpus import Corpus, CorpusConfig, RejectSink, TokenCounter, content_hash
from selector.demo.corpus import write_shard
from selector.errors import CorpusError

DOCS = [{"id": f"d{i}", "text": f"Document number {i} says hello to the reader."} for i in range(7)]


def read_all(corpus, rejects=None):
    out = []
    for shard in corpus.list_shards():
        for batch in corpus.iter_batches(shard, rejects=rejects):
            out.extend(zip(batch.doc_ids, batch.rows, batch.texts, batch.content_hashes))
    return out


@pytest.mark.parametrize("suffix", ["parquet", "jsonl", "jsonl.gz", "jsonl.zst"])
def test_every_format_reads_in_bounded_batches(tmp_path, suffix):
    write_shard(tmp_path / "c" / f"part.{suffix}", DOCS)
    corpus = Corpus(CorpusConfig(uri=str(tmp_path / "c"), batch_size=3))
    shard = corpus.list_shards()[0]
    batches = list(corpus.iter_batches(shard))
    assert [len(b) for b in batches] == [3, 3, 1]
    got = [t for b in batches for t in b.texts]
    assert got == [d["text"] for d in DOCS]
    assert batches[0].content_hashes[0] == content_hash(DOCS[0]["text"])


def test_ids_default_to_relative_path_and_row_or_come_from_id_column(tmp_path):
    write_shard(tmp_path / "c" / "sub" / "a.jsonl", DOCS[:2])
    default = read_all(Corpus(CorpusConfig(uri=f"file://{tmp_path}/c")))
    assert [d[0] for d in default] == ["sub/a.jsonl:0", "sub/a.jsonl:1"]
    with_ids = read_all(Corpus(CorpusConfig(uri=str(tmp_path / "c"), id_column="id")))
    assert [d[0] for d in with_ids] == ["d0", "d1"]


def test_listing_ignores_other_files_and_sorts(tmp_path):
    write_shard(tmp_path / "b.parquet", DOCS[:1])
    write_shard(tmp_path / "a.jsonl", DOCS[:1])
    (tmp_path / "README.txt").write_text("not a shard")
    (tmp_path / "_SUCCESS").write_text("")
    shards = Corpus(CorpusConfig(uri=str(tmp_path))).list_shards()
    assert [s.relpath for s in shards] == ["a.jsonl", "b.parquet"]
    assert all(s.size > 0 and s.version for s in shards)


def test_missing_and_empty_corpus_are_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus(CorpusConfig(uri=str(tmp_path / "nope"))).list_shards()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .parquet"):
        Corpus(CorpusConfig(uri=str(tmp_path / "empty"))).list_shards()


# --------------------------------------------------------------------------- bad input


def _bad_shards(tmp_path):
    """One shard per bad-input case; each yields (relpath, row, field fragment, reason fragment)."""
    d = tmp_path / "bad"
    d.mkdir()
    good = json.dumps({"text": "fine text"})
    cases = []
    (d / "invalid_json.jsonl").write_text(good + "\n{not json\n" + good + "\n")
    cases.append(("invalid_json.jsonl", 1, None, "invalid JSON"))
    (d / "non_utf8.jsonl").write_bytes(good.encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    cases.append(("non_utf8.jsonl", 1, "text", "not valid UTF-8"))
    (d / "non_string.jsonl").write_text(good + "\n" + json.dumps({"text": 42}) + "\n")
    cases.append(("non_string.jsonl", 1, "text", "int, not a string"))
    (d / "missing_field.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    cases.append(("missing_field.jsonl", 0, "text", "missing field 'text'"))
    (d / "empty_text.jsonl").write_text(good + "\n" + json.dumps({"text": "   "}) + "\n")
    cases.append(("empty_text.jsonl", 1, "text", "text is empty"))
    (d / "huge.jsonl").write_text(json.dumps({"text": "x" * 5000}) + "\n")
    cases.append(("huge.jsonl", 0, "text", "more than max_doc_chars"))
    (d / "null_text.jsonl").write_text(json.dumps({"text": None}) + "\n")
    cases.append(("null_text.jsonl", 0, "text", "text is null"))
    (d / "truncated.jsonl.gz").write_bytes(gzip.compress(((good + "\n") * 50).encode())[:-30])
    cases.append(("truncated.jsonl.gz", None, None, "corrupt or truncated"))
    (d / "corrupt.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    cases.append(("corrupt.jsonl.zst", 0, None, "corrupt"))
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    cases.append(("corrupt.parquet", None, None, "cannot read Parquet"))
    pq.write_table(pa.table({"body": ["x"]}), d / "missing_column.parquet")
    cases.append(("missing_column.parquet", None, "text", "missing column 'text'"))
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), d / "binary_non_utf8.parquet")
    cases.append(("binary_non_utf8.parquet", 1, "text", "not valid UTF-8"))
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), d / "int_text.parquet")
    cases.append(("int_text.parquet", 0, "text", "int, not a string"))
    return d, cases


def test_each_bad_input_raises_an_error_naming_shard_row_and_field(tmp_path):
    d, cases = _bad_shards(tmp_path)
    corpus = Corpus(CorpusConfig(uri=str(d), max_doc_chars=1000))
    shards = {s.relpath: s for s in corpus.list_shards()}
    assert set(shards) == {c[0] for c in cases}
    for relpath, row, field, reason in cases:
        with pytest.raises(CorpusError) as err:
            for _ in corpus.iter_batches(shards[relpath]):
                pass
        message = str(err.value)
        assert f"shard {relpath}" in message, message
        if row is not None:
            assert f"row {row}" in message, message
        if field is not None:
            assert repr(field) in message, message
        assert reason in message, message


def test_quarantine_counts_every_bad_record_and_keeps_good_ones(tmp_path):
    d, cases = _bad_shards(tmp_path)
    corpus = Corpus(CorpusConfig(uri=str(d), max_doc_chars=1000, on_bad_record="quarantine"))
    sink = RejectSink()
    good = read_all(corpus, rejects=sink)
    bad_by_shard = {}
    for record in sink.records:
        bad_by_shard.setdefault(record.shard, []).append(record)
    assert set(bad_by_shard) == {c[0] for c in cases}
    for relpath, row, field, reason in cases:
        assert any(reason in r.reason and (row is None or r.row == row) for r in bad_by_shard[relpath]), relpath
    # Good rows around the bad ones survive (and keep their row numbers, so ids are stable).
    ids = [g[0] for g in good]
    assert "invalid_json.jsonl:0" in ids and "invalid_json.jsonl:2" in ids
    assert "binary_non_utf8.parquet:0" in ids
    lines = sink.to_jsonl().decode().splitlines()
    assert len(lines) == len(sink.records) and json.loads(lines[0])["reason"]


def test_quarantine_mode_without_a_sink_is_a_programming_error(tmp_path):
    write_shard(tmp_path / "a.jsonl", DOCS[:1])
    corpus = Corpus(CorpusConfig(uri=str(tmp_path), on_bad_record="quarantine"))
    with pytest.raises(ValueError, match="RejectSink"):
        list(corpus.iter_batches(corpus.list_shards()[0]))


def test_read_rows_returns_requested_rows_in_order(tmp_path):
    write_shard(tmp_path / "a.parquet", DOCS)
    corpus = Corpus(CorpusConfig(uri=str(tmp_path), batch_size=2))
    batch = corpus.read_rows(corpus.list_shards()[0], [5, 0, 3])
    assert batch.texts == [DOCS[5]["text"], DOCS[0]["text"], DOCS[3]["text"]]
    with pytest.raises(CorpusError, match="rows \\[99\\] not found"):
        corpus.read_rows(corpus.list_shards()[0], [99])


def test_token_counts_use_the_configured_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    counter = TokenCounter(str(tiny_tokenizer_dir))
    texts = ["hello world", "def f(x):\n    return x + 1"]
    reference = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert counter.count(texts) == [len(reference(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counter.count([]) == []


def test_s3_listing_and_reading_with_endpoint_storage_options(s3_bucket):
    import fsspec

    opts = s3_bucket["storage_options"]
    fs = fsspec.filesystem("s3", **opts)
    bucket = s3_bucket["bucket"]
    fs.pipe_file(f"{bucket}/corpus/a.jsonl", "".join(json.dumps(d) + "\n" for d in DOCS[:3]).encode())
    fs.pipe_file(f"{bucket}/corpus/z/b.jsonl.zst",
                 zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in DOCS[3:]).encode()))
    # endpoint_url given at top level (as users write it) as well as in client_kwargs
    for storage_options in (opts, {"key": "testing", "secret": "testing", "endpoint_url": s3_bucket["endpoint_url"]}):
        corpus = Corpus(CorpusConfig(uri=f"s3://{bucket}/corpus", storage_options=storage_options))
        shards = corpus.list_shards()
        assert [s.relpath for s in shards] == ["a.jsonl", "z/b.jsonl.zst"]
        assert shards[0].uri == f"s3://{bucket}/corpus/a.jsonl" and shards[0].version
        texts = [t for _, _, t, _ in read_all(corpus)]
        assert texts == [d["text"] for d in DOCS]
