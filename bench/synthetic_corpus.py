"""A synthetic corpus of any size for the scale benchmark: real-looking text from small word models.

Each domain is a word bigram model fitted on real text that ships with CPython (stdlib docstrings,
the language-reference topics, stdlib source; see selector.demo.textsources):

    P(w_t | w_{t-1}) = c(w_{t-1}, w_t) / c(w_{t-1}),        P(w_1) = c(w_1) / N

over the ``vocab`` most frequent words of the domain (rarer words are dropped from the training
stream, so every transition is between kept words). A word with no observed successor restarts
from the unigram distribution. Document lengths are log-normal (median ``median_words``, clipped to
``[min_words, max_words]``), domains are drawn with fixed shares, and every shard is generated from
its own seed, so shard ``i`` of a corpus is the same whatever the corpus size and shards can be
written in parallel or resumed one at a time.

Sampling is vectorised over the documents of a shard (one numpy step per word position): each
word's successors sit in one row of a CSR table whose cumulative probabilities are offset by the
row number, so ``searchsorted(cum, row + u)`` draws the next word of every document at once.

Shards are Parquet (``id``, ``text``, ``domain``), ``docs_per_shard`` documents each, written as
``shard-<i>.parquet`` through a ``.partial`` file; a shard already on disk is kept.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_']*|[0-9]+|[.,;:()\[\]{}=+\-*/<>!?\"]")
DOMAIN_SHARES = {"docstrings": 0.5, "reference": 0.2, "source": 0.3}


@dataclass
class WordModel:
    """A bigram word model: ``vocab`` words, unigram CDF, successor CSR with row-offset CDF."""

    domain: str
    vocab: np.ndarray          # (V,) object: the words
    unigram_cdf: np.ndarray    # (V,) float64
    indptr: np.ndarray         # (V + 1,) int64: successors of word i at [indptr[i], indptr[i+1])
    successors: np.ndarray     # (E,) int32
    cum: np.ndarray            # (E,) float64: i + cumulative P(successor | i) within row i

    @classmethod
    def fit(cls, domain: str, texts, vocab: int = 4000) -> "WordModel":
        docs = [WORD.findall(t) for t in texts]
        counts_all = Counter(w for d in docs for w in d)
        if sum(counts_all.values()) < 2:
            raise ValueError(f"domain {domain}: not enough text to fit a word model")
        kept = [w for w, _ in counts_all.most_common(vocab)]
        index = {w: i for i, w in enumerate(kept)}
        streams = [np.array([index[w] for w in d if w in index], dtype=np.int64) for d in docs]
        v = len(kept)
        uni = np.bincount(np.concatenate(streams), minlength=v).astype(np.float64)
        # pairs inside each text only: no transition across a document boundary
        pairs = np.concatenate([s[:-1] * v + s[1:] for s in streams if len(s) > 1] or [np.zeros(0, np.int64)])
        codes, counts = np.unique(pairs, return_counts=True)
        rows, cols = codes // v, codes % v
        indptr = np.zeros(v + 1, dtype=np.int64)
        np.add.at(indptr, rows + 1, 1)
        indptr = np.cumsum(indptr)
        row_tot = np.bincount(rows, weights=counts, minlength=v)
        within = counts / row_tot[rows]
        # cumulative within each row (edges are sorted by row because codes are), offset by the row id
        csum = np.cumsum(within)
        row_start = np.concatenate([[0.0], csum])[indptr[rows]]
        cum = rows + (csum - row_start)
        last = indptr[1:][np.diff(indptr) > 0] - 1
        cum[last] = rows[last] + 1.0  # a row ends at exactly row + 1, whatever the float rounding
        return cls(domain, np.array(kept, dtype=object), np.cumsum(uni) / uni.sum(), indptr,
                   cols.astype(np.int32), cum)

    def sample(self, lengths: np.ndarray, rng: np.random.Generator) -> list[str]:
        """One text per entry of ``lengths`` (words)."""
        n, longest = len(lengths), int(lengths.max(initial=0))
        out = np.empty((n, longest), dtype=np.int64)
        word = np.searchsorted(self.unigram_cdf, rng.random(n), side="right").clip(0, len(self.vocab) - 1)
        has_next = np.diff(self.indptr) > 0
        for t in range(longest):
            out[:, t] = word
            u = rng.random(n)
            nxt = np.searchsorted(self.cum, word + u, side="right")
            nxt = self.successors[np.minimum(nxt, len(self.successors) - 1)]
            restart = ~has_next[word]
            if restart.any():
                nxt[restart] = np.searchsorted(self.unigram_cdf, rng.random(int(restart.sum())),
                                               side="right").clip(0, len(self.vocab) - 1)
            word = nxt
        words = self.vocab[out]
        return [" ".join(words[i, :lengths[i]]) for i in range(n)]


def fit_domain_models(vocab: int = 4000, docs_per_domain: int = 1500) -> dict[str, WordModel]:
    """One word model per domain of :data:`DOMAIN_SHARES`, from CPython's own text."""
    from selector.demo.textsources import docstrings, pydoc_topics, source_files

    sources = {"docstrings": docstrings, "reference": pydoc_topics, "source": source_files}
    return {name: WordModel.fit(name, [d.text for d in islice(sources[name](), docs_per_domain)], vocab)
            for name in DOMAIN_SHARES}


def shard_documents(models: dict[str, WordModel], shard: int, n_docs: int, seed: int = 0,
                    median_words: int = 120, min_words: int = 8, max_words: int = 1200) -> dict[str, list]:
    """The columns of shard ``shard``: ``id`` (``syn/<shard>/<row>``), ``text``, ``domain``."""
    rng = np.random.default_rng([seed, shard])
    names = list(DOMAIN_SHARES)
    domain = rng.choice(len(names), size=n_docs, p=np.array([DOMAIN_SHARES[n] for n in names]))
    lengths = np.clip(np.exp(rng.normal(np.log(median_words), 0.8, n_docs)), min_words, max_words).astype(np.int64)
    texts: list[str | None] = [None] * n_docs
    for d, name in enumerate(names):
        rows = np.flatnonzero(domain == d)
        for row, text in zip(rows, models[name].sample(lengths[rows], rng)):
            texts[row] = text
    return {"id": [f"syn/{shard:06d}/{r}" for r in range(n_docs)], "text": texts,
            "domain": [names[d] for d in domain]}


def write_corpus(out_dir: str | Path, n_docs: int, docs_per_shard: int = 10_000, seed: int = 0,
                 models: dict[str, WordModel] | None = None, log=print) -> list[Path]:
    """Write ``ceil(n_docs / docs_per_shard)`` Parquet shards (the last one may be smaller); returns them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-n_docs // docs_per_shard)
    paths = []
    for i in range(n_shards):
        path = out / f"shard-{i:06d}.parquet"
        paths.append(path)
        if path.exists():
            continue
        models = models or fit_domain_models()
        n = min(docs_per_shard, n_docs - i * docs_per_shard)
        partial = path.with_suffix(".parquet.partial")
        pq.write_table(pa.table(shard_documents(models, i, n, seed)), partial, compression="zstd")
        partial.rename(path)
        if log and (i + 1) % max(1, n_shards // 10) == 0:
            log(f"synthetic corpus: {i + 1}/{n_shards} shards")
    return paths
