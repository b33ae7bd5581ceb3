"""Materialize a selection manifest: the selected documents as training-ready Parquet shards.

``thresher materialize MANIFEST OUT`` reads a committed manifest, fetches each selected
document's text from its corpus shard (by ``shard`` URI and ``row``), tokenizes it with the
tokenizer named in ``manifest.json`` and writes ``OUT/part-NNNNN.parquet`` with columns

    doc_id, text, input_ids (list<int32>), loss_mask (list<bool>), n_tokens, n_kept,
    method, score, weight, cluster, round

``loss_mask[i]`` says whether the trainer takes the loss of predicting ``input_ids[i]``
(bit 0 is always False: token 0 has no prediction, see :mod:`selector.rho.token_losses`). Where
the manifest has no token mask (no ``mask`` stage ran) every predicted token is kept. A
trainer's Rho-1 loss for a batch is then

    labels = where(loss_mask, input_ids, -100);  loss = CE(model(input_ids), labels)

i.e. the mean over kept tokens; masked tokens remain in the input as context.

Consistency checks: a document whose text no longer yields the manifest's ``n_tokens`` (the
shard changed, or another tokenizer is used) is an error, as is a tokenizer whose fingerprint
differs from the one recorded. ``OUT/_SUCCESS`` is written last, after
``OUT/_materialize.json`` (source manifest, tokenizer, counts; the leading underscore makes
directory readers such as pyarrow skip it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

import numpy as np
import pyarrow as pa

from selector.data.corpus import Corpus, CorpusConfig
from selector.errors import CorpusError, ManifestError
from selector.data.workdir import atomic_write_bytes, open_fs, table_to_parquet_bytes

OUTPUT_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
    pa.field("n_tokens", pa.int64(), nullable=False),
    pa.field("n_kept", pa.int64(), nullable=False),
    pa.field("method", pa.string()),
    pa.field("score", pa.float64()),
    pa.field("weight", pa.float64()),
    pa.field("cluster", pa.int32()),
    pa.field("round", pa.int32()),
])


def _tokenizer_info(summary: dict) -> tuple[str | None, str | None]:
    tok = summary.get("tokenizer")
    if isinstance(tok, dict):
        return tok.get("path"), tok.get("fingerprint")
    return (tok if isinstance(tok, str) else None), None


def _add_bos(summary: dict) -> bool:
    return bool((summary.get("stages") or {}).get("mask", {}).get("add_bos", False))


def materialize(manifest_uri: str, out_uri: str, storage_options: dict | None = None,
                corpus_storage_options: dict | None = None, out_storage_options: dict | None = None,
                tokenizer_path: str | None = None, corpus_config: CorpusConfig | None = None,
                rows_per_part: int = 50_000, progress: Callable[[int], None] | None = None) -> dict:
    """Write the manifest's documents with ``input_ids`` and ``loss_mask`` to ``out_uri``.

    ``corpus_storage_options`` replaces the (redacted) storage options recorded in the
    manifest; ``tokenizer_path`` / ``corpus_config`` override what ``manifest.json`` names.
    Returns the summary also written to ``OUT/_materialize.json``.
    """
    from selector.data.manifest import read_manifest
    from selector.models.loading import load_tokenizer, tokenizer_fingerprint
    from selector.rho.excess_loss import unpack_mask
    from selector.rho.token_losses import tokenize

    manifest = read_manifest(manifest_uri, storage_options)
    summary = manifest.summary
    path, recorded_fp = _tokenizer_info(summary)
    path = tokenizer_path or path
    if not path:
        raise ManifestError(f"manifest {manifest_uri} names no tokenizer; pass tokenizer_path")
    tokenizer = load_tokenizer(path)
    if recorded_fp and tokenizer_fingerprint(tokenizer) != recorded_fp:
        raise ManifestError(f"tokenizer {path!r} differs from the one the manifest was made with "
                            f"(fingerprint {tokenizer_fingerprint(tokenizer)} != {recorded_fp})")
    if corpus_config is None:
        section = (summary.get("config") or {}).get("corpus")
        if not section:
            raise ManifestError(f"manifest {manifest_uri} has no corpus config; pass corpus_config")
        section = dict(section)
        if corpus_storage_options is not None:
            section["storage_options"] = corpus_storage_options
        corpus_config = CorpusConfig(**section)
    corpus = Corpus(corpus_config)
    shards = {s.uri: s for s in corpus.list_shards()}
    recorded = {s["uri"]: s.get("version") for s in (summary.get("corpus") or {}).get("shards", [])}

    t = manifest.table
    cols = {name: t[name].to_pylist() for name in t.column_names}
    by_shard: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(cols["shard"]):
        by_shard[uri].append(i)

    out_fs, out_path = open_fs(out_uri, out_storage_options)
    if out_fs.exists(f"{out_path}/_SUCCESS"):
        raise ManifestError(f"{out_uri} already holds a materialized selection; choose a new OUT")
    parts: list[dict] = []
    buffer: dict[str, list] = {f.name: [] for f in OUTPUT_SCHEMA}
    done = kept_total = token_total = 0

    def flush():
        nonlocal buffer
        if not buffer["doc_id"]:
            return
        table = pa.Table.from_pydict(buffer, schema=OUTPUT_SCHEMA)
        name = f"part-{len(parts):05d}.parquet"
        atomic_write_bytes(out_fs, f"{out_path}/{name}", table_to_parquet_bytes(table))
        parts.append({"name": name, "rows": table.num_rows})
        buffer = {f.name: [] for f in OUTPUT_SCHEMA}

    for uri in sorted(by_shard):
        if uri not in shards:
            raise CorpusError(f"shard {uri} of manifest {manifest_uri} is not in corpus {corpus_config.uri}")
        shard = shards[uri]
        if recorded.get(uri) and shard.version and recorded[uri] != shard.version:
            raise CorpusError(f"shard {uri} changed since the selection (version {shard.version} != "
                              f"{recorded[uri]}); re-run the selection")
        idx = by_shard[uri]
        batch = corpus.read_rows(shard, [cols["row"][i] for i in idx])
        ids_list = tokenize(tokenizer, batch.texts, _add_bos(summary))
        for i, doc_id, text, ids in zip(idx, batch.doc_ids, batch.texts, ids_list):
            if doc_id != cols["doc_id"][i]:
                raise CorpusError(f"shard {uri} row {cols['row'][i]} holds {doc_id!r}, manifest says "
                                  f"{cols['doc_id'][i]!r}")
            n = cols["n_tokens"][i]
            if len(ids) != n:
                raise ManifestError(f"document {doc_id!r}: {len(ids)} tokens now, {n} in the manifest "
                                    "(changed text or a different tokenizer)")
            packed = cols.get("token_mask", [None] * len(t))[i]
            if packed is None:
                mask = np.ones(n, dtype=bool)
                mask[:1] = False
            else:
                mask = unpack_mask(packed, n)
            buffer["doc_id"].append(doc_id)
            buffer["text"].append(text)
            buffer["input_ids"].append(np.asarray(ids, dtype=np.int32))
            buffer["loss_mask"].append(mask)
            buffer["n_tokens"].append(n)
            buffer["n_kept"].append(int(mask.sum()))
            for c in ("method", "score", "weight", "cluster", "round"):
                buffer[c].append(cols[c][i] if c in cols else None)
            kept_total += int(mask.sum())
            token_total += n
            done += 1
            if len(buffer["doc_id"]) >= rows_per_part:
                flush()
        if progress:
            progress(done)
    flush()
    result = {"manifest": manifest_uri, "run_id": summary.get("run_id"), "tokenizer": path,
              "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "add_bos": _add_bos(summary),
              "documents": done, "tokens": token_total, "loss_tokens": kept_total, "parts": parts,
              "columns": OUTPUT_SCHEMA.names}
    atomic_write_bytes(out_fs, f"{out_path}/_materialize.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(out_fs, f"{out_path}/_SUCCESS", b"")
    return result
