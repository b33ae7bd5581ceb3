"""BanditActor on a real local Ray: checkpoints, kill + resume, named-actor reuse."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

from selector.quad.loop import QuadConfig, QuadSelector, load_cluster_inputs
from selector.data.workdir import WorkDir

from _quad_helpers import write_cluster_stage

N_CLUSTERS = 8
MEANS = np.linspace(-1.5, 1.5, N_CLUSTERS)


def _docs(n_per_cluster=80):
    rng = np.random.default_rng(0)
    ids = [f"c{c}/d{i}" for c in range(N_CLUSTERS) for i in range(n_per_cluster)]
    clusters = np.repeat(np.arange(N_CLUSTERS), n_per_cluster)
    return {"doc_id": ids, "cluster": clusters.tolist(), "n_tokens": rng.integers(10, 60, len(ids)).tolist()}


NEIGHBOURS = [(a, a + 1, 0.12) for a in range(N_CLUSTERS - 1)]
# one arm per round and small blocks: > HISTORY_SEGMENT rounds, so log segments are exercised; two_stage,
# so a kill can fall between a block's sample and its expansion
CONFIG = QuadConfig(accept="two_stage", arms_per_round=1, block_size=4, sample_ratio=0.5, warmup_size=40, alpha=0.5)


def _influence(doc_id: str) -> float:
    cluster = int(doc_id.split("/")[0][1:])
    noise = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=4).digest(), "little") / 2**32 - 0.5
    return (MEANS[cluster] + 2.0 * noise) * 1e-3


def _score_fn(requests):
    return [[_influence(d) for d in sample] for _, sample in requests]


def _wait_dead(actor, timeout=30.0):
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            ray.get(actor.status.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def _reference(docs, budget):
    q = QuadSelector(CONFIG, docs["doc_id"], docs["cluster"], docs["n_tokens"], budget, NEIGHBOURS, seed=5)
    while (plan := q.plan_round()) is not None:
        q.apply_round(_score_fn(plan.requests()))
    return q


def test_killed_bandit_resumes_from_its_checkpoint_and_finishes_like_an_uninterrupted_run(ray_local, tmp_path):
    import ray

    from workers.bandit import HISTORY_SEGMENT, bandit_actor_name, run_quad_rounds, start_bandit

    docs = _docs()
    budget = int(sum(docs["n_tokens"]) * 0.9)
    reference = _reference(docs, budget)
    assert reference.summary()["rounds"] > HISTORY_SEGMENT + 10

    workdir = WorkDir(str(tmp_path / "work"), "quad-kill")
    bandit = start_bandit(workdir, CONFIG, budget, seed=5, docs=docs, neighbours=NEIGHBOURS)
    kill_at = HISTORY_SEGMENT + 5
    seen = []

    def killing_score_fn(requests):
        seen.append(requests)
        if len(seen) == kill_at + 1:  # the warm-up is call 1: kill while round kill_at is being scored
            ray.kill(bandit, no_restart=True)
            _wait_dead(bandit)  # ray.kill is asynchronous: make sure the report below cannot land
        return _score_fn(requests)

    with pytest.raises(ray.exceptions.RayActorError):
        run_quad_rounds(bandit, killing_score_fn, progress=False)
    state = workdir.read_state("bandit")
    assert state["next_round"] == kill_at  # checkpointed after every round, the killed round not applied
    assert workdir.read_state(f"bandit-history-{0:06d}") is not None  # the first log segment was split off

    restarted = start_bandit(workdir, CONFIG, budget, seed=5, docs=docs, neighbours=NEIGHBOURS)
    status = ray.get(restarted.status.remote())
    assert status["resumed"] and status["round"] == kill_at and status["discarded_checkpoint"] is None
    assert ray.get(restarted.plan_round.remote())["items"][0]["sample"] == seen[-1][0][1]  # same plan re-issued
    # the name is the run's: asking again returns the live actor
    assert ray.get(ray.get_actor(bandit_actor_name("quad-kill")).status.remote())["round"] == kill_at
    messages = []
    final = run_quad_rounds(start_bandit(workdir, CONFIG, budget, seed=5, docs=docs, neighbours=NEIGHBOURS),
                            _score_fn, progress=False, log=messages.append)
    assert final["done"] and final["stop_reason"] == reference.stop_reason
    assert any("resumed" in m for m in messages)
    assert ray.get(restarted.selection.remote()) == reference.selection()
    # the manifest's copy: the same rows as an Arrow table, with their locations
    table = ray.get(restarted.selection_table.remote())
    assert table.to_pydict() == reference.selection(locations=True)
    assert ray.get(restarted.summary.remote()) == reference.summary()
    # a retried report for an applied round returns its record and changes nothing
    assert ray.get(restarted.report.remote([[0.0]], 3)) == reference.history[3]
    ray.kill(restarted)


def test_checkpoint_of_another_config_is_not_resumed(ray_local, tmp_path):
    import ray

    from workers.bandit import run_quad_rounds, start_bandit

    docs = _docs(n_per_cluster=20)
    budget = int(sum(docs["n_tokens"]) * 0.3)
    workdir = WorkDir(str(tmp_path / "work"), "quad-config")
    # the first actor reads its documents and neighbours from the cluster stage's outputs
    keys = write_cluster_stage(workdir, docs["doc_id"], docs["cluster"], docs["n_tokens"])
    first = start_bandit(workdir, CONFIG, budget, seed=5, cluster_keys=keys)
    run_quad_rounds(first, _score_fn, progress=False)
    loaded, neighbours = load_cluster_inputs(workdir, keys)
    alone = QuadSelector(CONFIG, loaded["doc_id"], loaded["cluster"], loaded["n_tokens"], budget, neighbours, seed=5)
    while (plan := alone.plan_round()) is not None:
        alone.apply_round(_score_fn(plan.requests()))
    assert ray.get(first.selection.remote()) == alone.selection()
    ray.kill(first, no_restart=True)
    _wait_dead(first)
    other = CONFIG.model_copy(update={"alpha": 2.0})
    second = start_bandit(workdir, other, budget, seed=5, docs=docs, neighbours=NEIGHBOURS)
    status = ray.get(second.status.remote())
    assert not status["resumed"] and "config" in status["discarded_checkpoint"] and status["round"] == 0
    run_quad_rounds(second, _score_fn, progress=False)
    expected = QuadSelector(other, docs["doc_id"], docs["cluster"], docs["n_tokens"], budget, NEIGHBOURS, seed=5)
    while (plan := expected.plan_round()) is not None:
        expected.apply_round(_score_fn(plan.requests()))
    assert ray.get(second.selection.remote()) == expected.selection()
    assert workdir.read_state("bandit")["config"]["alpha"] == 2.0
    ray.kill(second)


def test_bandit_state_is_o_clusters_checkpoint_and_memory_do_not_grow_with_the_corpus(ray_local, tmp_path):
    """Same clusters and budget, a corpus of N and of 10N documents: the actor reads the queues from the
    work dir, and its checkpoint bytes and every array/container it holds are the same size."""
    import ray

    from selector.clusters.queues import DiskClusterQueues
    from workers.bandit import run_quad_rounds, start_bandit

    cfg = QuadConfig(accept="block", arms_per_round=2, block_size=8, tau=0.0, warmup_size=0, alpha=0.5)
    budget = 1000  # 100 documents of 10 tokens: 13 blocks, so no cluster runs out even at N
    n_small = N_CLUSTERS * 100

    def cluster_score(requests):  # depends on the cluster only, so both corpora see the same rewards
        return [[float(MEANS[cluster]) for _ in sample] for cluster, sample in requests]

    measured = {}
    for n_per_cluster in (100, 1000):
        ids = [f"c{c}/d{i}" for c in range(N_CLUSTERS) for i in range(n_per_cluster)]
        clusters = np.repeat(np.arange(N_CLUSTERS), n_per_cluster)
        workdir = WorkDir(str(tmp_path / f"work-{n_per_cluster}"), f"quad-scale-{n_per_cluster}")
        keys = write_cluster_stage(workdir, ids, clusters, [10] * len(ids), n_shards=4)
        bandit = start_bandit(workdir, cfg, budget, seed=5, cluster_keys=keys)
        status = run_quad_rounds(bandit, cluster_score, progress=False)
        assert status["stop_reason"] == "budget" and status["used_tokens"] == budget
        footprint = ray.get(bandit.footprint.remote())
        state_bytes = workdir.fs.cat_file(f"{workdir.path}/state/bandit.json")
        state = json.loads(state_bytes)
        assert state["documents"] == DiskClusterQueues(workdir).fingerprint()  # from the queue metadata
        measured[n_per_cluster] = (len(state_bytes), footprint, ray.get(bandit.selection.remote()))
        ray.kill(bandit)
    (small_bytes, small, small_sel), (big_bytes, big, big_sel) = measured[100], measured[1000]
    assert len(small_sel["doc_id"]) == len(big_sel["doc_id"]) == 100
    assert big_bytes <= small_bytes  # the checkpoint does not grow with the corpus
    cached = [(f.pop("queues._cache"), f.pop("queues.cached_rows")) for f in (small, big)]
    assert big == small  # no array or container grows with the corpus ...
    assert max(big.values()) < n_small  # ... and none is as long as even the small corpus
    assert all(groups <= 16 and rows <= 16 * 4096 for groups, rows in cached)  # the row-group LRU is bounded


def test_a_run_from_the_previous_runs_score_cache_makes_the_same_choices_and_scores_only_what_changed(
        ray_local, tmp_path):
    import ray

    from selector.quad.score_cache import build_score_cache, log_segments
    from workers.bandit import run_quad_rounds, start_bandit

    docs = _docs()
    n = len(docs["doc_id"])
    docs["shard"] = [f"s{i % 3}.parquet" for i in range(n)]
    docs["row"] = list(range(n))
    budget = int(sum(docs["n_tokens"]) * 0.6)
    workdir = WorkDir(str(tmp_path / "work"), "quad-lineage")
    computed: list[tuple[str, str]] = []

    def counting(requests):
        for r in requests:
            computed.extend(zip(r.doc_ids, r.shards))
        return _score_fn(requests)

    def run(**scores):
        computed.clear()
        bandit = start_bandit(workdir, CONFIG, budget, seed=5, docs=docs, neighbours=NEIGHBOURS, **scores)
        status = run_quad_rounds(bandit, counting, progress=False)
        chosen = ray.get(bandit.selection.remote())
        ray.kill(bandit)
        _wait_dead(bandit)
        workdir.fs.rm(f"{workdir.path}/state", recursive=True)  # the next run starts afresh, as a refresh's does
        return status, chosen, list(computed)

    first, chosen_first, scored_first = run(score_log="run-a")
    assert len(log_segments(workdir, "run-a")) >= 2 and first["cache_from"] is None
    # shard s2 "changed": its documents' scores are dropped from the cache and must be computed again
    meta = build_score_cache(workdir, "run-a", N_CLUSTERS, ["s0.parquet", "s1.parquet"], max_range_rows=60)
    assert len(meta["ranges"]) > 1
    assert meta["rows"] == len({d for d, s in scored_first if s != "s2.parquet"})
    second, chosen_second, scored_second = run(score_log="run-b", score_cache="run-a")
    assert chosen_second == chosen_first  # the cached scores are the scores: the same plans, the same selection
    assert scored_second and {s for _, s in scored_second} == {"s2.parquet"}
    assert second["cache_hits"] + second["cache_misses"] == len(scored_first)
    assert second["cache_misses"] == len(scored_second) == sum(1 for _, s in scored_first if s == "s2.parquet")
    assert log_segments(workdir, "run-b")  # the second run logs every score it used, looked up or not
