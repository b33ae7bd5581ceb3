"""Distributed two-level GTP on a real local Ray cluster (workers.gtp.distributed_pursuit)."""

from __future__ import annotations

import numpy as np
import pytest

from selector.errors import StageError
from selector.gtp.pursuit import GTPPartition, partition_indices, pursue, pursue_under_budget, two_level_pursuit


def clustered_features(seed: int, n: int = 4000, d: int = 64, n_clusters: int = 40, dup_frac: float = 0.2):
    """Gradient-like columns: cluster centroids + noise, plus a fraction of near-duplicates."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((n_clusters, d))
    labels = rng.integers(0, n_clusters, n)
    phi = centroids[labels] + 0.7 * rng.standard_normal((n, d))
    n_dup = int(dup_frac * n)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_dup, replace=False)
    phi[dst] = phi[src] + 0.01 * rng.standard_normal((n_dup, d))
    ref = rng.choice(n, 50, replace=False)                         # a "reference set" inside the corpus
    y = phi[ref].mean(axis=0)
    return phi.astype(np.float32), y


def _partitions(phi, ids, tokens, parts, ray):
    return [ray.put(GTPPartition(ids=ids[p], features=phi[p], n_tokens=tokens[p])) for p in parts]


def test_distributed_matches_in_process_two_level_and_is_close_to_single_machine(ray_local):
    from workers.gtp import distributed_pursuit, single_machine_pursuit

    ray = ray_local
    phi, y = clustered_features(0, n=2000)
    n = phi.shape[0]
    ids = np.array([f"doc-{i}" for i in range(n)])
    tokens = np.random.default_rng(0).integers(50, 1000, n)
    parts = partition_indices(n, 4, seed=0)
    k = 30
    refs = _partitions(phi, ids, tokens, parts, ray)
    dist = distributed_pursuit(refs, y, k, oversample=2.0, num_cpus=0.5)
    ref = two_level_pursuit(phi, y, k, n_partitions=4, oversample=2.0, seed=0)
    single = pursue(phi, y, k)
    on_ray = single_machine_pursuit(refs, y, k, num_cpus=0.5)     # the gap as a job would report it
    assert on_ray["n_docs"] == n and on_ray["rel_residual"] == pytest.approx(single.rel_residual, rel=1e-6)
    # Ray runs exactly the in-process algorithm: same selection, same weights.
    assert dict(zip(dist.ids.tolist(), dist.weights.tolist())) == pytest.approx(
        dict(zip(ids[ref.support].tolist(), ref.weights.tolist())), rel=1e-6)
    assert len(dist.ids) <= k and np.all(dist.weights > 0)
    np.testing.assert_array_equal(dist.n_tokens, tokens[[int(i.split("-")[1]) for i in dist.ids]])
    assert [s["k_local"] for s in dist.local] == [60] * 4
    assert dist.n_candidates == sum(s["n_candidates"] for s in dist.local) <= 4 * 60
    gap = dist.rel_residual - single.rel_residual
    print(f"\nGTP residual: single-machine {single.rel_residual:.4f}  distributed {dist.rel_residual:.4f}  "
          f"gap {gap:+.4f}  candidates {dist.n_candidates}")
    assert abs(gap) < 0.05


def test_distributed_under_token_budget(ray_local):
    from workers.gtp import distributed_pursuit

    ray = ray_local
    phi, y = clustered_features(1, n=2000)
    n = phi.shape[0]
    ids = np.array([f"d{i}" for i in range(n)])
    tokens = np.random.default_rng(1).integers(50, 1000, n)
    parts = partition_indices(n, 3, seed=1)
    budget = 20_000
    dist = distributed_pursuit(_partitions(phi, ids, tokens, parts, ray), y, budget_tokens=budget, num_cpus=0.5)
    assert dist.tokens_selected == int(dist.n_tokens.sum()) <= budget
    assert dist.tokens_selected > 0.8 * budget
    single = pursue_under_budget(phi, y, tokens, budget)
    ref = two_level_pursuit(phi, y, n_partitions=3, seed=1, n_tokens=tokens, budget_tokens=budget)
    assert set(dist.ids.tolist()) == set(ids[ref.support].tolist())
    assert abs(dist.rel_residual - single.rel_residual) < 0.05


def test_distributed_bad_input(ray_local):
    from workers.gtp import distributed_pursuit

    phi, y = clustered_features(2, n=100)
    part = GTPPartition(ids=np.arange(100).astype(str), features=phi)
    with pytest.raises(StageError, match="exactly one"):
        distributed_pursuit([part], y)
    with pytest.raises(StageError, match="all zeros"):
        distributed_pursuit([part], np.zeros_like(y), 5)
    with pytest.raises(StageError, match="no partitions"):
        distributed_pursuit([], y, 5)
    with pytest.raises(StageError, match="overlap"):
        distributed_pursuit([part, part], y, 5, num_cpus=0.5)


def test_feature_actor_writes_shards_and_pursuit_reads_them_on_workers(ray_local, tiny_llama_dir, tiny_llama_dir_2,
                                                                       real_texts, tmp_path):
    from selector.gtp.pursuit import GTPConfig
    from selector.gtp.features import FeatureShardRef, corpus_mean_target
    from workers.gtp import TrajectoryFeatureActor, distributed_pursuit

    ray = ray_local
    cfg = GTPConfig(checkpoints=[str(tiny_llama_dir), str(tiny_llama_dir_2)], projection_dim_a=4,
                    projection_dim_g=4, chunk_tokens=64, max_chunks_per_doc=1, batch_size=8)
    actor = TrajectoryFeatureActor.options(num_cpus=0.5).remote(cfg.model_dump(), str(tmp_path), "run")
    docs = [t[:100] for t in real_texts[30:46]]
    shards = {"s0": docs[:8], "s1": docs[8:]}
    done = ray.get([actor.shard.remote(k, [f"{k}:{i}" for i in range(8)], list(range(8)), v, [len(t) for t in v])
                    for k, v in shards.items()])
    assert all(d["computed"] for d in done)
    again = ray.get(actor.shard.remote("s0", ["x"], [0], ["unused"], [1]))
    assert again["computed"] is False                                  # resumed: already done
    refs = [FeatureShardRef(str(tmp_path), "run", k) for k in shards]
    y = ray.get(actor.reference_target.remote([t[:100] for t in real_texts[:3]]))
    res = distributed_pursuit(refs, y, 4, num_cpus=0.5)
    assert 0 < len(res.ids) <= 4 and set(res.ids) <= {f"{k}:{i}" for k in shards for i in range(8)}
    assert res.rel_residual < 1.0
    ym = corpus_mean_target(refs)
    assert distributed_pursuit(refs, ym, 4, num_cpus=0.5).rel_residual < 1.0
    ray.kill(actor)
