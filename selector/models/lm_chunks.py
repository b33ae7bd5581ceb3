"""Documents -> fixed-size token chunks -> padded batches, and the per-chunk LM loss.

Shared by K-FAC fitting, the influence query, scoring and gradient projection, so all of
them use the same loss:

* a document is tokenised and split into chunks of at most ``chunk_tokens`` tokens (Quad's
  rule; a document's score is later the mean over its chunks). Chunks with fewer than two
  tokens predict nothing and are dropped;
* the loss of a chunk c is the **mean** next-token cross-entropy over its predicted tokens,
  L(c) = (1/(n_c - 1)) sum_t CE_t. A batch is backpropagated through sum_c L(c): chunks do
  not interact, so each chunk's captured g_t are exactly the gradients of its own L(c);
* padding (right side) is excluded: pad positions get no loss and are masked out of every
  factor and score via ``token_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from selector.errors import StageError


@dataclass
class Chunk:
    doc: int          # index of the document in the caller's list
    ids: list[int]


@dataclass
class Batch:
    chunk_index: list[int]      # indices into the chunk list
    input_ids: torch.Tensor     # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens

    @property
    def token_mask(self) -> torch.Tensor:
        return self.attention_mask


def tokenize_chunks(tokenizer, texts: Sequence[str], chunk_tokens: int,
                    max_chunks_per_doc: int | None = None) -> list[Chunk]:
    """Tokenise ``texts`` and split each into chunks of at most ``chunk_tokens`` tokens."""
    if chunk_tokens < 2:
        raise StageError(f"influence.chunk_tokens must be >= 2 (got {chunk_tokens})")
    chunks: list[Chunk] = []
    if len(texts) == 0:
        return chunks
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    for d, ids in enumerate(encoded):
        pieces = [ids[i:i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
        pieces = [p for p in pieces if len(p) >= 2]
        if max_chunks_per_doc is not None:
            pieces = pieces[:max_chunks_per_doc]
        chunks.extend(Chunk(d, p) for p in pieces)
    return chunks


def batches(chunks: Sequence[Chunk], batch_size: int, pad_id: int, device: torch.device | str = "cpu",
            sort: bool = True) -> Iterator[Batch]:
    """Padded batches (right padding); sorted by length so little compute goes to padding."""
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].ids)) if sort else list(range(len(chunks)))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(chunks[i].ids) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(chunks[i].ids)
            ids[r, :n] = torch.tensor(chunks[i].ids, dtype=torch.long)
            mask[r, :n] = 1
        yield Batch(idx, ids.to(device), mask.to(device))


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def chunk_losses(model, batch: Batch, sample_labels: bool = False,
                 generator: torch.Generator | None = None, reduce: str = "mean") -> torch.Tensor:
    """Per-chunk next-token loss, shape (B,): the mean over predicted tokens (``reduce="mean"``,
    the document loss L(c) used everywhere influence is computed) or their sum (``"sum"``,
    used to fit K-FAC factors so each g_t is a per-token gradient). Pads are excluded.

    With ``sample_labels`` the targets are drawn from the model's own predictive
    distribution (the "true Fisher" for K-FAC's G); otherwise the data's next tokens.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:]
    valid = batch.attention_mask[:, 1:].bool()
    if sample_labels:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            targets = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1,
                                        generator=generator).reshape(targets.shape)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="none").reshape(targets.shape)
    ce = ce * valid
    if reduce == "sum":
        return ce.sum(dim=1)
    n = valid.sum(dim=1).clamp(min=1)
    return ce.sum(dim=1) / n


class activation_grads_only:
    """Context: backward computes activation gradients but skips every weight gradient.

    Hooks only need dL/dy at each tracked layer, so the weight-gradient matmuls (a third of
    a forward+backward) are wasted work. Parameters are frozen and the input-embedding output
    is made to require grad instead, which keeps the activation graph alive. Restores the
    parameters' ``requires_grad`` on exit.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        emb = self.model.get_input_embeddings()
        self.handle = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return self.model

    def __exit__(self, *exc):
        self.handle.remove()
        for p, flag in self.saved:
            p.requires_grad_(flag)
        return False
