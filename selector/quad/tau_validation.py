"""Quad's ``tau: validate``: the paper's threshold procedure, measured instead of assumed.

The Quad paper chooses tau as one of 20 influence buckets on a validation set (its 4th bucket,
the top 20%, in the reported run). Here, after the warm-up round has scored a uniform sample:

1. the reference set is split (by a seeded hash of each document) into the part that builds the
   influence query and a held-out *validation* part (:func:`split_reference`);
2. the warm-up documents are cut into ``B`` equal-count buckets by influence, best first
   (:meth:`selector.quad.loop.QuadSelector.tau_buckets`);
3. for each bucket ``b`` the proxy model is trained for ``steps`` steps on the warm-up documents of
   buckets ``0..b`` (everything tau = the lower edge of bucket ``b`` would keep), from the same
   start and seed, and its mean token loss on the validation part is measured:

       b* = argmin_b  L_val( theta_0 - training on {d : score_d >= low_b} )

4. tau = ``low_{b*}``, and every bucket's loss and the wall time are reported in the manifest.

Training on the *cumulative* prefix (rather than one bucket alone) is what a threshold does: a tau
keeps everything above it. Cost: ``B`` short proxy trainings plus ``B`` evaluations of the
validation part, reported as ``seconds``.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from selector.errors import StageError


def split_reference(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(query part, validation part)``: a document goes to validation when the BLAKE2b hash of
    ``(seed, text)`` falls in the lowest ``fraction``; deterministic and independent of order."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    query, val = [], []
    for t in texts:
        h = int.from_bytes(hashlib.blake2b(f"{seed}:val:{t}".encode(), digest_size=8).digest(), "little") / 2.0**64
        (val if h < fraction else query).append(t)
    if not val or not query:
        raise StageError(f"tau: validate needs reference documents for both the query and the validation split "
                         f"(got {len(query)} and {len(val)} of {len(texts)}); add reference documents")
    return query, val


def mean_token_loss(model, tokenizer, texts: Sequence[str], max_length: int = 256) -> float:
    """Token-weighted mean next-token loss of ``model`` on ``texts``."""
    from selector.rho.token_losses import token_losses

    res = token_losses(model, tokenizer, list(texts), max_length=max_length, overlap=max_length // 8,
                       batch_tokens=max(16384, max_length))
    parts = [x for x in res.losses if x is not None]
    if not parts:
        raise StageError("tau: validate: the validation split has no document of 2 or more tokens")
    return float(np.concatenate(parts).mean())


def choose_bucket(buckets: Sequence[dict], model_path: str, validation: Sequence[str], steps: int = 30,
                  batch_size: int = 8, seq_len: int = 128, lr: float = 1e-3, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> dict:
    """Train on each cumulative bucket prefix, measure validation loss, return the best bucket.

    ``buckets``: :meth:`QuadSelector.tau_buckets` output (best first), each with the documents'
    ``texts`` added (the caller reads them); ``model_path``: a local model folder. Returns ``{"tau", "bucket", "table": [{"bucket", "low", "documents", "val_loss"}],
    "base_val_loss", "seconds", "steps"}``.
    """
    import torch

    from selector.models.loading import load_causal_lm, load_tokenizer
    from selector.models.proxy_training import train_causal_lm

    t0 = time.time()
    tokenizer = load_tokenizer(model_path)
    base = load_causal_lm(model_path, torch.float32)
    base.eval()
    base_loss = mean_token_loss(base, tokenizer, validation, max_length=seq_len * 2)
    del base
    table, kept = [], []
    with tempfile.TemporaryDirectory(prefix="thresher-tau-") as tmp:
        for b in buckets:
            kept.extend(b["texts"])
            try:
                train_causal_lm(model_path, kept, tmp, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                seed=seed, warmup_steps=min(5, steps))
            except StageError:  # too few tokens in the first buckets for one window: not a candidate yet
                table.append({"bucket": b["bucket"], "low": b["low"], "documents": len(kept), "val_loss": None})
                continue
            model = load_causal_lm(tmp, torch.float32)
            model.eval()
            loss = mean_token_loss(model, tokenizer, validation, max_length=seq_len * 2)
            table.append({"bucket": b["bucket"], "low": b["low"], "documents": len(kept), "val_loss": loss})
            if log:
                log(f"quad: tau validation bucket {b['bucket']} (tau {b['low']:.4g}, {len(kept)} docs): "
                    f"validation loss {loss:.4f}")
    scored = [r for r in table if r["val_loss"] is not None]
    if not scored:
        raise StageError("tau: validate: no bucket prefix had enough tokens to train on; raise quad.warmup_size")
    best = min(scored, key=lambda r: (r["val_loss"], r["bucket"]))
    return {"tau": best["low"], "bucket": best["bucket"], "table": table, "base_val_loss": base_loss,
            "seconds": round(time.time() - t0, 2), "steps": steps}
