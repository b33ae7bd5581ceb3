"""Rho-1 selective language modeling: excess loss, top-k% token masks, document scores.

Rho-1 (Lin et al., NeurIPS 2024, "Not All Tokens Are What You Need") scores each token by
its *excess loss*

    L_delta(x_i) = L_theta(x_i) - L_ref(x_i)

where ``L_theta`` is the loss under the training model (the current checkpoint) and ``L_ref``
under a reference model trained on high-quality data. Training then uses only the top
``k%`` tokens by ``L_delta`` (the paper keeps 60-70%):

    L_SLM(theta) = -1 / (N * k%) * sum_i I_k%(x_i) * log P(x_i | x_<i; theta)

where ``I_k%(x_i) = 1`` iff ``x_i`` is among the top ``k%`` tokens. Masked tokens stay in
the context; only their loss is dropped.

Modes
-----
* ``global`` exact (:func:`topk_masks_exact`): one ranking over every token of every
  selected document; keeps exactly ``round(k * N)`` tokens (ties broken by position).
* ``global`` sketched (:class:`ExcessHistogram`): for the distributed case each worker
  builds a fixed-bin histogram of its excess losses; histograms merge by addition. The
  threshold is the lower edge of bin ``b*``, the highest bin such that the tokens in bins
  ``>= b*`` number at least ``k * N``; tokens whose bin is ``>= b*`` are kept. **Error bound**:
  ``k*N <= kept <= k*N + count(b*)``, i.e. the kept fraction exceeds ``k`` by at most the
  mass of one bin. With range ``[lo, hi)`` and ``B`` bins a bin is ``(hi-lo)/B`` wide
  (default 1e-3 nats); values outside the range fall into the two end bins, which
  the bound then covers too (:meth:`ExcessHistogram.threshold` reports the realised bound).
* ``per_batch`` (the paper's mode, :func:`topk_masks_per_batch`): documents are grouped in
  order into batches of about ``batch_tokens`` scored tokens and the top ``k%`` is exact
  within each batch.

Mask format
-----------
One bit per input id (``n_tokens`` bits, bit ``i`` = keep the loss of token ``i``; bit 0 is
always 0 because token 0 has no prediction, see :mod:`selector.rho.token_losses`), packed with
``np.packbits(mask, bitorder='little')``: bit ``i`` is bit ``i % 8`` (least significant
first) of byte ``i // 8``; trailing pad bits are 0. Unpack with :func:`unpack_mask` and the
token count.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from selector.config_base import StrictModel
from selector.data.manifest import pack_mask, unpack_mask  # noqa: F401  (the manifest's mask format)
from selector.errors import StageError


class RhoConfig(StrictModel):
    """Reference/training models and token-selection settings (the ``rho`` section)."""

    reference_model: str = Field(description="save_pretrained folder (path or URI) of the reference model.")
    training_model: str = Field(description="save_pretrained folder of the training model (current checkpoint).")
    max_length: int = Field(1024, ge=2, description="Tokens per model window.")
    overlap: int = Field(128, ge=1, description="Context-only tokens carried into the next window.")
    batch_tokens: int = Field(16384, ge=2, description="Padded tokens per forward batch.")
    add_bos: bool = Field(False, description="Prepend the BOS id to every document.")
    keep_ratio: float = Field(0.6, gt=0.0, le=1.0, description="Fraction k of tokens kept (paper: 0.6-0.7).")
    mask_mode: Literal["global", "per_batch"] = "global"
    global_method: Literal["exact", "sketch"] = Field(
        "sketch", description="Global threshold: exact ranking on the driver, or merged histograms.")
    sketch_bins: int = Field(40_000, ge=16)
    sketch_range: tuple[float, float] = Field((-20.0, 20.0), description="Excess-loss range of the histogram.")
    per_batch_tokens: int = Field(1 << 20, ge=1, description="Scored tokens per batch in per_batch mode.")
    num_workers: int | None = Field(None, ge=1, description="Loss actors; default: GPUs, else 1.")
    worker_num_cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.overlap >= self.max_length:
            raise ValueError(f"rho.overlap ({self.overlap}) must be < rho.max_length ({self.max_length})")
        if self.batch_tokens < self.max_length:
            raise ValueError(f"rho.batch_tokens ({self.batch_tokens}) must be >= rho.max_length ({self.max_length})")
        if not self.sketch_range[0] < self.sketch_range[1]:
            raise ValueError("rho.sketch_range must be (low, high) with low < high")
        return self


# --------------------------------------------------------------------------- scores


def excess_losses(train: Sequence[np.ndarray | None], ref: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
    """``L_train - L_ref`` per document (``None`` stays ``None``)."""
    if len(train) != len(ref):
        raise StageError(f"{len(train)} training-loss arrays but {len(ref)} reference-loss arrays")
    out = []
    for i, (t, r) in enumerate(zip(train, ref)):
        if t is None or r is None:
            if (t is None) != (r is None):
                raise StageError(f"document {i}: scored by one model only")
            out.append(None)
            continue
        if t.shape != r.shape:
            raise StageError(f"document {i}: {t.shape} training losses vs {r.shape} reference losses")
        out.append((t.astype(np.float32) - r.astype(np.float32)))
    return out


def mean_scores(per_doc: Sequence[np.ndarray | None]) -> np.ndarray:
    """Mean per document (NaN for skipped documents). With reference losses this is the
    ``perplexity`` score (log-perplexity); with excess losses the ``rho`` score."""
    return np.array([float(np.mean(x)) if x is not None and len(x) else np.nan for x in per_doc],
                    dtype=np.float64)


def select_by_score(doc_ids: Sequence[str], scores: Sequence[float], n_tokens: Sequence[int],
                    budget_tokens: int, descending: bool = True) -> np.ndarray:
    """Indices of documents taken best-first until ``budget_tokens`` is used.

    Order: by score (``descending`` = high first), ties by doc id, so the result is
    deterministic. A document that would overshoot the budget is passed over and smaller
    ones after it may still fit (greedy fill). NaN scores (skipped documents) are never taken.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    if not (len(doc_ids) == len(scores) == len(n_tokens)):
        raise StageError("doc_ids, scores and n_tokens differ in length")
    if budget_tokens < 0:
        raise StageError(f"budget_tokens must be >= 0, got {budget_tokens}")
    valid = np.flatnonzero(~np.isnan(scores))
    key = -scores[valid] if descending else scores[valid]
    ids = np.asarray(doc_ids, dtype=object)[valid]
    order = valid[sorted(range(len(valid)), key=lambda i: (key[i], ids[i]))]
    taken, used = [], 0
    for i in order:
        if used + n_tokens[i] <= budget_tokens:
            taken.append(i)
            used += int(n_tokens[i])
    return np.asarray(taken, dtype=np.int64)


# --------------------------------------------------------------------------- masks


def _n_keep(total: int, keep_ratio: float) -> int:
    if not 0.0 < keep_ratio <= 1.0:
        raise StageError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return int(round(keep_ratio * total))


def _to_token_masks(flags: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """Split flat per-prediction flags into per-document masks over input ids (bit 0 = 0)."""
    out, pos = [], 0
    for n_pred in lengths:
        mask = np.zeros(n_pred + 1, dtype=bool)
        mask[1:] = flags[pos:pos + n_pred]
        out.append(mask)
        pos += n_pred
    return out


def topk_masks_exact(excess: Sequence[np.ndarray], keep_ratio: float) -> list[np.ndarray]:
    """Masks keeping exactly ``round(k * N)`` of the ``N`` predicted tokens, highest excess first.

    ``excess[i]`` has ``n_i - 1`` values; the returned mask ``i`` has ``n_i`` entries (bit 0 False).
    Ties are broken by position (earlier document / token first) so the result is deterministic.
    """
    lengths = [len(x) for x in excess]
    flat = np.concatenate([np.asarray(x, dtype=np.float32) for x in excess]) if excess else np.zeros(0, np.float32)
    if np.isnan(flat).any():
        raise StageError("excess losses contain NaN")
    keep = _n_keep(len(flat), keep_ratio)
    flags = np.zeros(len(flat), dtype=bool)
    if keep:
        # Stable sort on -x: equal values keep their positional order.
        flags[np.argsort(-flat, kind="stable")[:keep]] = True
    return _to_token_masks(flags, lengths)


def topk_masks_per_batch(excess: Sequence[np.ndarray], keep_ratio: float, batch_tokens: int) -> list[np.ndarray]:
    """The paper's mode: documents in order form batches of >= ``batch_tokens`` scored tokens
    (the last may be smaller); the top ``k%`` is exact within each batch."""
    masks: list[np.ndarray] = []
    start, acc = 0, 0
    for i, x in enumerate(excess):
        acc += len(x)
        if acc >= batch_tokens or i == len(excess) - 1:
            masks.extend(topk_masks_exact(excess[start:i + 1], keep_ratio))
            start, acc = i + 1, 0
    return masks


class ExcessHistogram:
    """A mergeable fixed-bin histogram of excess losses (see the module docstring for the bound).

    Bin ``b`` holds values in ``[lo + b*w, lo + (b+1)*w)`` with ``w = (hi - lo) / bins``;
    values below ``lo`` go to bin 0, values ``>= hi`` to the last bin.
    """

    def __init__(self, lo: float = -20.0, hi: float = 20.0, bins: int = 40_000, counts: np.ndarray | None = None):
        if not lo < hi or bins < 1:
            raise StageError(f"bad histogram range/bins: [{lo}, {hi}) with {bins} bins")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.counts = np.zeros(bins, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)

    def bin_index(self, values: np.ndarray) -> np.ndarray:
        """The bin of each value; masks use this same function, so the bound is exact."""
        v = np.asarray(values, dtype=np.float64)
        idx = np.floor((v - self.lo) * (self.bins / (self.hi - self.lo)))
        return np.clip(idx, 0, self.bins - 1).astype(np.int64)

    def add(self, values: np.ndarray) -> "ExcessHistogram":
        v = np.asarray(values)
        if np.isnan(v).any():
            raise StageError("excess losses contain NaN")
        self.counts += np.bincount(self.bin_index(v), minlength=self.bins)
        return self

    def merge(self, other: "ExcessHistogram") -> "ExcessHistogram":
        if (self.lo, self.hi, self.bins) != (other.lo, other.hi, other.bins):
            raise StageError("cannot merge histograms with different ranges or bin counts")
        return ExcessHistogram(self.lo, self.hi, self.bins, self.counts + other.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def threshold(self, keep_ratio: float) -> tuple[int, dict]:
        """``(b*, info)``: keep tokens whose bin is ``>= b*``. ``info`` holds the target count,
        the count that will be kept and the bound (mass of bin ``b*``)."""
        total = self.total
        target = _n_keep(total, keep_ratio)
        from_top = np.cumsum(self.counts[::-1])  # from_top[j] = tokens in bins >= bins-1-j
        j = int(np.searchsorted(from_top, max(target, 1)))
        j = min(j, self.bins - 1)
        b = self.bins - 1 - j
        kept = int(from_top[j]) if total else 0
        info = {"target": target, "kept": kept, "total": total, "bin_mass": int(self.counts[b]),
                "threshold_value": self.lo + b * (self.hi - self.lo) / self.bins,
                "max_excess_fraction": float(self.counts[b]) / total if total else 0.0}
        return b, info

    def masks(self, excess: Sequence[np.ndarray], bin_threshold: int) -> list[np.ndarray]:
        """Token masks (bit 0 False) keeping values whose bin is ``>= bin_threshold``."""
        return [np.concatenate([[False], self.bin_index(x) >= bin_threshold]) for x in excess]

    def to_dict(self) -> dict:
        nz = np.flatnonzero(self.counts)
        return {"lo": self.lo, "hi": self.hi, "bins": self.bins, "index": nz.tolist(),
                "counts": self.counts[nz].tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ExcessHistogram":
        counts = np.zeros(int(d["bins"]), dtype=np.int64)
        counts[np.asarray(d["index"], dtype=np.int64)] = d["counts"]
        return cls(d["lo"], d["hi"], d["bins"], counts)


def attach_token_masks(selection, masks):
    """The selection table (any method's rows) with its ``token_mask`` column filled from the
    mask table of :func:`workers.loss_scorer.compute_token_masks`, matched by ``doc_id``.

    Documents without a mask (skipped: < 2 tokens) keep a null mask. A mask whose token count
    differs from the selection's ``n_tokens`` means the two were tokenized differently: error.
    """
    import pyarrow as pa

    by_id = dict(zip(masks["doc_id"].to_pylist(), zip(masks["token_mask"].to_pylist(),
                                                       masks["n_tokens"].to_pylist())))
    out = []
    for doc_id, n in zip(selection["doc_id"].to_pylist(), selection["n_tokens"].to_pylist()):
        hit = by_id.get(doc_id)
        if hit is not None and hit[1] != n:
            raise StageError(f"document {doc_id!r}: mask covers {hit[1]} tokens, selection says {n} "
                             "(tokenizer or add_bos differs between the budget count and the mask stage)")
        out.append(None if hit is None else hit[0])
    column = pa.array(out, pa.binary())
    if "token_mask" in selection.column_names:
        return selection.set_column(selection.column_names.index("token_mask"), "token_mask", column)
    return selection.append_column("token_mask", column)


def masked_lm_loss(logits, input_ids, mask):
    """The SLM loss of one batch: mean token loss over kept tokens only.

    ``mask[b, i]`` keeps the loss of predicting ``input_ids[b, i]`` from ``logits[b, i-1]``
    (bit 0 is ignored). Equivalent to HF's loss with ``labels = where(mask, ids, -100)``.
    """
    import torch

    targets = input_ids[:, 1:]
    keep = mask[:, 1:].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (losses * keep).sum() / keep.sum().clamp(min=1)


# --------------------------------------------------------------------------- scoring


class RhoScorer:
    """Both models of Rho-1 on one device: per-token reference and training losses of documents.

    Refuses models whose tokenizers differ (their token ids, hence losses, would not align).
    """

    def __init__(self, config: RhoConfig, device: str | None = None, storage_options: dict | None = None):
        from selector.models.loading import load_causal_lm, load_tokenizer, require_same_tokenizer
        from selector.rho.token_losses import default_device, default_dtype

        self.config = config
        self.tokenizer_fingerprint = require_same_tokenizer(
            {"reference_model": config.reference_model, "training_model": config.training_model}, storage_options)
        self.device = device or default_device()
        dtype = default_dtype(self.device)
        self.tokenizer = load_tokenizer(config.reference_model, storage_options)
        self.reference = load_causal_lm(config.reference_model, dtype, self.device, storage_options)
        self.training = load_causal_lm(config.training_model, dtype, self.device, storage_options)

    def score(self, texts: list[str]):
        """``(ref TokenLosses, train TokenLosses)`` for ``texts``, tokenized once."""
        from selector.rho.token_losses import token_losses, tokenize

        c = self.config
        ids = tokenize(self.tokenizer, texts, c.add_bos)
        kw = dict(max_length=c.max_length, overlap=c.overlap, batch_tokens=c.batch_tokens, token_ids=ids)
        return (token_losses(self.reference, self.tokenizer, texts, **kw),
                token_losses(self.training, self.tokenizer, texts, **kw))
