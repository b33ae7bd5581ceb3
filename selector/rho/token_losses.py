"""Per-token losses of a causal LM over whole documents (chunked with context overlap).

For a document tokenized as ``x_0 .. x_{n-1}`` the loss of token ``i >= 1`` is

    L(x_i) = -log p_theta(x_i | x_{<i} within its chunk)

Token alignment (the contract every consumer relies on)
-------------------------------------------------------
* Tokenization: ``tokenizer(text, add_special_tokens=False)``, optionally with the BOS id
  prepended (``add_bos``). No EOS is appended. ``n_tokens`` counts the ids that result, and
  these ids are what :mod:`selector.data.materialize` writes as ``input_ids``.
* Token 0 has no prediction. A document's loss array therefore has ``n - 1`` entries and
  ``losses[j]`` is the loss of token ``j + 1``. A token mask has ``n`` entries (one per
  input id) and its bit 0 is always 0, so a trainer can use HF's convention directly:
  ``labels = where(mask, input_ids, -100)`` (HF shifts labels inside the model).
* Documents with fewer than 2 tokens (empty text included) have nothing to predict; they
  are skipped and counted (``skipped['empty']``, ``skipped['too_short']``), never dropped silently.

Chunking with overlap
---------------------
A model sees at most ``max_length`` tokens. A longer document is cut into windows of
``max_length`` tokens with stride ``max_length - overlap``. Window ``c`` starts at
``s_c = c * (max_length - overlap)``. Window 0 scores tokens ``1 .. max_length - 1``;
window ``c > 0`` scores only tokens ``s_c + overlap .. s_c + max_length - 1``: its first
``overlap`` tokens are context only (they were scored by window ``c - 1``). Hence every
token's loss is computed exactly once and every token after the first window sees at least
``overlap`` tokens of context. ``1 <= overlap < max_length``.

Batching: windows of all documents are sorted by length and packed into batches of at most
``batch_tokens`` padded tokens (length bucketing: little padding). Padding is on the right
with an attention mask, so it cannot change the losses of real tokens. The model runs in
bf16 on GPU and fp32 on CPU; the log-softmax is always taken in fp32. For architectures
whose logits are a plain linear head over the final hidden states (Llama, GPT-2, Qwen, ...)
the head runs only on scored positions, not on padding or overlap context; other models
fall back to the full forward (same results, see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from selector.errors import StageError


@dataclass
class Window:
    """One model input: ``ids`` are tokens ``start .. start+len(ids)-1`` of document ``doc``;
    its losses for positions ``>= first_scored`` (document coordinates) are kept."""

    doc: int
    start: int
    ids: np.ndarray
    first_scored: int


@dataclass
class TokenLosses:
    """Per-document results, parallel to the input texts.

    ``losses[i]`` is a float32 array of ``n_tokens[i] - 1`` losses, or ``None`` for a skipped
    document (``n_tokens[i] < 2``); ``skipped`` counts skips by reason.
    """

    losses: list[np.ndarray | None]
    n_tokens: list[int]
    skipped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "too_short": 0})
    tokens_scored: int = 0


def tokenize(tokenizer, texts: list[str], add_bos: bool = False) -> list[np.ndarray]:
    """Token ids per text, per the alignment contract in the module docstring."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
    out = []
    for ids in encoded:
        arr = np.asarray(ids, dtype=np.int64)
        if add_bos:
            if tokenizer.bos_token_id is None:
                raise StageError("add_bos is set but the tokenizer has no BOS token")
            arr = np.concatenate([[tokenizer.bos_token_id], arr]) if len(arr) else arr
        out.append(arr)
    return out


def make_windows(doc: int, ids: np.ndarray, max_length: int, overlap: int) -> list[Window]:
    """Windows covering a document so that each token ``1..n-1`` is scored exactly once."""
    if not 1 <= overlap < max_length:
        raise StageError(f"need 1 <= overlap < max_length, got overlap={overlap}, max_length={max_length}")
    n = len(ids)
    windows = [Window(doc, 0, ids[:max_length], 1)]
    stride = max_length - overlap
    start = stride
    # The previous window scored up to start + overlap - 1; continue while tokens remain.
    while start + overlap < n:
        windows.append(Window(doc, start, ids[start:start + max_length], start + overlap))
        start += stride
    return windows


def bucket_batches(windows: list[Window], batch_tokens: int, max_batch_size: int | None = None) -> list[list[Window]]:
    """Windows sorted by length (longest first) and grouped so that ``rows * longest <= batch_tokens``."""
    order = sorted(windows, key=lambda w: (-len(w.ids), w.doc, w.start))
    batches: list[list[Window]] = []
    current: list[Window] = []
    for w in order:
        longest = len(current[0].ids) if current else len(w.ids)
        full = (len(current) + 1) * longest > batch_tokens or (max_batch_size and len(current) >= max_batch_size)
        if current and full:
            batches.append(current)
            current = []
        current.append(w)
    if current:
        batches.append(current)
    return batches


def collate(batch: list[Window], pad_id: int):
    """``(input_ids, attention_mask)`` int64 arrays, right-padded to the longest window."""
    width = max(len(w.ids) for w in batch)
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(batch), width), dtype=np.int64)
    for r, w in enumerate(batch):
        input_ids[r, :len(w.ids)] = w.ids
        attention[r, :len(w.ids)] = 1
    return input_ids, attention


# Architectures whose causal-LM forward is exactly ``lm_head(base_model(x).last_hidden_state)``
# (no logit soft-capping or scaling): for these only the scored positions go through the LM head.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "olmo", "olmo2", "phi3", "smollm3",
               "gpt_bigcode", "starcoder2", "stablelm"}


def _plain_head(model) -> bool:
    cfg = model.config
    return (cfg.model_type in _PLAIN_HEAD and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None and model.get_output_embeddings() is not None)


def window_losses(model, input_ids, attention_mask, score_from=None):
    """Per-position next-token losses, ``[B, T-1]`` fp32: entry ``t`` is the loss of token ``t+1``.

    ``score_from[b]`` (optional): row ``b``'s entries before it are context only and not
    computed. Padding and context entries are 0; callers read only scored positions.
    """
    import torch

    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool()
    if score_from is not None:
        valid &= torch.arange(valid.shape[1], device=valid.device)[None, :] >= score_from[:, None]
    out = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    if _plain_head(model):
        # The LM head runs only on scored positions (not on padding or overlap context):
        # for large vocabularies this is most of the saving over a plain forward.
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
        rows, head = hidden[:, :-1][valid], model.get_output_embeddings()
    else:
        rows = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][valid]
        head = None
    out[valid] = _nll(rows, targets[valid], head)
    return out


def _nll(rows, targets, head=None):
    """``-log softmax(head(rows))[target]`` in fp32, over row chunks of about 2^25 logits so
    the fp32 logits never take more than ~128 MB (a 128k vocabulary x 16k tokens would be 8 GB)."""
    import torch

    vocab = head.out_features if head is not None and hasattr(head, "out_features") else rows.shape[-1]
    step = max(1, (1 << 25) // max(vocab, 1))
    nll = torch.empty(len(targets), dtype=torch.float32, device=rows.device)
    for i in range(0, len(targets), step):
        logits = (head(rows[i:i + step]) if head is not None else rows[i:i + step]).float()
        # log_softmax + gather measured faster on CPU than logsumexp or cross_entropy(reduction='none').
        nll[i:i + step] = -torch.log_softmax(logits, dim=-1).gather(1, targets[i:i + step, None])[:, 0]
    return nll


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def token_losses(model, tokenizer, texts: list[str], max_length: int = 1024, overlap: int = 128,
                 batch_tokens: int = 16384, add_bos: bool = False, max_batch_size: int | None = None,
                 token_ids: list[np.ndarray] | None = None) -> TokenLosses:
    """Per-token losses of ``model`` for every text (see the module docstring for alignment).

    ``token_ids`` (already tokenized documents) may be passed instead of tokenizing ``texts``
    again, e.g. when one tokenization is shared by a reference and a training model.
    """
    import torch

    if batch_tokens < max_length:
        raise StageError(f"batch_tokens ({batch_tokens}) must be >= max_length ({max_length})")
    ids_per_doc = token_ids if token_ids is not None else tokenize(tokenizer, texts, add_bos)
    result = TokenLosses(losses=[None] * len(ids_per_doc), n_tokens=[len(x) for x in ids_per_doc])
    windows: list[Window] = []
    for d, ids in enumerate(ids_per_doc):
        if len(ids) == 0:
            result.skipped["empty"] += 1
        elif len(ids) < 2:
            result.skipped["too_short"] += 1
        else:
            result.losses[d] = np.full(len(ids) - 1, np.nan, dtype=np.float32)
            windows.extend(make_windows(d, ids, max_length, overlap))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in bucket_batches(windows, batch_tokens, max_batch_size):
            input_ids, attention = collate(batch, pad_id)
            score_from = torch.tensor([w.first_scored - w.start - 1 for w in batch], device=device)
            losses = window_losses(model, torch.from_numpy(input_ids).to(device),
                                   torch.from_numpy(attention).to(device), score_from).cpu().numpy()
            for r, w in enumerate(batch):
                # Row entry t is the loss of document token w.start + t + 1.
                lo = w.first_scored - w.start - 1
                hi = len(w.ids) - 1
                result.losses[w.doc][w.first_scored - 1:w.start + hi] = losses[r, lo:hi]
                result.tokens_scored += hi - lo
    for arr in result.losses:
        if arr is not None and np.isnan(arr).any():
            raise StageError("internal: a token was not scored (window coverage bug)")
    return result
