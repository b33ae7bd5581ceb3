"""selector.clusters.kmeans: faiss spherical k-means, elbow, streaming assignment, tables, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from selector.clusters.kmeans import (ASSIGN_STAGE, SUMMARY_STAGE, ClusterConfig, ClusterModel, assign_hash_for,
                                 assign_shard, centroid_neighbours, choose_k, cluster_stage, elbow_k, fit_kmeans,
                                 fit_stage, load_centroids, sample_embeddings)
from selector.clusters.embedding import STAGE as EMBED_STAGE
from selector.errors import StageError
from selector.data.workdir import WorkDir


def mixture(n: int, k: int, dim: int = 32, noise: float = 0.08, seed: int = 0):
    """``n`` unit vectors around ``k`` random unit centres (labels returned too)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), labels


def write_embedded(workdir: WorkDir, key: str, emb: np.ndarray, tokens: np.ndarray | None = None):
    """A shard in the embed stage's on-disk format (ids table first, then the array + marker)."""
    n = emb.shape[0]
    tokens = np.arange(n) % 50 + 10 if tokens is None else tokens
    ids = pa.table({"doc_id": [f"{key}:{i}" for i in range(n)], "row": pa.array(np.arange(n), pa.int64()),
                    "n_tokens_encoder": pa.array(tokens, pa.int64())})
    workdir.write_table(EMBED_STAGE, f"{key}.ids", ids, "h-" + key)
    workdir.write_array(EMBED_STAGE, key, emb, "h-" + key, stats={"n_docs": n})


@pytest.fixture
def embedded(tmp_path):
    x, labels = mixture(3000, 8)
    workdir = WorkDir(str(tmp_path / "work"), "run")
    keys = ["s0", "s1", "s2"]
    for key, part in zip(keys, np.array_split(x, 3)):
        write_embedded(workdir, key, part)
    return workdir, keys, x, labels


def test_elbow_rule_on_a_known_curve():
    ks = [2, 4, 8, 16, 32, 64]
    # Steep drop until 8 then flat: the knee is at 8.
    assert elbow_k(ks, [100, 60, 20, 18, 17, 16]) == 8
    # A straight line in log k has no point below the chord: the largest k.
    assert elbow_k(ks, [60, 50, 40, 30, 20, 10]) == 64
    assert elbow_k([2, 4], [10, 5]) == 4
    assert elbow_k(ks, [5] * 6) == 2


def test_auto_k_finds_the_true_number_of_clusters(embedded):
    workdir, keys, x, _ = embedded
    cfg = ClusterConfig(k="auto", k_grid=[2, 4, 8, 16, 32, 64], sample_size=3000, seed=0, init="kmeans++")
    k, table = choose_k(x.astype(np.float32), cfg)
    assert k == 8
    assert [r["k"] for r in table] == [2, 4, 8, 16, 32, 64]
    wcss = [r["wcss"] for r in table]
    assert all(a >= b for a, b in zip(wcss, wcss[1:]))
    # The grid runs on a seeded subset when the sample is larger than elbow_sample_size.
    small = cfg.model_copy(update={"elbow_sample_size": 800, "k_grid": [2, 4, 8, 16, 32]})
    assert choose_k(x.astype(np.float32), small)[0] == 8
    with pytest.raises(StageError, match=r"k_grid values \[1000\] are larger than the elbow sample \(800"):
        choose_k(x.astype(np.float32), small.model_copy(update={"k_grid": [2, 1000]}))


def test_stage_outputs_match_brute_force(embedded):
    workdir, keys, x, labels = embedded
    cfg = ClusterConfig(k=8, sample_size=1500, seed=3, nredo=5, init="kmeans++", neighbour_radius=0.85,
                        assign_batch_size=100)
    result = cluster_stage(workdir, keys, cfg)
    assert result.k == 8 and result.n_docs == 3000 and result.skipped_shards == 0
    centroids = load_centroids(workdir)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assigned = pa.concat_tables([workdir.read_table(ASSIGN_STAGE, k) for k in keys])
    cluster = assigned.column("cluster").to_numpy()
    sim = x.astype(np.float32) @ centroids.T
    np.testing.assert_array_equal(cluster, sim.argmax(1))
    np.testing.assert_allclose(assigned.column("distance").to_numpy(), 1 - sim.max(1), atol=1e-5)
    # Well-separated mixture: each found cluster is one true cluster.
    for c in range(8):
        assert len(np.unique(labels[cluster == c])) == 1

    table = workdir.read_table(SUMMARY_STAGE, "clusters")
    sizes = table.column("size").to_numpy()
    assert sizes.sum() == 3000
    np.testing.assert_array_equal(sizes, np.bincount(cluster, minlength=8))
    tokens = assigned.column("n_tokens").to_numpy()
    np.testing.assert_array_equal(table.column("tokens").to_numpy(), np.bincount(cluster, tokens, 8).astype(int))
    mean = [assigned.column("distance").to_numpy()[cluster == c].mean() for c in range(8)]
    np.testing.assert_allclose(table.column("mean_distance").to_numpy(), mean, rtol=1e-4)

    neighbours = workdir.read_table(SUMMARY_STAGE, "neighbours")
    d = 1 - centroids @ centroids.T
    want = {(i, j) for i in range(8) for j in range(8) if i != j and d[i, j] < 0.85}
    got = set(zip(neighbours.column("cluster").to_pylist(), neighbours.column("neighbour").to_pylist()))
    assert got == want and len(want) > 0
    assert all((j, i) in got for i, j in got)


def test_neighbours_blocked_equals_dense():
    c, _ = mixture(300, 300, dim=8, noise=0.0, seed=5)
    c = c.astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    small = centroid_neighbours(c, 0.2, block=7)
    dense = centroid_neighbours(c, 0.2, block=10_000)
    # same pairs; distances equal to float32 rounding (BLAS sums a 7-row block and a 300-row block in
    # different orders on some CPUs, which moves the last bit and so the order of near-ties)
    def pairs(t):
        return {(a, b): d for a, b, d in zip(t.column("cluster").to_pylist(), t.column("neighbour").to_pylist(),
                                             t.column("distance").to_pylist())}
    got, want = pairs(small), pairs(dense)
    assert small.num_rows == dense.num_rows > 0 and set(got) == set(want)
    assert max(abs(got[k] - want[k]) for k in want) < 1e-6
    assert (small.column("distance").to_numpy() < 0.2).all()


def test_neighbour_cap_keeps_each_clusters_nearest_within_the_radius_like_a_naive_loop():
    rng = np.random.default_rng(11)
    c = rng.normal(size=(120, 6)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    radius, m = 0.9, 5
    capped = centroid_neighbours(c, radius, block=17, max_neighbours=m)
    d = 1.0 - c.astype(np.float64) @ c.T.astype(np.float64)
    want = set()
    for i in range(len(c)):  # the naive rule: sort row i's in-radius clusters by distance, keep m
        inside = sorted((d[i, j], j) for j in range(len(c)) if j != i and d[i, j] < radius)
        want |= {(i, j) for _, j in inside[:m]}
    got = list(zip(capped.column("cluster").to_pylist(), capped.column("neighbour").to_pylist()))
    assert set(got) == want and len(got) == len(want)
    assert max(np.bincount(capped.column("cluster").to_numpy())) <= m
    # a cap at least k - 1 is no cap
    assert centroid_neighbours(c, radius, max_neighbours=200).equals(centroid_neighbours(c, radius))


def test_same_seed_same_assignments_and_resume(tmp_path, embedded):
    workdir, keys, x, _ = embedded
    cfg = ClusterConfig(k=12, sample_size=2000, seed=7)
    cluster_stage(workdir, keys, cfg)
    other = WorkDir(str(tmp_path / "work2"), "run")
    for key in keys:
        write_embedded(other, key, workdir.read_array(EMBED_STAGE, key))
    cluster_stage(other, keys, cfg)
    np.testing.assert_array_equal(load_centroids(workdir), load_centroids(other))
    for key in keys:
        assert workdir.read_table(ASSIGN_STAGE, key).equals(other.read_table(ASSIGN_STAGE, key))
    # Re-running finds everything done.
    again = cluster_stage(workdir, keys, cfg)
    assert again.fit_skipped and again.skipped_shards == 3
    # A different seed samples and initialises differently.
    third = WorkDir(str(tmp_path / "work3"), "run")
    for key in keys:
        write_embedded(third, key, workdir.read_array(EMBED_STAGE, key))
    cluster_stage(third, keys, cfg.model_copy(update={"seed": 8}))
    assert not np.array_equal(load_centroids(workdir), load_centroids(third))


def test_tokens_from_the_index_stage(embedded):
    workdir, keys, x, _ = embedded
    model, result = fit_stage(workdir, keys, ClusterConfig(k=4, sample_size=500))
    h = assign_hash_for(result.fit_hash, model)
    n = workdir.read_array(EMBED_STAGE, "s0").shape[0]
    encoder_stats = assign_shard(workdir, "s0", model, h)
    assert encoder_stats["tokens_source"] == "encoder"
    # Once the index stage's table exists (rows in another order), its counts are used.
    rows = np.arange(n)[::-1]
    workdir.write_table("index", "s0", pa.table({"doc_id": [f"s0:{r}" for r in rows], "row": rows,
                                                 "n_tokens": rows * 3 + 1}), "idx")
    stats = assign_shard(workdir, "s0", model, h)
    assert stats["tokens_source"] == "index" and not stats["skipped"]
    assert workdir.read_table(ASSIGN_STAGE, "s0").column("n_tokens").to_pylist() == [r * 3 + 1 for r in range(n)]
    with pytest.raises(StageError, match="token counts"):
        assign_shard(workdir, "s0", model, h, n_tokens=np.ones(3))


def test_nan_and_inf_are_named(tmp_path):
    workdir = WorkDir(str(tmp_path / "w"), "run")
    good, _ = mixture(200, 4)
    bad = good.copy()
    bad[17, 3] = np.nan
    write_embedded(workdir, "good", good)
    write_embedded(workdir, "bad", bad)
    with pytest.raises(StageError, match=r"shard bad: non-finite .* row\(s\) \[17\]"):
        sample_embeddings(workdir, ["bad", "good"], 10_000, 0)
    model = ClusterModel(fit_kmeans(good, 4, ClusterConfig(k=4)).centroids)
    inf = good.copy()
    inf[150, 0] = np.inf
    with pytest.raises(StageError, match=r"shard x: non-finite .* row\(s\) \[150\]"):
        model.assign(inf, batch_size=64, where="shard x")
    with pytest.raises(StageError, match="non-finite"):
        fit_kmeans(bad, 4, ClusterConfig(k=4))


def test_k_larger_than_sample_and_other_bad_config(tmp_path):
    workdir = WorkDir(str(tmp_path / "w"), "run")
    x, _ = mixture(50, 2)
    write_embedded(workdir, "s", x)
    with pytest.raises(StageError, match="k=64 is larger than the k-means sample"):
        cluster_stage(workdir, ["s"], ClusterConfig(k=64))
    with pytest.raises(StageError, match="larger than the k-means sample"):
        cluster_stage(workdir, ["s"], ClusterConfig(k=20, sample_size=10))
    with pytest.raises(StageError, match=r"k_grid values \[128\]"):
        cluster_stage(workdir, ["s"], ClusterConfig(k_grid=[2, 128]))
    with pytest.raises(StageError, match="no embeddings"):
        cluster_stage(workdir, ["missing"], ClusterConfig(k=2))
    with pytest.raises(ValueError):
        ClusterConfig(k=0)
    with pytest.raises(ValueError):
        ClusterConfig(k_grid=[])
    with pytest.raises(ValueError):
        ClusterConfig(neighbour_radius=0)
    if not __import__("selector.clusters.kmeans", fromlist=["x"]).faiss_gpu_available():
        with pytest.raises(StageError, match="no GPU"):
            fit_kmeans(x, 2, ClusterConfig(k=2, use_gpu=True))
