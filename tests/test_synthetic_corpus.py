"""bench/synthetic_corpus.py: the scale benchmark's corpus is deterministic per shard, follows its
word models, and is written as Parquet shards that the corpus reader accepts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.synthetic_corpus import DOMAIN_SHARES, WordModel, fit_domain_models, shard_documents, write_corpus


@pytest.fixture(scope="module")
def models():
    return fit_domain_models(vocab=800, docs_per_domain=200)


def test_word_model_transitions_match_a_naive_count():
    texts = ["a b a c a b", "b a b"]
    m = WordModel.fit("t", texts, vocab=10)
    words = list(m.vocab)
    # naive: P(next | prev) from the pairs counted by hand
    pairs = [(p, n) for t in texts for p, n in zip(t.split(), t.split()[1:])]
    for i, w in enumerate(words):
        succ = [n for p, n in pairs if p == w]
        row = slice(m.indptr[i], m.indptr[i + 1])
        got = dict(zip(m.vocab[m.successors[row]], np.diff(np.concatenate([[i], m.cum[row]]))))
        want = {n: succ.count(n) / len(succ) for n in set(succ)}
        assert set(got) == set(want) and all(abs(got[k] - want[k]) < 1e-12 for k in want)


def test_samples_use_only_observed_transitions(models):
    m = models["docstrings"]
    rng = np.random.default_rng(0)
    texts = m.sample(np.array([50, 3, 120]), rng)
    assert [len(t.split(" ")) for t in texts] == [50, 3, 120]
    index = {w: i for i, w in enumerate(m.vocab)}
    for t in texts:
        ws = [index[w] for w in t.split(" ")]
        for a, b in zip(ws, ws[1:]):
            succ = m.successors[m.indptr[a]:m.indptr[a + 1]]
            assert b in succ or len(succ) == 0  # a word without successors restarts from the unigram


def test_a_shard_is_the_same_whatever_the_corpus_size(models, tmp_path):
    small = write_corpus(tmp_path / "small", 300, docs_per_shard=100, models=models, log=None)
    large = write_corpus(tmp_path / "large", 500, docs_per_shard=100, models=models, log=None)
    assert len(small) == 3 and len(large) == 5
    for a, b in zip(small, large):
        assert pq.read_table(a).equals(pq.read_table(b))
    table = pq.read_table(large[1])
    assert table.column_names == ["id", "text", "domain"] and table.num_rows == 100
    assert table["id"][0].as_py() == "syn/000001/0"
    assert set(table["domain"].to_pylist()) <= set(DOMAIN_SHARES)
    again = shard_documents(models, 1, 100)
    assert again["text"] == table["text"].to_pylist()
