"""Proxy-model training on real text: the loss falls, held-out loss falls, the checkpoint reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selector.errors import StageError
from selector.models.loading import load_causal_lm, load_tokenizer
from selector.models.proxy_training import ProxyTrainConfig, train_causal_lm, train_from_config
from selector.rho.token_losses import token_losses


def test_training_lowers_loss_and_checkpoint_reloads(tiny_llama_dir, real_texts, tmp_path):
    train_texts, held_out = real_texts[:150], real_texts[-20:]
    seen = []
    history = train_causal_lm(tiny_llama_dir, train_texts, tmp_path / "ref", steps=20, batch_size=4, seq_len=48,
                              lr=1e-2, warmup_steps=3, seed=0, progress=lambda step, loss: seen.append((step, loss)))
    assert len(history) == 20 and [s for s, _ in seen] == list(range(1, 21))
    assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.5

    before = load_causal_lm(str(tiny_llama_dir))
    after = load_causal_lm(str(tmp_path / "ref"))  # reload via from_pretrained
    tok = load_tokenizer(str(tmp_path / "ref"))
    texts = [t[:300] for t in held_out]
    loss_before = np.mean(np.concatenate(token_losses(before, tok, texts, max_length=256, overlap=16).losses))
    loss_after = np.mean(np.concatenate(token_losses(after, tok, texts, max_length=256, overlap=16).losses))
    assert loss_after < loss_before - 0.5  # it learned something that generalises
    meta = json.loads((tmp_path / "ref" / "proxy_training.json").read_text())
    assert meta["steps"] == 20 and meta["last_loss"] == pytest.approx(history[-1])


def test_training_is_deterministic_and_validates(tiny_llama_dir, real_texts, tmp_path):
    cfg = ProxyTrainConfig(init_model=str(tiny_llama_dir), out_dir=str(tmp_path / "a"), steps=3, batch_size=2,
                           seq_len=32)
    h1 = train_from_config(cfg, real_texts[:20])
    h2 = train_from_config(cfg.model_copy(update={"out_dir": str(tmp_path / "b")}), real_texts[:20])
    assert h1 == h2
    with pytest.raises(StageError, match="every text is empty"):
        train_causal_lm(tiny_llama_dir, ["", ""], tmp_path / "c", steps=1)
    with pytest.raises(StageError, match="positions"):
        train_causal_lm(tiny_llama_dir, real_texts[:50], tmp_path / "d", steps=1, seq_len=1000)
