"""Rho-1 token selection: exact and sketched global top-k, per-batch mode, mask packing,
document scores, budget selection, and the masked loss under a real model forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selector.errors import ManifestError, StageError
from selector.rho.excess_loss import (ExcessHistogram, RhoConfig, excess_losses, masked_lm_loss, mean_scores, pack_mask,
                          select_by_score, topk_masks_exact, topk_masks_per_batch, unpack_mask)


def _docs(rng, n_docs=40, max_len=300, dist="normal"):
    out = []
    for _ in range(n_docs):
        n = int(rng.integers(1, max_len))
        if dist == "normal":
            out.append(rng.normal(0.0, 1.5, n).astype(np.float32))
        elif dist == "ties":  # heavy ties: quantised values
            out.append(np.round(rng.normal(0.0, 1.0, n), 1).astype(np.float32))
        else:  # heavy tail, partly outside the sketch range
            out.append((rng.standard_t(1.5, n) * 3).astype(np.float32))
    return out


@pytest.mark.parametrize("keep", [0.6, 0.7, 0.05, 1.0])
@pytest.mark.parametrize("dist", ["normal", "ties"])
def test_exact_global_keeps_exactly_k_and_the_highest(keep, dist):
    rng = np.random.default_rng(0)
    excess = _docs(rng, dist=dist)
    masks = topk_masks_exact(excess, keep)
    total = sum(len(x) for x in excess)
    kept = sum(int(m.sum()) for m in masks)
    assert kept == int(round(keep * total))
    for x, m in zip(excess, masks):
        assert len(m) == len(x) + 1 and not m[0]
    kept_vals = np.concatenate([x[m[1:]] for x, m in zip(excess, masks)])
    dropped_vals = np.concatenate([x[~m[1:]] for x, m in zip(excess, masks)])
    if len(dropped_vals):
        assert kept_vals.min() >= dropped_vals.max()


@pytest.mark.parametrize("dist", ["normal", "ties", "heavy"])
@pytest.mark.parametrize("keep", [0.6, 0.7, 0.3])
def test_sketch_merged_across_workers_meets_error_bound(dist, keep):
    rng = np.random.default_rng(1)
    excess = _docs(rng, n_docs=120, dist=dist)
    # Four "workers" build histograms of their own documents; the driver merges them.
    parts = [excess[i::4] for i in range(4)]
    hists = [ExcessHistogram(-5.0, 5.0, 2000).add(np.concatenate(p)) for p in parts]
    merged = hists[0]
    for h in hists[1:]:
        merged = merged.merge(h)
    whole = ExcessHistogram(-5.0, 5.0, 2000).add(np.concatenate(excess))
    np.testing.assert_array_equal(merged.counts, whole.counts)

    b, info = merged.threshold(keep)
    masks = merged.masks(excess, b)
    total = sum(len(x) for x in excess)
    kept = sum(int(m.sum()) for m in masks)
    target = int(round(keep * total))
    assert info["kept"] == kept and info["total"] == total
    # The documented bound: target <= kept <= target + mass of the threshold bin.
    assert target <= kept <= target + merged.counts[b]
    assert kept / total - keep <= info["max_excess_fraction"] + 1 / total
    # And it agrees with the exact masks except for tokens inside the threshold bin.
    exact = topk_masks_exact(excess, keep)
    for x, ms, me in zip(excess, masks, exact):
        differ = ms[1:] != me[1:]
        assert (merged.bin_index(x[differ]) == b).all()


def test_sketch_bound_is_tight_for_continuous_data():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 200_000)
    h = ExcessHistogram(-20.0, 20.0, 40_000).add(x)
    b, info = h.threshold(0.6)
    # Bin width 1e-3 nats: the overshoot is a tiny fraction of the tokens.
    assert info["max_excess_fraction"] < 1e-3
    assert 0.6 <= info["kept"] / info["total"] <= 0.6 + 1e-3
    h2 = ExcessHistogram.from_dict(h.to_dict())
    np.testing.assert_array_equal(h2.counts, h.counts)
    with pytest.raises(StageError):
        h.merge(ExcessHistogram(-10.0, 10.0, 40_000))
    with pytest.raises(StageError):
        h.add(np.array([np.nan]))


def test_per_batch_mode_exact_within_each_batch():
    rng = np.random.default_rng(3)
    excess = _docs(rng, n_docs=30)
    masks = topk_masks_per_batch(excess, 0.6, batch_tokens=1000)
    # Recompute the batches: consecutive docs until >= 1000 scored tokens.
    start, acc, n_batches = 0, 0, 0
    for i, x in enumerate(excess):
        acc += len(x)
        if acc >= 1000 or i == len(excess) - 1:
            batch_total = sum(len(y) for y in excess[start:i + 1])
            batch_kept = sum(int(m.sum()) for m in masks[start:i + 1])
            assert batch_kept == int(round(0.6 * batch_total))
            start, acc, n_batches = i + 1, 0, n_batches + 1
    assert n_batches > 2
    # Per-batch differs from global in general (thresholds differ per batch).
    glob = topk_masks_exact(excess, 0.6)
    assert any((a != b).any() for a, b in zip(glob, masks))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_packbits_round_trip_little_bit_order(n):
    rng = np.random.default_rng(n)
    mask = rng.random(n) < 0.6
    packed = pack_mask(mask)
    assert len(packed) == (n + 7) // 8
    np.testing.assert_array_equal(unpack_mask(packed, n), mask)
    # Little bit order: token i is bit i % 8 of byte i // 8.
    one = np.zeros(n, dtype=bool)
    one[n - 1] = True
    assert pack_mask(one)[(n - 1) // 8] == 1 << ((n - 1) % 8)
    with pytest.raises(ManifestError):
        unpack_mask(packed + b"\x00", n)


def test_excess_and_doc_scores_and_budget_selection():
    train = [np.array([3.0, 2.0], np.float32), None, np.array([1.0, 1.0, 4.0], np.float32)]
    ref = [np.array([1.0, 1.0], np.float32), None, np.array([1.0, 2.0, 1.0], np.float32)]
    ex = excess_losses(train, ref)
    assert ex[1] is None
    np.testing.assert_allclose(ex[0], [2.0, 1.0])
    scores = mean_scores(ex)
    np.testing.assert_allclose(scores[[0, 2]], [1.5, 2.0 / 3.0])
    assert np.isnan(scores[1])
    np.testing.assert_allclose(mean_scores(ref)[[0, 2]], [1.0, 4.0 / 3.0])
    with pytest.raises(StageError):
        excess_losses([np.zeros(3)], [np.zeros(2)])

    ids = ["a", "b", "c", "d", "e"]
    s = [5.0, 4.0, np.nan, 4.0, 1.0]
    toks = [10, 50, 5, 20, 15]
    # Order: a(5) then b, d tie at 4 -> by id; b (50) overflows a budget of 45, d and e fit.
    np.testing.assert_array_equal(select_by_score(ids, s, toks, 45), [0, 3, 4])
    # Ascending: e (15 tokens), b and d overflow 25, a (10) still fits.
    np.testing.assert_array_equal(select_by_score(ids, s, toks, 25, descending=False), [4, 0])
    assert len(select_by_score(ids, s, toks, 0)) == 0


def test_config_validation():
    cfg = RhoConfig(reference_model="r", training_model="t")
    assert 0.6 <= cfg.keep_ratio <= 0.7
    with pytest.raises(ValueError):
        RhoConfig(reference_model="r", training_model="t", max_length=64, overlap=64)
    with pytest.raises(ValueError):
        RhoConfig(reference_model="r", training_model="t", keep_ratio=1.5)
    with pytest.raises(ValueError):
        RhoConfig(reference_model="r", training_model="t", unknown_key=1)


def test_masked_loss_equals_mean_over_kept_tokens_real_model(tiny_llama_dir, real_texts):
    from selector.models.loading import load_causal_lm, load_tokenizer
    from selector.rho.token_losses import token_losses, tokenize

    model = load_causal_lm(str(tiny_llama_dir))
    tok = load_tokenizer(str(tiny_llama_dir))
    ids = [x[:48] for x in tokenize(tok, real_texts[:4])]
    res = token_losses(model, tok, [], max_length=64, overlap=8, token_ids=ids)
    masks = topk_masks_exact(res.losses, 0.6)
    batch = torch.tensor(np.stack(ids))
    mask_t = torch.tensor(np.stack(masks))
    with torch.no_grad():
        logits = model(input_ids=batch).logits
        slm = masked_lm_loss(logits, batch, mask_t)
        # A trainer's view: HF labels with -100 on dropped tokens.
        labels = torch.where(mask_t, batch, torch.full_like(batch, -100))
        hf = model(input_ids=batch, labels=labels).loss
    kept_mean = np.concatenate([l[m[1:]] for l, m in zip(res.losses, masks)]).mean()
    assert abs(float(slm) - float(kept_mean)) < 1e-5
    assert abs(float(hf) - float(kept_mean)) < 1e-5
