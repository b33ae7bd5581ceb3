"""Quad's quality score: K-FAC influence of a document on the reference set.

Sign convention (higher = better):

    score(z) = grad L(z)^T H^-1 grad L_ref

where L(z) is the document's loss and L_ref the reference loss. This is the *negative* of
the classic influence of upweighting z on the reference loss (Koh & Liang 2017): a
preconditioned step on z, theta <- theta - lr H^-1 grad L(z), changes the reference loss by
about -lr * score(z). So a higher score means training on z lowers the reference loss.

Losses (see :mod:`selector.models.lm_chunks`): a document is split into chunks of at most
``chunk_tokens`` tokens; L(c) is the mean next-token loss over a chunk; a document's score
is the mean of its chunks' scores (Quad's rule). L_ref = mean over reference chunks of
L(c), so the query gradient is the mean reference-chunk gradient.

Per tracked block l (a linear map, W_l out x in, or a joint Q/K/V block):

    grad_{W_l} L(c) = sum_t g_t a_t^T                    (a_t inputs, g_t output grads)
    M_l = H_l^-1 V_l,  V_l = grad_{W_l} L_ref             (K-FAC inverse; selector.gradients.kfac)
    score(c) = sum_l <grad_{W_l} L(c), M_l>_F = sum_l sum_t g_t^T M_l a_t

The last line is computed from the a_t, g_t that hooks capture in one forward+backward of a
batch: per token, (g_t^T M_l) . a_t, i.e. one (B T x out) @ (out x in) matmul per block, the
same cost as the block's forward matmul; no per-document gradient is ever formed.

Normalised (cosine) variant: cos(c) = score(c) / (||grad L(c)|| ||M||), with the per-chunk
gradient norm from Gram matrices, again without forming the gradient:

    ||sum_t g_t a_t^T||_F^2 = sum_{t,s} (g_t . g_s)(a_t . a_s) = sum((G G^T) o (A A^T)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from selector.config_base import StrictModel
from selector.errors import StageError
from selector.gradients.kfac import KFACConfig, KFACFactors, _read_bytes, _safetensors_metadata, _write_bytes
from selector.models.lm_chunks import activation_grads_only, batches, chunk_losses, pad_id_of, tokenize_chunks
from selector.gradients.projection import ProjectionConfig
from selector.gradients.tracked_layers import TrackedBlock, TrackedLayersConfig, capture


class InfluenceConfig(StrictModel):
    """The ``influence`` section of a job config."""

    layers: TrackedLayersConfig = TrackedLayersConfig()
    kfac: KFACConfig = KFACConfig()
    projection: ProjectionConfig = ProjectionConfig()
    chunk_tokens: int = 1024
    max_chunks_per_doc: int | None = None
    batch_size: int = 8
    normalise: bool = False


@dataclass
class InfluenceQuery:
    """Per-block reference gradient V_l and its preconditioned form M_l = H_l^-1 V_l."""

    blocks: list[str]
    grad: dict[str, torch.Tensor]     # V_l, fp64
    precond: dict[str, torch.Tensor]  # M_l, fp64
    n_chunks: int
    n_tokens: int

    @property
    def precond_norm(self) -> float:
        return float(sum(float((m ** 2).sum()) for m in self.precond.values()) ** 0.5)

    def save(self, uri: str, storage_options: dict | None = None) -> None:
        from safetensors.torch import save as st_save

        tensors = {}
        for i, k in enumerate(self.blocks):
            tensors[f"{i}.grad"] = self.grad[k].detach().cpu().contiguous()
            tensors[f"{i}.precond"] = self.precond[k].detach().cpu().contiguous()
        meta = {"format": "thresher-influence-query-v1", "blocks": json.dumps(self.blocks),
                "n_chunks": str(self.n_chunks), "n_tokens": str(self.n_tokens)}
        _write_bytes(uri, st_save(tensors, metadata=meta), storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None) -> "InfluenceQuery":
        from safetensors.torch import load as st_load

        data = _read_bytes(uri, storage_options)
        meta = _safetensors_metadata(data)
        if meta.get("format") != "thresher-influence-query-v1":
            raise StageError(f"{uri} is not a Thresher influence query file (format={meta.get('format')!r})")
        t = st_load(data)
        blocks = json.loads(meta["blocks"])
        return cls(blocks, {k: t[f"{i}.grad"] for i, k in enumerate(blocks)},
                   {k: t[f"{i}.precond"] for i, k in enumerate(blocks)}, int(meta["n_chunks"]), int(meta["n_tokens"]))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_blocks(blocks: list[TrackedBlock], names: list[str], what: str) -> None:
    missing = [b.name for b in blocks if b.name not in names]
    if missing:
        raise StageError(f"{what} has no entry for tracked block(s) {missing}; it was built for {names}")


def reference_gradient(model, tokenizer, reference_texts: Sequence[str], blocks: list[TrackedBlock], *,
                       chunk_tokens: int = 1024, batch_size: int = 8,
                       max_chunks_per_doc: int | None = None) -> tuple[dict[str, torch.Tensor], int, int]:
    """V_l = mean over reference chunks of grad_{W_l} L(c), from hooks. Returns (V, n_chunks, n_tokens)."""
    model.eval()
    device = _device(model)
    chunks = tokenize_chunks(tokenizer, reference_texts, chunk_tokens, max_chunks_per_doc)
    n_tokens = sum(len(c.ids) for c in chunks)
    if n_tokens < chunk_tokens:
        raise StageError(
            f"reference set is too short: {len(reference_texts)} document(s), {n_tokens} usable token(s), fewer than "
            f"one chunk (influence.chunk_tokens={chunk_tokens}); the query gradient would be mostly noise. "
            f"Add reference documents or lower influence.chunk_tokens")
    V = {b.name: torch.zeros(b.out_features, b.in_aug, dtype=torch.float64, device=device) for b in blocks}
    with activation_grads_only(model), capture(blocks):
        for batch in batches(chunks, batch_size, pad_id_of(tokenizer), device):
            chunk_losses(model, batch).sum().backward()
            mask = batch.token_mask.unsqueeze(-1).float()
            for b in blocks:
                V[b.name] += torch.einsum("bto,bti->oi", b.g.float() * mask, b.a_aug().float()).double()
    return {k: (v / len(chunks)).cpu() for k, v in V.items()}, len(chunks), n_tokens


def compute_query(model, tokenizer, reference_texts: Sequence[str], factors: KFACFactors,
                  blocks: list[TrackedBlock], config: InfluenceConfig | None = None) -> InfluenceQuery:
    """The query: M_l = H_l^-1 (mean reference gradient)_l for every tracked block."""
    config = config or InfluenceConfig()
    _check_blocks(blocks, factors.blocks, "K-FAC factors")
    V, n_chunks, n_tokens = reference_gradient(model, tokenizer, reference_texts, blocks,
                                               chunk_tokens=config.chunk_tokens, batch_size=config.batch_size,
                                               max_chunks_per_doc=config.max_chunks_per_doc)
    M = {k: factors.precondition(k, v).cpu() for k, v in V.items()}
    return InfluenceQuery([b.name for b in blocks], V, M, n_chunks, n_tokens)


@dataclass
class InfluenceScores:
    """Per-document results (length n_docs). Documents with no scoreable chunk score 0 (zero gradient)."""

    score: np.ndarray        # mean over chunks of grad L(c)^T H^-1 grad L_ref
    cosine: np.ndarray | None  # mean over chunks of the cosine variant (when normalise)
    grad_norm: np.ndarray | None  # mean over chunks of ||grad L(c)|| over tracked blocks
    n_chunks: np.ndarray


def score_batch(model, batch, blocks: list[TrackedBlock], M: dict[str, torch.Tensor],
                normalise: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward+backward: per-chunk scores sum_l sum_t g_t^T M_l a_t (and squared grad norms).

    ``M`` holds fp32 matrices (out x in_aug) on the model's device, or stacks (K, out, in_aug)
    for K queries at once (scores then have shape (B, K)). Must run inside
    ``capture(blocks)`` and ``activation_grads_only(model)``.
    """
    chunk_losses(model, batch).sum().backward()
    mask = batch.token_mask.float()
    B = mask.shape[0]
    score = None
    sq = torch.zeros(B, device=mask.device) if normalise else None
    for b in blocks:
        a = b.a_aug().float() * mask.unsqueeze(-1)
        g = b.g.float()
        m = M[b.name]
        if m.dim() == 2:
            s = ((g @ m) * a).sum(dim=(1, 2))
        else:  # several queries: (B,T,out) x (K,out,in) -> (B,K)
            s = torch.einsum("bto,koi,bti->bk", g, m, a)
        score = s if score is None else score + s
        if normalise:
            sq += ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
    return score, sq


def score_documents(model, tokenizer, texts: Sequence[str], query: InfluenceQuery, blocks: list[TrackedBlock],
                    config: InfluenceConfig | None = None, normalise: bool | None = None) -> InfluenceScores:
    """Influence scores of ``texts`` on the reference set (higher = lowers the reference loss)."""
    config = config or InfluenceConfig()
    normalise = config.normalise if normalise is None else normalise
    _check_blocks(blocks, query.blocks, "influence query")
    model.eval()
    device = _device(model)
    M = {b.name: query.precond[b.name].to(device=device, dtype=torch.float32) for b in blocks}
    chunks = tokenize_chunks(tokenizer, texts, config.chunk_tokens, config.max_chunks_per_doc)
    chunk_score = np.zeros(len(chunks))
    chunk_sq = np.zeros(len(chunks))
    with activation_grads_only(model), capture(blocks):
        for batch in batches(chunks, config.batch_size, pad_id_of(tokenizer), device):
            s, sq = score_batch(model, batch, blocks, M, normalise)
            chunk_score[batch.chunk_index] = s.detach().double().cpu().numpy()
            if normalise:
                chunk_sq[batch.chunk_index] = sq.detach().double().cpu().numpy()
    doc_of = np.array([c.doc for c in chunks], dtype=np.int64)
    n = np.bincount(doc_of, minlength=len(texts)).astype(np.int64)
    denom = np.maximum(n, 1)
    score = np.bincount(doc_of, weights=chunk_score, minlength=len(texts)) / denom
    cosine = grad_norm = None
    if normalise:
        norms = np.sqrt(np.maximum(chunk_sq, 0.0))
        qn = query.precond_norm
        cos = np.where(norms > 0, chunk_score / np.maximum(norms, 1e-300) / max(qn, 1e-300), 0.0)
        cosine = np.bincount(doc_of, weights=cos, minlength=len(texts)) / denom
        grad_norm = np.bincount(doc_of, weights=norms, minlength=len(texts)) / denom
    return InfluenceScores(score, cosine, grad_norm, n)
