"""The benchmark's data: a mixed candidate corpus of real text plus synthetic junk, and held-out sets.

Target domain (``target``): one real source, split by document into

* ``reference`` — what the selectors see (influence target, Rho-1 reference model, GTP target);
* ``test``      — the target test set every trained model is scored on (never seen by anything);
* ``oracle``    — unseen target text: the oracle model trains on it;
* ``corpus``    — the rest stays in the candidate corpus, among everything else.

Targets: ``docstrings`` (CPython's long docstrings, ~1000 documents) and ``man_pages`` (rendered
manual pages of sections 2, 3, 5, 7 and 8: system calls, C library, file formats, overviews,
admin commands). The other real sources are pydoc topics, stdlib source files, the other of the two
targets, and text files from the ``--text-dir`` folders (README/NEWS/FAQ/*.txt, gzipped ones
decompressed); synthetic low-quality documents are added.

Held-out sets outside the target: from every non-target *real* source a ``broad`` set of
``n_broad`` documents per domain is kept out of the corpus; the benchmark reports the mean of the
per-domain losses (the "broad" loss: what a selection costs or gains outside the target), so one big
domain does not dominate it. ``general`` is their union (the pooled loss, kept for continuity).

Known overlap (realistic, stated in the results): stdlib source files contain the docstrings
verbatim, so source chunks are partly in-domain for the docstrings target.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

from selector.demo.corpus import write_shard
from selector.demo.textsources import (TextDoc, docstrings, man_pages, pydoc_topics, source_files,
                                  synthetic_low_quality)

TEXT_NAMES = ("readme", "news", "faq", "changes", "history", "authors", "todo", "usage")


TARGETS = ("docstrings", "man_pages")


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
    broad: dict[str, list[str]] = field(default_factory=dict)  # held-out domain -> documents
    target: str = "docstrings"

    def to_json(self) -> dict:
        return {"corpus_dir": self.corpus_dir, "reference_dir": self.reference_dir,
                "tokenizer_dir": self.tokenizer_dir, "reference": self.reference, "test": self.test,
                "oracle": self.oracle, "general": self.general, "sources": self.sources, "broad": self.broad,
                "target": self.target}


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
                     seed: int = 0, target: str = "docstrings", max_target_pool: int = 1000,
                     n_broad: int = 30) -> BenchData:
    """Write the corpus shards, the reference shard and a tokenizer under ``out_dir``; cached.

    ``n_general`` is the size of the pooled held-out set; with ``n_broad`` per domain drawn first,
    the pooled set is their union (``n_general`` then only matters when ``n_broad`` is 0).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    out = Path(out_dir)
    meta = out / "data.json"
    if meta.exists():
        return BenchData(**json.loads(meta.read_text()))
    rng = random.Random(seed)

    def cut(docs):  # documents capped at max_chars keep the corpus balanced and scoring cheap
        return [TextDoc(d.source, d.name, d.text[:max_chars]) for d in docs]

    def gen(name: str, cap: int):
        if name == "docstrings":
            return cut(islice(docstrings(), cap))
        if name == "man_pages":
            return cut(man_pages(max_docs=cap, seed=seed))
        raise AssertionError(name)

    target_docs = gen(target, max_target_docs or max_target_pool)  # a cap only makes tests faster
    if len(target_docs) < 40:
        raise RuntimeError(f"target {target!r}: only {len(target_docs)} documents here (man installed?)")
    rng.shuffle(target_docs)
    n = len(target_docs)
    a, b, c = (int(n * s) for s in splits)
    reference, test = target_docs[:a], target_docs[a:a + b]
    oracle, in_corpus = target_docs[a + b:a + b + c], target_docs[a + b + c:]

    domains: dict[str, list[TextDoc]] = {}
    other = [t for t in TARGETS if t != target][0]
    for name, docs in (("pydoc_topics", cut(pydoc_topics())), ("source_files", cut(source_files())),
                       (other, gen(other, max_docs_per_source * 3))):
        rng.shuffle(docs)
        domains[name] = docs[:max_docs_per_source + n_broad]
    for d in text_dirs:
        docs = text_dir_documents(d, max_text_dir_docs + n_broad, max_chars, seed=seed)
        domains.setdefault(docs[0].source if docs else f"textdir:{Path(d).name}", []).extend(docs)
    broad: dict[str, list[str]] = {}
    others: list[TextDoc] = []
    general: list[TextDoc] = []
    for name, docs in domains.items():
        # a small domain (pydoc topics: 79) gives at most a fifth of itself to the held-out set
        k = min(n_broad, len(docs) // 5)
        if k:
            broad[name] = [x.text for x in docs[:k]]
            general.extend(docs[:k])
        others.extend(docs[k:])
    rng.shuffle(others)
    if not n_broad:
        general, others = others[:n_general], others[n_general:]
    junk = list(synthetic_low_quality(n_low_quality, seed=seed))
    corpus = in_corpus + others + junk
    rng.shuffle(corpus)

    for i in range(n_shards):
        write_shard(out / "corpus" / f"shard-{i:03d}.parquet",
                    [{"id": f"{d.source}/{d.name}", "text": d.text, "source": d.source} for d in corpus[i::n_shards]])
    write_shard(out / "reference" / "reference.jsonl",
                [{"id": f"{d.source}/{d.name}", "text": d.text} for d in reference])
    from selector.demo.proxy_models import train_bpe_tokenizer

    train_bpe_tokenizer([d.text for d in rng.sample(corpus, min(len(corpus), 800))], out / "tokenizer",
                        vocab_size=vocab_size)
    sources: dict[str, int] = {}
    for d in corpus:
        sources[d.source] = sources.get(d.source, 0) + 1
    data = BenchData(str(out / "corpus"), str(out / "reference"), str(out / "tokenizer"),
                     [d.text for d in reference], [d.text for d in test], [d.text for d in oracle],
                     [d.text for d in general], sources, broad, target)
    meta.write_text(json.dumps(data.to_json()))
    return data
