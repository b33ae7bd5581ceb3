"""Training small proxy causal LMs: the reference and training models of demos, tests, benches.

Objective: plain next-token cross-entropy, averaged over the tokens of a batch,

    L(theta) = -1/N * sum_i log p_theta(x_i | x_<i)

on fixed-length windows drawn from the concatenated token stream of ``texts`` (documents
joined with EOS, so a window may cross a document boundary as in ordinary packed
pretraining). AdamW with linear warm-up then cosine decay; fp32 on CPU, bf16 autocast on
GPU. The result is saved with ``save_pretrained`` next to its tokenizer, so it loads with
:func:`selector.models.loading.load_causal_lm` like any production checkpoint.

Typical use (Rho-1): build a tiny model once with :func:`selector.demo.proxy_models.build_causal_lm`,
train a copy on a high-quality reference set (the reference model) and another on the raw
corpus (the training model). Both share the tokenizer of the initial model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field

from selector.config_base import StrictModel
from selector.errors import StageError


class ProxyTrainConfig(StrictModel):
    """How to train a proxy model (the ``proxy`` section of a demo/bench config)."""

    init_model: str = Field(description="save_pretrained folder of the initial model (e.g. from build_causal_lm).")
    out_dir: str = Field(description="Where the trained model and its tokenizer are saved.")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = 0


def _token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    from selector.rho.token_losses import tokenize

    eos = tokenizer.eos_token_id
    parts = []
    for ids in tokenize(tokenizer, texts):
        if len(ids):
            parts.append(ids)
            if eos is not None:
                parts.append(np.array([eos], dtype=np.int64))
    if not parts:
        raise StageError("no tokens to train on: every text is empty")
    return np.concatenate(parts)


def train_causal_lm(model_dir: str | Path, texts: list[str], out_dir: str | Path, steps: int = 200,
                    batch_size: int = 8, seq_len: int = 128, lr: float = 3e-3, seed: int = 0,
                    weight_decay: float = 0.01, warmup_steps: int = 10,
                    progress: Callable[[int, float], None] | None = None, device: str | None = None) -> list[float]:
    """Train the model in ``model_dir`` on ``texts`` for ``steps`` steps; save it to ``out_dir``.

    Returns the training loss of every step. ``progress(step, loss)`` is called after each
    step. Deterministic given ``seed`` on CPU.
    """
    import torch

    from selector.models.loading import load_causal_lm, load_tokenizer
    from selector.rho.token_losses import default_device

    device = device or default_device()
    tokenizer = load_tokenizer(str(model_dir))
    stream = _token_stream(tokenizer, texts)
    if len(stream) < seq_len + 1:
        raise StageError(f"corpus has {len(stream)} tokens; need at least seq_len + 1 = {seq_len + 1}")
    max_pos = None
    model = load_causal_lm(str(model_dir), torch.float32, device)
    for attr in ("max_position_embeddings", "n_positions"):
        max_pos = max_pos or getattr(model.config, attr, None)
    if max_pos is not None and seq_len > max_pos:
        raise StageError(f"seq_len {seq_len} exceeds the model's {max_pos} positions")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    use_bf16 = str(device).startswith("cuda")
    history: list[float] = []
    t0 = time.time()
    for step in range(steps):
        starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
        batch = torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts])).to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if not math.isfinite(history[-1]):
            raise StageError(f"training diverged at step {step} (loss {history[-1]}); lower lr")
        if progress:
            progress(step + 1, history[-1])
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "proxy_training.json").write_text(
        __import__("json").dumps({"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                                  "seed": seed, "tokens_seen": steps * batch_size * seq_len,
                                  "first_loss": history[0], "last_loss": history[-1],
                                  "seconds": round(time.time() - t0, 2)}, indent=2))
    return history


def train_from_config(config: ProxyTrainConfig, texts: list[str],
                      progress: Callable[[int, float], None] | None = None) -> list[float]:
    """:func:`train_causal_lm` driven by a :class:`ProxyTrainConfig`."""
    return train_causal_lm(config.init_model, texts, config.out_dir, steps=config.steps,
                           batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr, seed=config.seed,
                           weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, progress=progress)
