"""Per-token losses: chunked windows against direct forwards, padding invariance, bucketing,
coverage (every token scored exactly once), and counted skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selector.errors import StageError
from selector.models.loading import load_causal_lm, load_tokenizer
from selector.rho.token_losses import bucket_batches, make_windows, token_losses, tokenize


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_causal_lm(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_dir))


def _direct(model, ids: np.ndarray) -> np.ndarray:
    """Loss of tokens 1..n-1 from one unpadded forward of the whole sequence."""
    with torch.no_grad():
        x = torch.tensor(ids)[None]
        logits = model(input_ids=x).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").numpy()


def test_single_window_equals_full_forward_with_padding(llama, real_texts):
    model, tok = llama
    texts = [t[:400] for t in real_texts[:12]]
    res = token_losses(model, tok, texts, max_length=256, overlap=16, batch_tokens=1024)
    ids = tokenize(tok, texts)
    assert len({len(x) for x in ids}) > 3  # different lengths: batches are padded
    for x, losses in zip(ids, res.losses):
        assert len(x) <= 256 and losses.dtype == np.float32 and len(losses) == len(x) - 1
        np.testing.assert_allclose(losses, _direct(model, x), atol=1e-5)


def test_padding_and_batch_composition_do_not_change_losses(llama, real_texts):
    model, tok = llama
    texts = [t[:400] for t in real_texts[20:30]]
    alone = [token_losses(model, tok, [t], max_length=256, overlap=16).losses[0] for t in texts]
    together = token_losses(model, tok, texts, max_length=256, overlap=16, batch_tokens=2048).losses
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_windows_match_direct_windowed_forwards(llama, real_texts):
    model, tok = llama
    text = max(real_texts, key=len)
    ids = tokenize(tok, [text])[0][:700]
    L, O = 128, 32
    res = token_losses(model, tok, [], max_length=L, overlap=O, batch_tokens=512, token_ids=[ids])
    losses = res.losses[0]
    assert len(losses) == len(ids) - 1 and res.tokens_scored == len(ids) - 1
    # Expected: token p scored in the window starting at s = the last window start with
    # s + O <= p (or window 0), computed by a direct forward of ids[s:s+L].
    stride = L - O
    for s in range(0, len(ids), stride):
        if s and s + O >= len(ids):
            break
        direct = _direct(model, ids[s:s + L])
        first = 1 if s == 0 else s + O
        last = min(s + L, len(ids)) - 1
        np.testing.assert_allclose(losses[first - 1:last], direct[first - s - 1:last - s], atol=1e-5)
    # Every token after the first window has at least O tokens of context, and the first
    # window matches a full forward of the prefix.
    np.testing.assert_allclose(losses[:L - 1], _direct(model, ids[:L]), atol=1e-5)


@pytest.mark.parametrize("n,L,O", [(2, 4, 1), (5, 4, 1), (7, 4, 3), (100, 16, 5), (16, 16, 4), (17, 16, 4)])
def test_windows_score_each_token_exactly_once(n, L, O):
    ids = np.arange(n)
    hits = np.zeros(n, dtype=int)
    for w in make_windows(0, ids, L, O):
        assert len(w.ids) <= L and w.first_scored - w.start >= (1 if w.start == 0 else O)
        hits[w.first_scored:w.start + len(w.ids)] += 1
    assert hits[0] == 0 and (hits[1:] == 1).all()
    with pytest.raises(StageError):
        make_windows(0, ids, 8, 8)


def test_bucketing_respects_token_budget_and_sorts_by_length():
    from selector.rho.token_losses import Window

    rng = np.random.default_rng(0)
    windows = [Window(i, 0, np.zeros(int(rng.integers(2, 100))), 1) for i in range(200)]
    batches = bucket_batches(windows, batch_tokens=400)
    assert sum(len(b) for b in batches) == 200
    for b in batches:
        longest = max(len(w.ids) for w in b)
        assert len(b) * longest <= 400 or len(b) == 1
    lengths = [len(w.ids) for b in batches for w in b]
    assert lengths == sorted(lengths, reverse=True)


def test_empty_and_short_documents_are_counted_skips(llama):
    model, tok = llama
    texts = ["", "a", "A real sentence with several tokens in it.", ""]
    ids = tokenize(tok, texts)
    assert len(ids[1]) == 1  # a single byte-level token
    res = token_losses(model, tok, texts, max_length=64, overlap=8)
    assert res.skipped == {"empty": 2, "too_short": 1}
    assert res.losses[0] is None and res.losses[1] is None and res.losses[3] is None
    assert len(res.losses[2]) == len(ids[2]) - 1 and np.isfinite(res.losses[2]).all()
    assert res.n_tokens == [len(x) for x in ids]
    nothing = token_losses(model, tok, [], max_length=64, overlap=8)
    assert nothing.losses == [] and nothing.tokens_scored == 0


def test_bos_option_prepends_bos(llama):
    model, tok = llama
    plain = tokenize(tok, ["hello world"])[0]
    with_bos = tokenize(tok, ["hello world"], add_bos=True)[0]
    assert with_bos[0] == tok.bos_token_id and (with_bos[1:] == plain).all()
    res = token_losses(model, tok, ["hello world"], max_length=64, overlap=8, add_bos=True)
    assert len(res.losses[0]) == len(plain)  # with BOS, the first real token is predicted too


def test_gpt2_losses_match_direct_forward(tiny_gpt2_dir, real_texts):
    model, tok = load_causal_lm(str(tiny_gpt2_dir)), load_tokenizer(str(tiny_gpt2_dir))
    texts = [t[:300] for t in real_texts[40:46]]
    res = token_losses(model, tok, texts, max_length=256, overlap=16, batch_tokens=1024)
    for x, losses in zip(tokenize(tok, texts), res.losses):
        np.testing.assert_allclose(losses, _direct(model, x), atol=1e-5)


def test_generic_fallback_path_gives_same_losses(llama, real_texts, monkeypatch):
    import selector.rho.token_losses as tl

    model, tok = llama
    texts = [t[:400] for t in real_texts[60:66]]
    fast = token_losses(model, tok, texts, max_length=64, overlap=16, batch_tokens=256).losses
    assert tl._plain_head(model)
    # A model type outside the plain-head list takes the full forward path.
    monkeypatch.setattr(tl, "_PLAIN_HEAD", set())
    assert not tl._plain_head(model)
    slow = token_losses(model, tok, texts, max_length=64, overlap=16, batch_tokens=256).losses
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, atol=1e-5)
