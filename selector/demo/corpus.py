"""The demo corpus: real CPython text plus synthetic low-quality documents, as mixed shards.

Shards are written in every supported format (Parquet, .jsonl, .jsonl.gz, .jsonl.zst) so the
demo exercises the whole reader. A byte-level BPE tokenizer is trained on a sample of the
corpus and saved beside it, so the demo needs nothing but a Python install.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selector.demo.proxy_models import train_bpe_tokenizer
from selector.demo.textsources import demo_documents

FORMATS = ("parquet", "jsonl", "jsonl.gz", "jsonl.zst")


def write_shard(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), tmp)
    else:
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        if path.name.endswith(".gz"):
            payload = gzip.compress(payload)
        elif path.name.endswith(".zst"):
            import zstandard

            payload = zstandard.ZstdCompressor().compress(payload)
        tmp.write_bytes(payload)
    tmp.replace(path)


def build_demo_corpus(out_dir: str | Path, n_shards: int = 8, max_docs_per_source: int | None = 600,
                      n_low_quality: int = 300, vocab_size: int = 2048, reference_fraction: float = 0.5,
                      seed: int = 0) -> dict:
    """Write ``out_dir/corpus/*`` shards, ``out_dir/reference/`` and ``out_dir/tokenizer``.

    The target domain is the Python language reference (``pydoc_data`` topics): a
    ``reference_fraction`` of those topics is held out as the reference set (not in the corpus),
    the rest stays in the corpus among everything else.
    """
    out = Path(out_dir)
    docs = demo_documents(max_docs_per_source=max_docs_per_source, n_low_quality=n_low_quality, seed=seed)
    rng = random.Random(seed)
    rng.shuffle(docs)
    topics = [d for d in docs if d.source == "pydoc_topics"]
    held_out = {d.name for d in topics[: int(len(topics) * reference_fraction)]}
    write_shard(out / "reference" / "reference.jsonl",
                [{"id": f"{d.source}/{d.name}", "text": d.text} for d in topics if d.name in held_out])
    docs = [d for d in docs if not (d.source == "pydoc_topics" and d.name in held_out)]
    corpus_dir = out / "corpus"
    for i in range(n_shards):
        part = docs[i::n_shards]
        records = [{"id": f"{d.source}/{d.name}", "text": d.text, "source": d.source} for d in part]
        write_shard(corpus_dir / f"shard-{i:03d}.{FORMATS[i % len(FORMATS)]}", records)
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        sample = [d.text for d in rng.sample(docs, min(len(docs), 800))]
        train_bpe_tokenizer(sample, tokenizer_dir, vocab_size=vocab_size)
    sources: dict[str, int] = {}
    for d in docs:
        sources[d.source] = sources.get(d.source, 0) + 1
    return {"corpus": str(corpus_dir), "tokenizer": str(tokenizer_dir), "reference": str(out / "reference"),
            "documents": len(docs), "reference_documents": len(held_out), "sources": sources}


def build_demo_proxy(out_dir: str | Path, tokenizer_dir: str | Path, corpus_dir: str | Path, steps: int = 150,
                     seed: int = 0, progress: bool = True) -> str:
    """A tiny Llama trained briefly on the demo corpus: Quad's proxy model for influence.

    The same code path as ``thresher models train`` (:func:`selector.models.training.train_models_from_corpus`);
    returns the proxy's folder (a rerun reuses it)."""
    from selector.data.corpus import CorpusConfig
    from selector.models.training import ModelTrainingConfig, train_models_from_corpus

    settings = ModelTrainingConfig(steps=steps, checkpoints=1, corpus_documents=600, seed=seed)
    return train_models_from_corpus(tokenizer_dir, CorpusConfig(uri=str(corpus_dir)), None, out_dir, settings,
                                    progress=progress, log=lambda m: None).proxy
