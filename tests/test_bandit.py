"""UCB bandit: the formula, scale-free rewards, exhaustion, propagation, determinism, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from selector.quad.bandit import RewardNormaliser, UCBBandit, arm_priority, robust_scale


def _simulate(bandit: UCBBandit, draws: dict[int, np.ndarray], steps: int, m: int, reward) -> list[list[int]]:
    """Pull the top-m arms ``steps`` times; an arm's k-th pull yields ``draws[arm][k]``."""
    taken = {a: 0 for a in draws}
    chosen = []
    for _ in range(steps):
        arms = [a for a, _ in bandit.select(m)]
        for a in arms:
            bandit.update(a, reward(draws[a][taken[a]]))
            taken[a] += 1
        chosen.append(arms)
    return chosen


def _draws(n_arms: int = 8, n: int = 200, seed: int = 0, scale: float = 1e-3) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.linspace(-1.0, 1.0, n_arms)
    return {a: (means[a] + rng.normal(size=n)) * scale for a in range(n_arms)}


def test_ucb_score_matches_a_hand_computation():
    b = UCBBandit([0, 1, 2], alpha=0.7, seed=3)
    b.update(0, 0.5)
    b.update(1, -0.2)
    b.update(0, 1.0)
    total = 3
    expected = {
        0: (0.5 + 1.0) / 2 + 0.7 * math.sqrt(2 * math.log(total) / (2 + 1)),
        1: -0.2 + 0.7 * math.sqrt(2 * math.log(total) / (1 + 1)),
        2: 0.0 + 0.7 * math.sqrt(2 * math.log(total) / (0 + 1)),
    }
    got = dict(zip(b.arms.tolist(), b.scores().tolist()))
    for arm, value in expected.items():
        assert got[arm] == pytest.approx(value, rel=1e-12)
    ranked = sorted(expected, key=lambda a: -expected[a])
    assert [a for a, _ in b.select(3)] == ranked
    assert [s for _, s in b.select(3)] == pytest.approx([expected[a] for a in ranked], rel=1e-12)


def test_no_pulls_means_no_bonus_and_ties_follow_the_seeded_priority():
    b = UCBBandit(range(6), alpha=2.0, seed=11)
    assert np.all(b.scores() == 0.0)  # ln(max(0, 1)) = 0 and no reward yet
    by_priority = sorted(range(6), key=lambda a: arm_priority(11, a))
    assert [a for a, _ in b.select(6)] == by_priority
    orders = {tuple(a for a, _ in UCBBandit(range(6), seed=s).select(6)) for s in range(8)}
    assert len(orders) > 1  # the seed, not the arm id, breaks ties


def test_normalised_rewards_make_selection_invariant_to_the_influence_scale():
    draws = _draws(scale=1e-3)
    big = {a: v * 1000.0 for a, v in draws.items()}
    warm = np.concatenate([v[:20] for v in draws.values()])  # a warm-up sample of raw influences
    tau = float(np.quantile(warm, 0.8))

    def run(d, warmup, t):
        norm = RewardNormaliser.from_warmup(warmup, t)
        return _simulate(UCBBandit(d.keys(), alpha=1.0, seed=5), d, steps=60, m=2, reward=norm)

    small_run = run(draws, warm, tau)
    assert run(big, warm * 1000.0, tau * 1000.0) == small_run
    # The same alpha on raw rewards is not scale-free: at 1e-3 it only explores, at 1 it exploits.
    raw_small = _simulate(UCBBandit(draws.keys(), alpha=1.0, seed=5), draws, 60, 2, lambda x: x - tau)
    raw_big = _simulate(UCBBandit(big.keys(), alpha=1.0, seed=5), big, 60, 2, lambda x: x - tau * 1000.0)
    assert raw_small != raw_big
    # And normalisation lets the bandit find the best arms: the top two arms get most pulls.
    pulls = np.bincount(np.ravel(small_run), minlength=8)
    assert pulls[6:].sum() > pulls[:6].sum()


def test_robust_scale_and_its_guards():
    x = np.arange(1.0, 9.0)
    q25, q75 = 1 + 0.25 * 7, 1 + 0.75 * 7  # linear-interpolated quartiles of 1..8
    assert robust_scale(x) == pytest.approx((q75 - q25) / 1.349)
    assert robust_scale(x * 1000) == pytest.approx(1000 * robust_scale(x))
    spiky = np.array([0.0] * 10 + [5.0])  # IQR 0: falls back to the standard deviation
    assert robust_scale(spiky) == pytest.approx(np.std(spiky))
    assert robust_scale([3e-3] * 5) == pytest.approx(3e-3)  # all equal: keeps the values' scale
    assert robust_scale([0.0, 0.0]) == 1.0
    assert robust_scale([]) == 1.0
    with pytest.raises(ValueError):
        RewardNormaliser(0.0, 0.0)


def test_exhausted_arms_leave_the_bandit():
    b = UCBBandit([0, 1, 2], alpha=1.0, seed=0)
    b.update(1, 5.0)  # arm 1 is by far the best ...
    assert b.select(1)[0][0] == 1
    b.remove(1)  # ... but exhausted
    assert b.scores()[b.index(1)] == -np.inf
    assert b.n_active() == 2 and b.active_arms() == [0, 2]
    for _ in range(5):
        assert 1 not in [a for a, _ in b.select(3)]
        for a, _ in b.select(3):
            b.update(a, 0.1)
    with pytest.raises(ValueError):
        b.update(1, 1.0)
    b.remove(0)
    b.remove(2)
    assert b.select(3) == []


def test_reward_propagates_to_neighbours_with_weight_one_minus_d_over_r_and_no_pull():
    r = 0.2
    pairs = [(0, 1, 0.05), (0, 2, 0.15), (0, 3, 0.25), (2, 3, 0.1)]
    b = UCBBandit(range(5), alpha=1.0, seed=0, neighbours=pairs, radius=r, propagate=True)
    spread = b.update(0, 2.0)
    assert spread == [(1, pytest.approx(1 - 0.05 / r)), (2, pytest.approx(1 - 0.15 / r))]  # 3 is beyond r
    w1, w2 = 1 - 0.05 / r, 1 - 0.15 / r
    assert b.weight[b.index(1)] == pytest.approx(w1) and b.weighted_sum[b.index(1)] == pytest.approx(2.0 * w1)
    assert b.means()[b.index(1)] == pytest.approx(2.0)
    assert b.pulls.tolist() == [1, 0, 0, 0, 0] and b.total_pulls == 1  # propagation is not a pull
    assert b.weight[b.index(3)] == 0 and b.weight[b.index(4)] == 0
    # A later direct pull mixes with the propagated reward as a weighted mean.
    assert b.update(1, -1.0) == [(0, pytest.approx(w1))]
    assert b.means()[b.index(1)] == pytest.approx((w1 * 2.0 - 1.0) / (w1 + 1.0))
    # Pairs count in both directions; exhausted neighbours receive nothing.
    b.remove(0)
    weight_0 = b.weight[b.index(0)]
    spread = b.update(2, 1.0)
    assert spread == [(3, pytest.approx(1 - 0.1 / r))]
    assert b.weight[b.index(0)] == weight_0 == pytest.approx(1.0 + w1)
    # Without propagation only the pulled arm moves.
    plain = UCBBandit(range(5), seed=0, neighbours=pairs, radius=r, propagate=False)
    assert plain.update(0, 2.0) == []
    assert plain.weight.tolist() == [1.0, 0, 0, 0, 0]


def test_neighbours_from_a_table_arrays_or_triples_give_the_same_bandit():
    import pyarrow as pa

    pairs = [(0, 1, 0.05), (1, 0, 0.07), (0, 2, 0.15), (2, 3, 0.1), (3, 9, 0.01), (4, 4, 0.0)]
    table = pa.table({"cluster": [p[0] for p in pairs], "neighbour": [p[1] for p in pairs],
                      "distance": [p[2] for p in pairs]})
    arrays = tuple(np.array(col) for col in zip(*pairs))
    bandits = [UCBBandit(range(5), neighbours=n, radius=0.2, propagate=True) for n in (pairs, table, arrays)]
    want = [[0, 1, 0.05], [0, 2, 0.15], [1, 0, 0.05], [2, 0, 0.15], [2, 3, 0.1], [3, 2, 0.1]]
    for b in bandits:  # symmetric, closest distance per pair, unknown arms and self-pairs dropped
        assert b.neighbour_triples() == want
        assert b.n_neighbour_pairs() == 6
        assert b.neighbours_fingerprint() == bandits[0].neighbours_fingerprint()
    assert UCBBandit(range(5), neighbours=[], radius=0.2).n_neighbour_pairs() == 0
    assert UCBBandit(range(5), neighbours=pairs[2:], radius=0.2).neighbours_fingerprint() \
        != bandits[0].neighbours_fingerprint()


def test_same_seed_same_choices():
    draws = _draws(seed=4)
    pairs = [(a, a + 1, 0.1) for a in range(7)]
    runs = [_simulate(UCBBandit(draws, alpha=0.5, seed=9, neighbours=pairs, propagate=True), draws, 40, 3,
                      lambda x: x * 1000) for _ in range(2)]
    assert runs[0] == runs[1]


def test_json_round_trip_mid_run_equals_the_uninterrupted_run():
    draws = _draws(seed=7)
    pairs = [(a, b, abs(a - b) * 0.06) for a in range(8) for b in range(8) if a != b]
    reward = lambda x: x * 1000  # noqa: E731

    def fresh():
        return UCBBandit(draws, alpha=0.8, seed=2, neighbours=pairs, radius=0.2, propagate=True)

    first = fresh()
    head = _simulate(first, draws, 20, 2, reward)
    first.remove(7)  # exhaustion is part of the state too
    whole_cut = fresh()
    _simulate(whole_cut, draws, 20, 2, reward)
    whole_cut.remove(7)
    taken = {a: sum(row.count(a) for row in head) for a in draws}
    restored = UCBBandit.from_dict(json.loads(json.dumps(first.to_dict())))
    lean = UCBBandit.from_dict(json.loads(json.dumps(first.to_dict(include_neighbours=False))), neighbours=pairs)
    assert restored.to_dict() == first.to_dict() == lean.to_dict()

    def continue_(b):
        t = dict(taken)
        rows = []
        for _ in range(30):
            arms = [a for a, _ in b.select(2)]
            for a in arms:
                b.update(a, reward(draws[a][t[a]]))
                t[a] += 1
            rows.append(arms)
        return rows

    assert continue_(restored) == continue_(whole_cut) == continue_(lean)
    assert restored.to_dict() == whole_cut.to_dict()
    with pytest.raises(ValueError):
        UCBBandit.from_dict(first.to_dict(include_neighbours=False))
