"""Quad's round logic: planning, sampling, tau, the budget, resuming, and a synthetic experiment."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from selector.data.index import hash_keys, hash_order_prefix
from selector.quad.loop import QuadConfig, QuadSelector, StateMismatch, auto_tau, load_cluster_inputs, sample_size
from selector.data.workdir import WorkDir

from _quad_helpers import write_cluster_stage


def _corpus(sizes, seed=0, tokens=(20, 200)):
    """Documents in clusters of the given sizes, with random token counts."""
    rng = np.random.default_rng(seed)
    ids, clusters = [], []
    for c, n in enumerate(sizes):
        ids += [f"c{c}/doc{i}" for i in range(n)]
        clusters += [c] * n
    order = rng.permutation(len(ids))  # the input order must not matter
    ids = [ids[i] for i in order]
    clusters = np.array(clusters)[order]
    return ids, clusters, rng.integers(tokens[0], tokens[1], len(ids))


def _noise(doc_id: str) -> float:
    """A fixed standard-normal-ish value per document (sum of uniforms from its hash)."""
    h = hashlib.blake2b(doc_id.encode(), digest_size=16).digest()
    return (sum(h) / len(h) - 127.5) / 73.9 * math.sqrt(len(h))


def _influence(means, scale=1e-3):
    """Influence = cluster's true mean + per-document noise, at the raw ~1e-3 scale."""
    def score(cluster: int, doc_id: str) -> float:
        return (means[cluster] + _noise(doc_id)) * scale
    return score


def _run(q: QuadSelector, score, stop_after: int | None = None) -> QuadSelector:
    while (plan := q.plan_round()) is not None:
        if stop_after is not None and plan.round >= stop_after:
            break
        q.apply_round([[score(it.cluster, d) for d in it.sample] for it in plan.items])
    return q


def test_round_plan_takes_the_next_block_of_each_top_arm_in_hash_order():
    ids, clusters, tokens = _corpus([10, 25, 7])
    cfg = QuadConfig(accept="block", arms_per_round=2, block_size=8, sample_ratio=0.25, tau=0.0, reward_scale=1.0,
                     warmup_size=0)
    q = QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9, seed=3)
    plan = q.plan_round()
    assert plan.kind == "bandit" and plan.round == 1 and len(plan.items) == 2
    assert plan == q.plan_round()  # planning is pure
    keys = dict(zip(ids, hash_keys(ids, 3)))
    for it in plan.items:
        queue = sorted((d for d, c in zip(ids, clusters) if c == it.cluster), key=keys.get)
        assert it.block == queue[:8] and (it.start, it.stop) == (0, min(8, len(queue)))
        assert len(it.sample) == math.ceil(0.25 * len(it.block)) and set(it.sample) <= set(it.block)
    # After the round each pulled cluster's cursor moved one block on.
    q.apply_round([[1.0] * len(it.sample) for it in plan.items])
    pulled = {it.cluster for it in plan.items}
    nxt = {it.cluster: it for it in q.plan_round().items}
    for c in pulled & set(nxt):
        assert nxt[c].start == 8


def test_sample_sizes_follow_gamma_with_a_minimum():
    assert sample_size(64, 0.05, 1) == math.ceil(0.05 * 64)  # 3.2 -> 4
    assert sample_size(60, 0.05, 1) == 3  # float noise (3.0000000000000004) does not add one
    assert sample_size(10, 0.05, 1) == 1
    assert sample_size(10, 0.05, 3) == 3
    assert sample_size(2, 0.5, 5) == 2  # never more than the block
    ids, clusters, tokens = _corpus([50, 37, 81, 5], seed=1)
    cfg = QuadConfig(accept="block", arms_per_round=3, block_size=20, sample_ratio=0.1, min_sample=1, tau=-1.0,
                     reward_scale=1.0, warmup_size=0)
    q = QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9, seed=0)
    seen = 0
    while (plan := q.plan_round()) is not None:
        for it in plan.items:
            assert len(it.sample) == max(1, math.ceil(0.1 * len(it.block) - 1e-9))
            assert len(set(it.sample)) == len(it.sample)
            seen += 1
        q.apply_round([[0.0] * len(it.sample) for it in plan.items])
    assert seen == sum(math.ceil(n / 20) for n in (50, 37, 81, 5))  # every block planned once


def test_auto_tau_is_the_top_20_percent_boundary():
    scores = np.random.default_rng(0).normal(size=1000) * 1e-3
    tau = auto_tau(scores, 0.2)
    assert int((scores > tau).sum()) == 200
    ranked = np.sort(scores)
    assert ranked[799] <= tau <= ranked[800]
    assert auto_tau(scores, 0.05) > tau
    with pytest.raises(ValueError):
        auto_tau([])
    with pytest.raises(ValueError):
        auto_tau([1.0, float("nan")])


def test_warmup_is_the_front_of_every_queue_calibrates_and_its_scores_count():
    ids, clusters, tokens = _corpus([100, 200, 300], seed=2)
    cfg = QuadConfig(accept="documents", warmup_size=120, tau_slack=2.0)
    budget = int(tokens.sum() * 0.1)
    q = QuadSelector(cfg, ids, clusters, tokens, budget_tokens=budget, seed=4)
    plan = q.plan_round()
    assert plan.kind == "warmup" and plan.round == 0
    sampled = [d for it in plan.items for d in it.sample]
    keys = dict(zip(ids, hash_keys(ids, 4)))
    assert sorted(sampled, key=keys.get) == sorted(ids, key=keys.get)[:120]  # the 120 smallest keys
    for it in plan.items:  # ... which are the front of each cluster's queue
        assert it.sample == q.queues.doc_ids[q.queues.slice(it.cluster, 0, len(it.sample))].tolist()
    score = _influence([0.0, 0.5, 1.0])
    record = q.apply_round([[score(it.cluster, d) for d in it.sample] for it in plan.items])
    warm = np.array([score(it.cluster, d) for it in plan.items for d in it.sample])
    warm_tokens = np.array([dict(zip(ids, tokens.tolist()))[d] for it in plan.items for d in it.sample])
    # tau_doc: a share min(1, slack x budget share) = 0.2 of the warm-up tokens lies above it
    assert record["pass_rate"] == pytest.approx(2.0 * q.budget_share)
    assert warm_tokens[warm > q.tau].sum() / warm_tokens.sum() == pytest.approx(record["pass_rate"], abs=0.03)
    assert record["tau_doc"] == q.tau
    # every warm-up score counts: each cluster's arm got one pull, the cursors moved past the warm-up,
    # and the warm-up documents above tau are kept with their own scores
    assert q.bandit.total_pulls == len(plan.items)
    for it in plan.items:
        assert q.cursor[q.queues.index(it.cluster)] == len(it.sample)
    kept = set(q.selection()["doc_id"])
    assert kept == {d for it in plan.items for d in it.sample if score(it.cluster, d) > q.tau}
    nxt = q.plan_round()
    assert nxt.kind == "bandit" and all(it.start == q.cursor[q.queues.index(it.cluster)] for it in nxt.items)


def test_budget_stop_trims_the_last_block_at_the_next_document_that_would_not_fit():
    ids, clusters, tokens = _corpus([40, 40, 40], seed=5)
    cfg = QuadConfig(accept="block", arms_per_round=2, block_size=10, tau=-1.0, reward_scale=1.0, warmup_size=0)
    budget = int(tokens.sum() * 0.3) + 7
    q = _run(QuadSelector(cfg, ids, clusters, tokens, budget_tokens=budget, seed=0), lambda c, d: 0.0)
    assert q.stop_reason == "budget" and q.plan_round() is None
    sel = q.selection()
    assert sum(sel["n_tokens"]) == q.used_tokens <= budget
    cluster, start, stop, _, _ = q.accepted[-1]
    queue_tokens = q.queues.n_tokens[q.queues.slice(cluster, 0, q.queues.size(cluster))]
    # every selected block is whole except the last, which stops where the next document would pass
    assert q.used_tokens == budget or q.used_tokens + queue_tokens[stop] > budget
    token_of = dict(zip(ids, tokens.tolist()))
    assert sel["n_tokens"] == [token_of[d] for d in sel["doc_id"]]
    assert len(set(sel["doc_id"])) == len(sel["doc_id"])
    history = q.summary()["history"]
    assert [h["budget_used"] for h in history] == sorted(h["budget_used"] for h in history)
    assert history[-1]["budget_used"] == q.used_tokens


def test_rejected_blocks_are_consumed_and_exhausted_arms_leave():
    ids, clusters, tokens = _corpus([30, 12, 25], seed=6)
    cfg = QuadConfig(accept="block", arms_per_round=2, block_size=8, tau=0.0, reward_scale=1.0, warmup_size=0)
    # cluster 1 scores above tau, the others below: only cluster 1's blocks are kept
    q = _run(QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9, seed=1),
             lambda c, d: 1.0 if c == 1 else -1.0)
    assert q.stop_reason == "exhausted"
    sel = q.selection()
    assert set(sel["cluster"]) == {1}
    assert sorted(sel["doc_id"]) == sorted(d for d, c in zip(ids, clusters) if c == 1)
    assert sel["score"] == [1.0] * 12
    pulls = dict(zip(q.bandit.arms.tolist(), q.bandit.pulls.tolist()))
    assert pulls == {0: math.ceil(30 / 8), 1: math.ceil(12 / 8), 2: math.ceil(25 / 8)}
    exhausted = [c for h in q.history for c in h["exhausted"]]
    assert sorted(exhausted) == [0, 1, 2]


def test_selection_batches_are_the_selection_in_pieces():
    ids, clusters, tokens = _corpus([40, 40, 40], seed=5)
    cfg = QuadConfig(accept="documents", arms_per_round=2, block_size=10, warmup_size=4)
    q = _run(QuadSelector(cfg, ids, clusters, tokens, budget_tokens=int(tokens.sum() * 0.3), seed=0),
             _influence([1.0, 0.0, -1.0]))
    whole = q.selection(locations=True)
    assert len(whole["doc_id"]) > 10
    batches = list(q.selection_batches(locations=True, rows_per_batch=5))
    assert all(len(b["doc_id"]) >= 5 for b in batches[:-1]) and len(batches) > 1
    assert {k: [v for b in batches for v in b[k]] for k in whole} == whole


def test_fill_rejected_tops_up_an_underfilled_budget_with_the_best_rejected_blocks():
    ids, clusters, tokens = _corpus([30, 12, 25], seed=6)
    cfg = QuadConfig(accept="block", arms_per_round=2, block_size=8, tau=0.0, reward_scale=1.0, warmup_size=0)
    budget = int(tokens.sum() * 0.6)
    score = lambda c, d: {0: -1.0, 1: 1.0, 2: -0.5}[c] + 0.01 * _noise(d)  # noqa: E731
    plain = _run(QuadSelector(cfg, ids, clusters, tokens, budget, seed=1), score)
    assert plain.stop_reason == "exhausted" and plain.used_tokens < budget
    filled = _run(QuadSelector(cfg.model_copy(update={"fill_rejected": True}), ids, clusters, tokens, budget,
                               seed=1), score)
    assert filled.stop_reason == "budget" and filled.history[-1]["kind"] == "fill"
    sel = filled.selection()
    assert sel["doc_id"][:len(plain.selection()["doc_id"])] == plain.selection()["doc_id"]
    extra = filled.accepted[len(plain.accepted):]
    # the fill takes cluster 2 (mean -0.5) before cluster 0 (mean -1), best block first
    assert [b[4] for b in extra] == sorted((b[4] for b in extra), reverse=True)
    assert [b[0] for b in extra][:4] == [2, 2, 2, 2]
    assert sum(sel["n_tokens"]) == filled.used_tokens <= budget


def test_max_rounds_and_input_validation():
    ids, clusters, tokens = _corpus([30, 30], seed=7)
    cfg = QuadConfig(arms_per_round=1, block_size=5, tau=0.0, reward_scale=1.0, warmup_size=0, max_rounds=3)
    q = _run(QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9), lambda c, d: 1.0)
    assert q.stop_reason == "max_rounds" and q.summary()["rounds"] == 3
    q = QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9)
    plan = q.plan_round()
    with pytest.raises(ValueError, match="scores for"):
        q.apply_round([[1.0] * (len(plan.items[0].sample) + 1)])
    with pytest.raises(ValueError, match="non-finite"):
        q.apply_round([[float("nan")] * len(plan.items[0].sample)])
    with pytest.raises(ValueError, match="no scores for clusters"):
        q.apply_round({99: [1.0]})
    record = q.apply_round({plan.items[0].cluster: [1.0] * len(plan.items[0].sample)})  # a mapping works too
    assert record["arms"] == [plan.items[0].cluster]
    with pytest.raises(ValueError):
        QuadConfig(warmup_size=0)  # auto tau needs a warm-up
    with pytest.raises(ValueError):
        QuadConfig(tau_top_fraction=1.5)


def _experiment_config(**kw):
    return QuadConfig(**{"arms_per_round": 4, "block_size": 16, "sample_ratio": 0.25, "warmup_size": 200,
                         "alpha": 0.5, "neighbour_radius": 0.2, "propagate": True, **kw})


ACCEPT_RULES = ("block", "documents", "two_stage")


def _neighbours(n_clusters):
    # clusters on a line: neighbours one apart are close, so rewards spread to similar clusters
    return [(a, a + 1, 0.1) for a in range(n_clusters - 1)]


@pytest.mark.parametrize("accept", ACCEPT_RULES)
def test_resume_from_to_dict_equals_the_uninterrupted_run(accept):
    ids, clusters, tokens = _corpus([60] * 12, seed=8)
    means = np.linspace(-1.5, 1.5, 12)
    score = _influence(means)
    args = (ids, clusters, tokens, int(tokens.sum() * 0.25), _neighbours(12), 21)
    cfg = _experiment_config(accept=accept, warmup_size=60, block_size=8, arms_per_round=2)
    whole = _run(QuadSelector(cfg, *args), score)
    assert whole.summary()["rounds"] > 6

    head = _run(QuadSelector(cfg, *args), score, stop_after=6)
    state = json.loads(json.dumps(head.to_dict(history_since=3)))
    assert len(state["history"]) == len(head.history) - 3
    resumed = QuadSelector.from_dict(state, ids, clusters, tokens, _neighbours(12),
                                     history_prefix=json.loads(json.dumps(head.history[:3])))
    assert resumed.plan_round() == head.plan_round()
    _run(resumed, score)
    assert resumed.selection() == whole.selection()
    assert json.dumps(resumed.summary()) == json.dumps(whole.summary())
    assert json.dumps(resumed.to_dict()) == json.dumps(whole.to_dict())
    # the document order does not matter, the documents do
    perm = np.random.default_rng(0).permutation(len(ids))
    QuadSelector.from_dict(state, [ids[i] for i in perm], clusters[perm], tokens[perm], _neighbours(12),
                           head.history[:3])
    with pytest.raises(StateMismatch):
        QuadSelector.from_dict(state, ids[:-1], clusters[:-1], tokens[:-1], _neighbours(12), head.history[:3])
    with pytest.raises(StateMismatch):
        QuadSelector.from_dict(state, ids, clusters, tokens, [], head.history[:3])
    with pytest.raises(StateMismatch):
        QuadSelector.from_dict(state, ids, clusters, tokens, _neighbours(12), head.history[:2])


@pytest.mark.parametrize("accept,reward", [("documents", "pass_fraction"), ("block", "clipped"),
                                           ("two_stage", "pass_fraction")])
def test_selection_does_not_depend_on_the_influence_scale(accept, reward):
    ids, clusters, tokens = _corpus([60] * 12, seed=10)
    means = np.linspace(-1.5, 1.5, 12)
    args = (ids, clusters, tokens, int(tokens.sum() * 0.25), _neighbours(12), 2)
    cfg = _experiment_config(accept=accept, reward=reward)
    small = _run(QuadSelector(cfg, *args), _influence(means, scale=1e-3))
    big = _run(QuadSelector(cfg, *args), _influence(means, scale=1.0))
    assert big.tau == pytest.approx(small.tau * 1000) and big.scale == pytest.approx(small.scale * 1000)
    assert big.selection()["doc_id"] == small.selection()["doc_id"]
    assert [h.get("arms") for h in big.history] == [h.get("arms") for h in small.history]


@pytest.mark.parametrize("accept", ACCEPT_RULES)
def test_bandit_selects_more_from_good_clusters_than_random(accept):
    n_clusters = 20
    ids, clusters, tokens = _corpus([150] * n_clusters, seed=9)
    means = np.random.default_rng(1).permutation(np.linspace(-2.0, 2.0, n_clusters))
    score = _influence(means)
    budget = int(tokens.sum() * 0.1)
    q = _run(QuadSelector(_experiment_config(accept=accept), ids, clusters, tokens, budget, _neighbours(n_clusters),
                          seed=0), score)
    assert q.stop_reason == "budget"
    quad = q.selection()

    table = pa.table({"doc_id": ids, "n_tokens": tokens, "cluster": clusters})
    rnd = hash_order_prefix(table, seed=0, max_tokens=budget)  # the `random` method's selection

    good = set(np.argsort(means)[-5:].tolist())  # the best quarter of the clusters

    def good_share(cl, tok):
        tok = np.asarray(tok)
        return tok[[c in good for c in cl]].sum() / tok.sum()

    def mean_true_influence(cl, tok):
        return float(np.average(means[np.asarray(cl)], weights=tok))

    quad_share = good_share(quad["cluster"], quad["n_tokens"])
    random_share = good_share(rnd["cluster"].to_pylist(), rnd["n_tokens"].to_pylist())
    assert quad_share > random_share + 0.3
    assert mean_true_influence(quad["cluster"], quad["n_tokens"]) > \
        mean_true_influence(rnd["cluster"].to_pylist(), rnd["n_tokens"].to_pylist()) + 0.3
    # it scored only a small part of the corpus to get there
    assert q.summary()["scored_documents"] < (0.2 if accept == "block" else 0.3) * len(ids)


def test_inputs_load_from_the_cluster_stage_outputs(tmp_path):
    ids, clusters, tokens = _corpus([20, 30, 25, 10], seed=3)
    workdir = WorkDir(str(tmp_path), "quad-inputs")
    keys = write_cluster_stage(workdir, ids, clusters, tokens)
    docs, neighbours = load_cluster_inputs(workdir, keys)
    assert sorted(zip(docs["doc_id"], docs["cluster"].tolist(), docs["n_tokens"].tolist())) == \
        sorted(zip(ids, clusters.tolist(), tokens.tolist()))
    a, b, d = neighbours
    assert len(a) and ((0 <= d) & (d < 0.2) & (a != b)).all()
    assert set(zip(a.tolist(), b.tolist())) == set(zip(b.tolist(), a.tolist()))  # both directions
    cfg = QuadConfig(tau=0.0, reward_scale=1.0, warmup_size=0, block_size=5)
    q = QuadSelector(cfg, docs["doc_id"], docs["cluster"], docs["n_tokens"], 10**9, neighbours)
    q.apply_round([[1.0] * len(it.sample) for it in q.plan_round().items])
    assert sum(q.history[-1]["propagated_to"]) > 0  # the stage's neighbour pairs reach the bandit


# -- calibration, accept rules and rewards -------------------------------------------------

@pytest.mark.parametrize("dist", ["normal", "heavy_tailed", "bimodal"])
@pytest.mark.parametrize("aim", [0.05, 0.2, 0.5])
def test_token_tau_passes_the_aimed_share_of_tokens(dist, aim):
    rng = np.random.default_rng(3)
    n = 2000
    x = {"normal": rng.normal(size=n), "heavy_tailed": rng.standard_t(1.5, size=n),
         "bimodal": np.concatenate([rng.normal(-2, 0.3, n // 2), rng.normal(1, 1, n - n // 2)])}[dist] * 1e-3
    tokens = rng.integers(20, 2000, n)
    from selector.quad.loop import token_tau

    tau = token_tau(x, tokens, aim)
    share = tokens[x > tau].sum() / tokens.sum()
    assert abs(share - aim) <= 0.2 * aim  # the bar: within +-20% of the aim
    assert token_tau(x, tokens, 1.0) < x.min()  # pass rate 1 keeps everything


@pytest.mark.parametrize("dist", ["normal", "heavy_tailed"])
def test_block_threshold_passes_the_aimed_share_of_block_samples(dist):
    """tau_block is calibrated on sample means: on fresh blocks of the same clusters, the share whose
    sample mean clears it is the aimed pass rate (+-20%), unlike the single-document quantile."""
    from selector.quad.loop import bootstrap_sample_means, calibrate

    rng = np.random.default_rng(5)
    n_clusters, per = 40, 400
    centres = rng.normal(size=n_clusters)
    noise = (lambda size: rng.normal(size=size)) if dist == "normal" else (lambda size: rng.standard_t(2.0, size=size))
    pop = centres[:, None] + 2.0 * noise((n_clusters, per))
    warm_c = np.repeat(np.arange(n_clusters), 25)
    warm = np.concatenate([pop[c, :25] for c in range(n_clusters)])
    cfg = QuadConfig(accept="block", block_size=16, sample_ratio=0.25, tau="quantile", tau_top_fraction=0.2)
    t = calibrate(cfg, warm, np.full(warm.size, 100), warm_c, budget_share=0.1, seed=0)
    # fresh blocks: 4 documents each from the unseen part of a random cluster
    means = np.array([pop[c, 25 + rng.choice(per - 25, 4, replace=False)].mean()
                      for c in rng.integers(0, n_clusters, 4000)])
    assert abs((means > t.block).mean() - 0.2) <= 0.04
    # the single-document quantile that the paper's code compares with a mean passes a different share
    single = auto_tau(warm, 0.2)
    assert abs((means > single).mean() - 0.2) > abs((means > t.block).mean() - 0.2)
    assert bootstrap_sample_means(warm, warm_c, 4, seed=0).tolist() == bootstrap_sample_means(warm, warm_c, 4, 0).tolist()


def test_auto_tau_fills_the_budget_from_the_aimed_share_of_what_it_scores():
    """tau: auto aims at slack x budget share: under uniform (alpha-only) pulls, Quad fills the budget
    after scoring about 1/slack of the corpus."""
    ids, clusters, tokens = _corpus([100] * 30, seed=12)
    score = _influence(np.zeros(30))  # no cluster is better: yield is the calibrated pass rate everywhere
    budget = int(tokens.sum() * 0.1)
    for slack in (2.0, 4.0):
        q = _run(QuadSelector(_experiment_config(accept="documents", tau_slack=slack, warmup_size=300),
                              ids, clusters, tokens, budget, seed=1), score)
        assert q.stop_reason == "budget"
        assert abs(q.summary()["scored_fraction"] - 1 / slack) < 0.35 / slack


def test_documents_rule_keeps_each_scored_document_above_tau_with_its_own_score():
    ids, clusters, tokens = _corpus([24, 24], seed=13)
    cfg = QuadConfig(accept="documents", arms_per_round=2, block_size=8, tau=0.0, warmup_size=0)
    score = lambda c, d: _noise(d)  # noqa: E731
    q = _run(QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9, seed=0), score)
    sel = q.selection()
    assert sorted(sel["doc_id"]) == sorted(d for d in ids if _noise(d) > 0)
    assert sel["score"] == [_noise(d) for d in sel["doc_id"]]
    assert q.summary()["scored_documents"] == len(ids)


def test_two_stage_expands_passing_blocks_and_filters_them_per_document():
    ids, clusters, tokens = _corpus([16, 16], seed=14)
    # cluster 0 passes the gate (mean 1), cluster 1 does not (mean -1); documents vary around it
    score = lambda c, d: (1.0 if c == 0 else -1.0) + 0.8 * _noise(d)  # noqa: E731
    cfg = QuadConfig(accept="two_stage", arms_per_round=2, block_size=8, sample_ratio=0.25, tau=0.5,
                     warmup_size=0)
    q = QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9, seed=0)
    plan = q.plan_round()
    assert plan.kind == "bandit" and all(len(it.sample) == 2 for it in plan.items)
    q.apply_round([[score(it.cluster, d) for d in it.sample] for it in plan.items])
    passed = [it for it in plan.items if np.mean([score(it.cluster, d) for d in it.sample]) > 0.5]
    expand = q.plan_round()
    assert expand.kind == "expand" and [it.cluster for it in expand.items] == [it.cluster for it in passed]
    for it, first in zip(expand.items, passed):
        assert set(it.sample) == set(first.block) - set(first.sample)  # the rest of the block, not re-scored
    q.apply_round([[score(it.cluster, d) for d in it.sample] for it in expand.items])
    _run(q, score)
    sel = q.selection()
    scored = {d for h in [q] for d in sel["doc_id"]}
    assert all(score(c, d) > 0.5 for c, d in zip(sel["cluster"], sel["doc_id"]))
    assert scored  # something passed
    assert q.summary()["scored_documents"] < len(ids)  # failing blocks were not scored in full


@pytest.mark.parametrize("reward", ["pass_fraction", "clipped"])
def test_rewards_are_bounded_so_one_outlier_cannot_lock_an_arm(reward):
    ids, clusters, tokens = _corpus([64] * 4, seed=15)
    cfg = QuadConfig(accept="documents", arms_per_round=1, block_size=8, tau=0.0, reward=reward, reward_scale=1.0,
                     reward_clip=3.0, warmup_size=0, alpha=0.5)
    outlier = {c: ids[[i for i in range(len(ids)) if clusters[i] == c][0]] for c in range(4)}
    score = lambda c, d: 1e6 if d == outlier[0] else (0.5 if c == 1 else -0.5)  # noqa: E731
    q = _run(QuadSelector(cfg, ids, clusters, tokens, budget_tokens=10**9, seed=0), score)
    rewards = [r for h in q.history if h.get("kind") == "bandit" for r in h["reward"]]
    assert max(rewards) <= (1.0 if reward == "pass_fraction" else 3.0)
    # the good cluster (1) is pulled at least as often as the one with the single huge outlier (0)
    first_rounds = [a for h in q.history[:12] for a in h.get("arms", [])]
    assert first_rounds.count(1) >= first_rounds.count(0)


def test_validate_tau_waits_for_set_tau_then_keeps_the_warmup_above_it():
    ids, clusters, tokens = _corpus([50, 50, 50], seed=16)
    score = _influence([0.0, 0.5, 1.0])
    cfg = QuadConfig(tau="validate", tau_buckets=5, warmup_size=60, block_size=8)
    q = QuadSelector(cfg, ids, clusters, tokens, budget_tokens=int(tokens.sum() * 0.2), seed=0)
    plan = q.plan_round()
    q.apply_round([[score(it.cluster, d) for d in it.sample] for it in plan.items])
    assert q.awaiting_tau and not q.selection()["doc_id"] and not q.done
    with pytest.raises(ValueError, match="set_tau"):
        q.plan_round()
    buckets = q.tau_buckets()
    assert len(buckets) == 5 and sum(len(b["doc_ids"]) for b in buckets) == 60
    assert [b["low"] for b in buckets] == sorted((b["low"] for b in buckets), reverse=True)
    q.set_tau(buckets[1]["low"], {"bucket": 1})
    kept = set(q.selection()["doc_id"])
    assert kept == set(buckets[0]["doc_ids"]) | (set(buckets[1]["doc_ids"]) - {
        d for d in buckets[1]["doc_ids"] if score(int(d[1]), d) <= buckets[1]["low"]})
    assert q.plan_round().kind == "bandit"
    state = json.loads(json.dumps(q.to_dict()))
    assert QuadSelector.from_dict(state, ids, clusters, tokens).plan_round() == q.plan_round()


def test_block_sample_is_uniform_and_follows_the_documents_not_their_positions():
    from selector.quad.loop import sample_picks

    rng = np.random.default_rng(0)
    keys = np.sort(rng.random(64))
    picks = sample_picks(keys, 4, seed=3)
    assert len(picks) == 4 and list(picks) == sorted(set(picks.tolist()))
    assert list(sample_picks(keys, 4, seed=3)) == list(picks) and list(sample_picks(keys, 4, seed=4)) != list(picks)
    # a document inserted into the block (as a refresh does) moves positions, not the sampled documents
    # unless it is itself sampled
    chosen = set(keys[picks].tolist())
    for new in rng.random(20):
        grown = np.sort(np.append(keys, new))
        again = set(grown[sample_picks(grown, 4, seed=3)].tolist())
        assert again == chosen or (new in again and len(again - chosen) == 1)
    # uniform: every offset of a block is picked about equally often over many blocks
    counts = np.zeros(64)
    for b in range(4000):
        counts[sample_picks(np.sort(rng.random(64)), 4, seed=b)] += 1
    assert counts.min() > 0.75 * counts.mean() and counts.max() < 1.25 * counts.mean()
