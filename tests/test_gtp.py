"""GTP pursuit (selector.gtp.pursuit): recovery, joint selection, NNLS, budget rule, errors, fast path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.optimize import nnls

from selector.errors import StageError
from selector.gtp.pursuit import (GTPConfig, fit_weights, local_k, partition_indices, pursue, pursue_under_budget,
                          relative_residual, top_positive, topk_cosine, two_level_pursuit)


def planted(seed: int, n: int = 1000, d: int = 100, k: int = 8, dtype=np.float64):
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((n, d)).astype(dtype)
    support = np.sort(rng.choice(n, k, replace=False))
    w = rng.uniform(1.0, 2.0, k)
    y = phi[support].astype(np.float64).T @ w
    return phi, y, support, w


# --------------------------------------------------------------------------- acceptance 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_recovery_of_planted_nonnegative_support(seed):
    phi, y, support, w = planted(seed)
    res = pursue(phi, y, k=8)
    assert np.array_equal(np.sort(res.support), support)
    np.testing.assert_allclose(res.weights[np.argsort(res.support)], w, rtol=1e-8)
    assert res.rel_residual < 1e-10
    assert res.stop_reason == "tol"


def test_exact_recovery_needs_iterations_when_proxy_is_misleading():
    # Planted weights spanning two orders of magnitude: the first proxy misses the small ones,
    # so recovery needs the iterate/merge/prune loop, not a single NNLS.
    rng = np.random.default_rng(7)
    n, d, k = 2000, 60, 12
    phi = rng.standard_normal((n, d))
    support = np.sort(rng.choice(n, k, replace=False))
    w = np.geomspace(100.0, 0.5, k)
    y = phi[support].T @ w
    first = np.sort(top_positive(phi @ y / np.linalg.norm(phi, axis=1), 2 * k))
    assert not set(support) <= set(first)  # the first proxy alone would not find it
    res = pursue(phi, y, k=k, max_iter=50)
    assert np.array_equal(np.sort(res.support), support)
    assert res.rel_residual < 1e-8 and res.n_iter > 1


def test_duplicates_gtp_picks_one_of_each_pair_topk_picks_both():
    rng = np.random.default_rng(3)
    d, k, n_distract = 120, 10, 2000
    base = rng.standard_normal((k, d))
    twins = base + 1e-3 * rng.standard_normal((k, d))           # near-duplicate documents
    distract = rng.standard_normal((n_distract, d))
    phi = np.concatenate([base, twins, distract])                  # pair i = rows (i, k + i)
    y = base.T @ rng.uniform(1.0, 2.0, k)
    res = pursue(phi, y, k=k)
    top = topk_cosine(phi, y, k)
    pairs = [(i, k + i) for i in range(k)]
    gtp_both = [p for p in pairs if set(p) <= set(res.support)]
    gtp_one = [p for p in pairs if len(set(p) & set(res.support)) == 1]
    top_both = [p for p in pairs if set(p) <= set(top)]
    assert gtp_both == [] and len(gtp_one) == k                    # one of each pair, every pair
    assert len(top_both) >= 2                                      # top-k spends k on redundant twins
    _, top_rel = fit_weights(phi, y, top)
    assert res.rel_residual < 1e-3 < top_rel                       # and is worse for it


# --------------------------------------------------------------------------- NNLS weights


def test_weights_nonnegative_and_kkt_on_mixed_sign_target():
    rng = np.random.default_rng(11)
    phi = rng.standard_normal((400, 50))
    y = phi[:20].T @ rng.standard_normal(20)                       # needs negative weights to fit exactly
    res = pursue(phi, y, k=15)
    assert np.all(res.weights > 0) and res.support.size <= 15
    r = y - phi[res.support].T @ res.weights
    assert np.allclose(phi[res.support] @ r, 0, atol=1e-8)         # NNLS optimality on its support
    assert res.rel_residual == pytest.approx(relative_residual(phi, y, res.support, res.weights))
    assert res.rel_residual == min(res.residual_history)
    assert np.all(np.diff(-res.weights) >= 0)                      # ordered by decreasing weight


def test_weights_on_original_scale_with_and_without_normalisation():
    phi, y, support, w = planted(4, n=500, d=80, k=5)
    scales = np.random.default_rng(0).uniform(0.1, 10.0, 500)
    phi_s = phi * scales[:, None]                                   # columns of very different norms
    for normalize in (True, False):
        res = pursue(phi_s, y, k=5, normalize=normalize)
        assert np.array_equal(np.sort(res.support), support)
        np.testing.assert_allclose(res.weights[np.argsort(res.support)], w / scales[support], rtol=1e-8)


def test_zero_columns_never_selected_and_optimal_stop():
    rng = np.random.default_rng(5)
    phi = rng.standard_normal((50, 30))
    phi[::2] = 0.0
    y = np.abs(rng.standard_normal(30))
    res = pursue(phi, y, k=40)
    assert np.all(res.support % 2 == 1)
    assert res.stop_reason in ("optimal", "support_unchanged", "tol")
    # with k >= #columns the pursuit solves the full NNLS
    full, _ = nnls(phi[1::2].T, y)
    assert res.rel_residual == pytest.approx(np.linalg.norm(phi[1::2].T @ full - y) / np.linalg.norm(y), abs=1e-9)


def test_float32_features_recover_and_return_float64_weights():
    phi, y, support, w = planted(6, dtype=np.float32)
    res = pursue(phi, y, k=8)
    assert np.array_equal(np.sort(res.support), support)
    assert res.weights.dtype == np.float64 and res.rel_residual < 1e-6


# --------------------------------------------------------------------------- fast path pinned to a naive loop


def naive_cosamp(phi, y, k, max_iter, tol):
    """CoSaMP + NNLS written as plain loops over columns (no argpartition, no vectorised proxy)."""
    n = phi.shape[0]
    cols = []
    for j in range(n):
        norm = math.sqrt(sum(float(v) * float(v) for v in phi[j]))
        cols.append(phi[j] / norm if norm > 0 else None)
    y_norm = math.sqrt(sum(v * v for v in y))
    support, coef, r = [], [], y.copy()
    best = (1.0, [], [])
    history = [1.0]
    for _ in range(max_iter):
        proxy = [(float(np.dot(cols[j], r)) if cols[j] is not None else 0.0, j) for j in range(n)]
        omega = [j for u, j in sorted(proxy, key=lambda t: (-t[0], t[1])) if u > 0][: 2 * k]
        if not omega:
            break
        merged = sorted(set(omega) | set(support))
        b, _ = nnls(np.column_stack([cols[j] for j in merged]), y)
        ranked = sorted([(bj, j) for bj, j in zip(b, merged) if bj > 0], key=lambda t: (-t[0], t[1]))[:k]
        new = sorted(j for _, j in ranked)
        c, _ = nnls(np.column_stack([cols[j] for j in new]), y)
        new = [j for j, cj in zip(new, c) if cj > 0]
        c = [cj for cj in c if cj > 0]
        r = y.copy()
        for j, cj in zip(new, c):
            r = r - cj * cols[j]
        rel = math.sqrt(sum(v * v for v in r)) / y_norm
        history.append(rel)
        if rel < best[0]:
            best = (rel, new, c)
        unchanged = new == support
        support, coef = new, c
        if rel <= tol or unchanged:
            break
    rel, sup, c = best
    weights = {j: cj / math.sqrt(sum(float(v) ** 2 for v in phi[j])) for j, cj in zip(sup, c)}
    return weights, rel, history


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_pursuit_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    # correlated columns (shared low-rank factors + noise), so the pursuit takes several iterations
    n, d, k = 300, 40, 6
    phi = rng.standard_normal((n, 5)) @ rng.standard_normal((5, d)) + 0.5 * rng.standard_normal((n, d))
    y = phi.mean(axis=0) + 0.3 * rng.standard_normal(d)
    res = pursue(phi, y, k=k, max_iter=20, tol=1e-9)
    weights, rel, history = naive_cosamp(phi, y, k, max_iter=20, tol=1e-9)
    assert dict(zip(res.support.tolist(), res.weights.tolist())) == pytest.approx(weights, rel=1e-8)
    assert res.rel_residual == pytest.approx(rel, rel=1e-10)
    np.testing.assert_allclose(res.residual_history, history, rtol=1e-10)


def test_top_positive_matches_sort():
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = rng.standard_normal(int(rng.integers(1, 200)))
        m = int(rng.integers(1, 60))
        expect = [j for j in np.argsort(-u, kind="stable") if u[j] > 0][:m]
        assert sorted(top_positive(u, m).tolist()) == sorted(expect)


# --------------------------------------------------------------------------- token budget


def test_budget_rule_respects_budget_and_refits():
    rng = np.random.default_rng(1)
    phi = rng.standard_normal((600, 60))
    y = phi[:30].T @ rng.uniform(0.5, 1.5, 30)
    tokens = rng.integers(20, 400, 600)
    res = pursue_under_budget(phi, y, tokens, budget_tokens=3000)
    assert res.tokens_selected <= 3000 and res.tokens_selected == int(tokens[res.support].sum())
    np.testing.assert_array_equal(res.n_tokens, tokens[res.support])
    w, rel = fit_weights(phi, y, res.support)
    np.testing.assert_allclose(res.weights, w, rtol=1e-9)          # weights belong to the kept set
    assert res.rel_residual == pytest.approx(rel) and np.all(res.weights > 0)
    assert res.k == math.floor(3000 / tokens.mean()) or res.rounds > 1


def test_budget_first_fit_skips_a_heavy_document_that_does_not_fit():
    # First-fit by weight: keep the heaviest document, skip the second (it no longer fits next
    # to the first), and still take the lighter, shorter ones after it.
    rng = np.random.default_rng(2)
    d = 80
    phi = rng.standard_normal((300, d))
    w = np.array([4.0, 3.0, 2.0, 1.0])
    y = phi[:4].T @ w
    tokens = np.full(300, 100)
    tokens[1] = 950                                                 # second-heaviest is long
    res = pursue_under_budget(phi, y, tokens, budget_tokens=1000, max_rounds=1)
    assert 1 in res.pursuit.support                                 # the pursuit wanted it ...
    assert 0 in res.support and 1 not in res.support                # ... but 100 + 950 > 1000
    assert {2, 3} <= set(res.support.tolist())
    assert res.tokens_selected <= 1000


def test_budget_grows_k_when_budget_left_over():
    rng = np.random.default_rng(3)
    d = 200
    phi = rng.standard_normal((400, d))
    y = phi[:60].T @ rng.uniform(1, 2, 60)
    tokens = np.where(np.arange(400) < 60, 10, 1000)               # planted docs short, rest long
    one = pursue_under_budget(phi, y, tokens, budget_tokens=2000, max_rounds=1)
    many = pursue_under_budget(phi, y, tokens, budget_tokens=2000, max_rounds=5)
    assert one.k == 2000 // int(tokens.mean())                     # k from budget / mean tokens
    assert many.rounds > 1 and many.k > one.k
    assert many.tokens_selected > one.tokens_selected
    assert many.rel_residual < one.rel_residual
    assert many.tokens_selected <= 2000


# --------------------------------------------------------------------------- two-level, in one process


def test_two_level_one_partition_equals_single_machine():
    phi, y, _, _ = planted(8, n=400, d=40, k=10)
    y = y + 0.5 * np.random.default_rng(0).standard_normal(40)    # not exactly sparse
    single = pursue(phi, y, k=10)
    two = two_level_pursuit(phi, y, 10, n_partitions=1, oversample=1.0)
    # one partition nominating exactly k candidates: the global pursuit refits the same support
    assert set(two.support.tolist()) == set(single.support.tolist())
    assert two.rel_residual == pytest.approx(single.rel_residual, rel=1e-9)


def test_two_level_recovers_planted_support():
    phi, y, support, w = planted(9, n=3000, d=100, k=8)
    two = two_level_pursuit(phi, y, 8, n_partitions=6, oversample=2.0, seed=1)
    assert np.array_equal(np.sort(two.support), support) and two.rel_residual < 1e-10
    assert all(kl == 16 for kl in two.local_k) and two.n_candidates <= 6 * 16
    parts = two.partitions
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(3000))


def test_partition_and_local_k():
    parts = partition_indices(10, 3, seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(10))
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition_indices(10, 3, seed=0)]
    assert local_k(5, 100, 2.0) == 10 and local_k(5, 7, 2.0) == 7 and local_k(3, 100, 1.5) == 5


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    phi, y, _, _ = planted(0, n=50, d=10, k=3)
    with pytest.raises(StageError, match="exceeds the number of documents"):
        pursue(phi, y, k=51)
    with pytest.raises(StageError, match=">= 1"):
        pursue(phi, y, k=0)
    with pytest.raises(StageError, match="integer"):
        pursue(phi, y, k=2.5)
    with pytest.raises(StageError, match="all zeros"):
        pursue(phi, np.zeros(10), k=3)
    bad = phi.copy()
    bad[17, 3] = np.nan
    with pytest.raises(StageError, match="row 17"):
        pursue(bad, y, k=3)
    with pytest.raises(StageError, match="NaN or inf"):
        pursue(phi, np.where(np.arange(10) == 2, np.inf, y), k=3)
    with pytest.raises(StageError, match="empty"):
        pursue(np.zeros((0, 10)), y, k=1)
    with pytest.raises(StageError, match="length 10"):
        pursue(phi, y[:9], k=3)
    with pytest.raises(StageError, match="2-D"):
        pursue(phi[0], y, k=1)
    with pytest.raises(StageError, match="n_tokens must be >= 0"):
        pursue_under_budget(phi, y, -np.ones(50, dtype=int), 100)
    with pytest.raises(StageError, match="one entry per document"):
        pursue_under_budget(phi, y, np.ones(49, dtype=int), 100)
    with pytest.raises(StageError, match="budget_tokens"):
        pursue_under_budget(phi, y, np.ones(50, dtype=int), 0)
    with pytest.raises(StageError, match="no document fits"):
        pursue_under_budget(phi, y, np.full(50, 500), 100)
    with pytest.raises(StageError, match="exactly one"):
        two_level_pursuit(phi, y, 3, n_partitions=2, budget_tokens=100, n_tokens=np.ones(50, dtype=int))


def test_config_validation():
    cfg = GTPConfig(checkpoints=["a", "b"], k=10)
    assert cfg.pursuit_kwargs() == {"max_iter": 30, "tol": 1e-6, "normalize": True, "refit": True}
    with pytest.raises(ValidationError):
        GTPConfig(checkpoints=["only-one"])
    with pytest.raises(ValidationError):
        GTPConfig(checkpoints=["a", "a"])
    with pytest.raises(ValidationError):
        GTPConfig(checkpoints=["a", "b"], oversampel=2.0)
    with pytest.raises(ValidationError):
        GTPConfig(checkpoints=["a", "b"], target="median")
