"""The benchmark's data: a mixed candidate corpus of real text plus synthetic junk, and held-out sets.

Target domain: CPython's docstrings (~1000 long docstrings, ~0.9 MB). They are the only local
real-text source with enough documents to split four ways (pydoc topics: 79 documents). They are
split by document into

* ``reference`` — what the selectors see (influence target, Rho-1 reference model, GTP target);
* ``test``      — the target test set every trained model is scored on (never seen by anything);
* ``oracle``    — unseen target text: the oracle model trains on it;
* ``corpus``    — the rest stays in the candidate corpus, among everything else.

The rest of the candidate corpus: pydoc topics, stdlib source files, text files from the
``--text-dir`` folders (README/NEWS/FAQ/*.txt, gzipped ones decompressed) and synthetic
low-quality documents. A ``general`` held-out set is drawn from the real non-target sources
(not from the synthetic junk) and kept out of the corpus.

Known overlap (realistic, stated in the results): stdlib source files contain the docstrings
verbatim, so source chunks are partly in-domain for the target.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

from selector.demo_corpus import write_shard
from selector.textsources import TextDoc, docstrings, pydoc_topics, source_files, synthetic_low_quality

TEXT_NAMES = ("readme", "news", "faq", "changes", "history", "authors", "todo", "usage")


@dataclass
class BenchData:
    corpus_dir: str
    reference_dir: str
    tokenizer_dir: str
    reference: list[str]
    test: list[str]
    oracle: list[str]
    general: list[str]
    sources: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"corpus_dir": self.corpus_dir, "reference_dir": self.reference_dir,
                "tokenizer_dir": self.tokenizer_dir, "reference": self.reference, "test": self.test,
                "oracle": self.oracle, "general": self.general, "sources": self.sources}


def _is_text_name(name: str) -> bool:
    low = name.lower()
    if low.endswith(".gz"):
        low = low[:-3]
    if "changelog" in low or "copyright" in low:  # Debian changelogs/licences: near-identical boilerplate
        return False
    return low.endswith(".txt") or low.endswith(".md") or any(low.startswith(n) for n in TEXT_NAMES)


def text_dir_documents(root: str, max_docs: int, max_chars: int, min_chars: int = 400,
                       seed: int = 0) -> list[TextDoc]:
    """Plain-text files under ``root`` (README/NEWS/FAQ/*.txt/*.md, .gz decompressed), sampled."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_text_name(f))
    random.Random(seed).shuffle(paths)
    docs: list[TextDoc] = []
    for path in paths:
        if len(docs) >= max_docs:
            break
        try:
            raw = Path(path).read_bytes()
            if path.endswith(".gz"):
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue  # binary or unreadable: not text for this corpus
        text = text.strip()[:max_chars]
        if len(text) >= min_chars and "\x00" not in text:
            docs.append(TextDoc(f"textdir:{Path(root).name}", os.path.relpath(path, root), text))
    return docs


def build_bench_data(out_dir: str | Path, text_dirs: list[str], max_docs_per_source: int = 400,
                     max_text_dir_docs: int = 300, n_low_quality: int = 240, max_chars: int = 3000,
                     splits: tuple[float, float, float] = (0.15, 0.15, 0.3), n_general: int = 120,
                     n_shards: int = 4, vocab_size: int = 2048, max_target_docs: int | None = None,
                     seed: int = 0) -> BenchData:
    """Write the corpus shards, the reference shard and a tokenizer under ``out_dir``; cached."""
    out = Path(out_dir)
    meta = out / "data.json"
    if meta.exists():
        return BenchData(**json.loads(meta.read_text()))
    rng = random.Random(seed)

    def cut(docs):  # documents capped at max_chars keep the corpus balanced and scoring cheap
        return [TextDoc(d.source, d.name, d.text[:max_chars]) for d in docs]

    target = cut(islice(docstrings(), max_target_docs))  # a cap only makes tests faster
    rng.shuffle(target)
    n = len(target)
    a, b, c = (int(n * s) for s in splits)
    reference, test, oracle, in_corpus = target[:a], target[a:a + b], target[a + b:a + b + c], target[a + b + c:]

    others: list[TextDoc] = []
    for gen in (pydoc_topics(), source_files()):
        docs = cut(gen)
        rng.shuffle(docs)
        others.extend(docs[:max_docs_per_source])
    for d in text_dirs:
        others.extend(text_dir_documents(d, max_text_dir_docs, max_chars, seed=seed))
    rng.shuffle(others)
    general, others = others[:n_general], others[n_general:]
    junk = list(synthetic_low_quality(n_low_quality, seed=seed))
    corpus = in_corpus + others + junk
    rng.shuffle(corpus)

    for i in range(n_shards):
        write_shard(out / "corpus" / f"shard-{i:03d}.parquet",
                    [{"id": f"{d.source}/{d.name}", "text": d.text, "source": d.source} for d in corpus[i::n_shards]])
    write_shard(out / "reference" / "reference.jsonl",
                [{"id": f"{d.source}/{d.name}", "text": d.text} for d in reference])
    from selector.proxy_models import train_bpe_tokenizer

    train_bpe_tokenizer([d.text for d in rng.sample(corpus, min(len(corpus), 800))], out / "tokenizer",
                        vocab_size=vocab_size)
    sources: dict[str, int] = {}
    for d in corpus:
        sources[d.source] = sources.get(d.source, 0) + 1
    data = BenchData(str(out / "corpus"), str(out / "reference"), str(out / "tokenizer"),
                     [d.text for d in reference], [d.text for d in test], [d.text for d in oracle],
                     [d.text for d in general], sources)
    meta.write_text(json.dumps(data.to_json()))
    return data
