"""Train a fresh tiny causal LM on a selection and measure its loss on held-out text.

Every arm of the benchmark trains the same initial model (one per training seed) with the same
steps, batch, window and learning-rate schedule; only the training tokens differ. Documents are
packed into one stream joined by EOS (ordinary packed pretraining), in an order that depends only on
the selected set and the seed (see ``run.canonical_order``), and the stream is read in epochs: each
epoch cuts it into consecutive windows (from a random offset) and visits every window once, in a
seeded order. So every selected token is trained on about equally often, and two selections of the
same documents train identically whatever order a selector listed them in. (The first protocol drew
windows at random positions from the selector's order; at these sizes that alone moved target loss by
0.06-0.09 nats between two listings of the same set: ``--train-windows random`` keeps it for
comparison.) With Rho-1 token masks, the loss is the mean over kept tokens only
(:func:`selector.rho.excess_loss.masked_lm_loss`); masked tokens stay in the input as context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    # "epochs": every window of the stream once per epoch, seeded order; "random": windows at
    # random positions (with replacement), the first protocol
    windows: str = "epochs"


def window_starts(n_tokens: int, seq_len: int, batch_size: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """(steps, batch_size) start positions of training windows over a stream of ``n_tokens``.

    Epochs: each one draws an offset in [0, seq_len), cuts the stream into the consecutive windows
    that fit after it and visits each once in a random order; batches run on across epochs.
    """
    need = steps * batch_size
    out: list[np.ndarray] = []
    while sum(len(o) for o in out) < need:
        offset = int(rng.integers(0, seq_len)) if n_tokens - seq_len > seq_len else 0
        n = (n_tokens - offset - 1) // seq_len  # whole windows after the offset (one token kept spare)
        if n < 1:
            offset, n = 0, 1
        out.append(offset + seq_len * rng.permutation(n))
    return np.concatenate(out)[:need].reshape(steps, batch_size)


def pack(tokenizer, texts: list[str], masks: list[np.ndarray | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token stream and loss-mask stream of ``texts`` (EOS after each document, its loss kept)."""
    from selector.rho.token_losses import tokenize

    eos = tokenizer.eos_token_id
    ids_parts, mask_parts = [], []
    for i, ids in enumerate(tokenize(tokenizer, texts)):
        if not len(ids):
            continue
        m = masks[i] if masks is not None and masks[i] is not None else np.ones(len(ids), dtype=bool)
        if len(m) != len(ids):
            raise ValueError(f"token mask of document {i} has {len(m)} entries for {len(ids)} tokens "
                             "(mask made with another tokenizer?)")
        ids_parts += [ids, np.array([eos], dtype=np.int64)]
        mask_parts += [np.asarray(m, dtype=bool), np.array([True])]
    return np.concatenate(ids_parts), np.concatenate(mask_parts)


def train_lm(init_dir: str, stream: np.ndarray, mask: np.ndarray, settings: TrainSettings, seed: int):
    """Train a copy of the model in ``init_dir`` on windows of ``stream`` (``settings.windows``); return it."""
    import torch

    from selector.models.loading import load_causal_lm
    from selector.rho.excess_loss import masked_lm_loss

    if len(stream) < settings.seq_len + 1:
        raise ValueError(f"{len(stream)} training tokens; need at least {settings.seq_len + 1}")
    model = load_causal_lm(init_dir, torch.float32, "cpu")
    model.train()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    warm, steps = settings.warmup_steps, settings.steps

    def schedule(step: int) -> float:  # linear warm-up, cosine to 10% (as selector.models.proxy_training)
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ids_t, mask_t = torch.from_numpy(stream), torch.from_numpy(mask)
    if settings.windows == "epochs":
        all_starts = window_starts(len(stream), settings.seq_len, settings.batch_size, steps, rng)
    elif settings.windows != "random":
        raise ValueError(f"TrainSettings.windows must be 'epochs' or 'random', not {settings.windows!r}")
    for step in range(steps):
        starts = (all_starts[step] if settings.windows == "epochs"
                  else rng.integers(0, len(stream) - settings.seq_len, size=settings.batch_size))
        idx = torch.from_numpy(starts)[:, None] + torch.arange(settings.seq_len)[None, :]
        batch, keep = ids_t[idx], mask_t[idx]
        loss = masked_lm_loss(model(input_ids=batch).logits, batch, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training diverged at step {step}")
    model.eval()
    return model


def eval_loss(model, stream: np.ndarray, seq_len: int, batch_size: int = 16) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of ``stream`` (deterministic)."""
    import torch

    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError("evaluation set shorter than one window")
    windows = torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            batch = windows[i:i + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum")
            total += float(losses)
            count += batch[:, 1:].numel()
    return total / count
