"""Cluster queues: the on-disk store (per-cluster Parquet files under the work dir) against the
in-memory one, the queue step's resumability, and Quad run on either store."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from selector.clusters.queues import (QUEUE_STAGE, SORT_STAGE, ClusterQueues, DiskClusterQueues,
                                     partition_clusters, write_cluster_queues)
from selector.quad.loop import QuadConfig, QuadSelector, load_cluster_inputs, load_cluster_neighbours
from selector.data.workdir import WorkDir

from _quad_helpers import write_cluster_stage


def _corpus(sizes, seed=0):
    rng = np.random.default_rng(seed)
    ids, clusters = [], []
    for c, n in enumerate(sizes):
        ids += [f"c{c}/doc{i}" for i in range(n)]
        clusters += [c] * n
    order = rng.permutation(len(ids))
    return [ids[i] for i in order], np.array(clusters)[order], rng.integers(20, 200, len(ids))


# cluster 3 is empty (no queue); 1 has a single document; 6 spans several row groups of 16
SIZES = [40, 1, 25, 0, 17, 33, 70, 9]


def _stores(tmp_path, seed=3, n_shards=3, **kw):
    ids, clusters, tokens = _corpus(SIZES)
    workdir = WorkDir(str(tmp_path / "work"), "queues")
    keys = write_cluster_stage(workdir, ids, clusters, tokens, n_shards=n_shards)
    info = write_cluster_queues(workdir, keys, seed, shard_names={k: f"data/{k}.jsonl" for k in keys},
                                row_group_size=16, **kw)
    docs, _ = load_cluster_inputs(workdir, keys)  # the in-memory store over the same documents, same input order
    memory = ClusterQueues(docs["doc_id"], docs["cluster"], docs["n_tokens"], seed)
    return workdir, keys, info, memory, DiskClusterQueues(workdir, cache_row_groups=2), (ids, clusters, tokens)


@pytest.mark.parametrize("max_partition_docs", [10**6, 50])  # one partition, or several (70 is alone)
def test_disk_store_returns_the_in_memory_entries_for_every_cluster_and_block(tmp_path, max_partition_docs):
    workdir, keys, info, memory, disk, (ids, clusters, tokens) = _stores(tmp_path,
                                                                         max_partition_docs=max_partition_docs)
    assert info["clusters"] == 7 and info["documents"] == len(ids)
    assert disk.cluster_ids.tolist() == memory.cluster_ids.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert disk.sizes.tolist() == memory.sizes.tolist() and disk.tokens.tolist() == memory.tokens.tolist()
    assert disk.hashes == memory.hashes and disk.fingerprint() == memory.fingerprint()
    assert len(disk) == len(ids) and disk.total_tokens == int(tokens.sum())
    # where each document lives: the assignment table of its shard (write_cluster_stage: round robin)
    where = {ids[i]: (f"data/shard-{i % 3}.jsonl", i) for i in range(len(ids))}
    for c in memory.cluster_ids.tolist():
        size = memory.size(c)
        naive = memory.read(c, 0, size)
        assert naive.key.tolist() == sorted(naive.key.tolist())  # hash order
        for block in (1, 5, 16, 23):
            for start in range(0, size + 3, block):
                a, b = memory.read(c, start, start + block), disk.read(c, start, start + block)
                assert b.doc_id == a.doc_id and b.key.tolist() == a.key.tolist()
                assert b.n_tokens.tolist() == a.n_tokens.tolist()
                assert [(s, int(r)) for s, r in zip(b.shard, b.row)] == [where[d] for d in b.doc_id]
        assert disk.read_keys(c, 2, 19).tolist() == memory.read_keys(c, 2, 19).tolist()
    for n in (0, 1, 7, 50, len(ids), len(ids) + 5):
        assert disk.smallest_keys_counts(n) == memory.smallest_keys_counts(n)
    assert len(disk._cache) <= 2 and disk.cached_rows() <= 2 * 16  # the LRU stays bounded


def test_queue_step_resumes_and_redoes_only_what_changed(tmp_path):
    workdir, keys, first, _, disk, _ = _stores(tmp_path)
    again = write_cluster_queues(workdir, keys, 3, shard_names={k: f"data/{k}.jsonl" for k in keys},
                                 row_group_size=16)
    assert again["skipped"] and again["fingerprint"] == first["fingerprint"]
    # a killed step: the metadata marker is missing, the sorted shards are reused
    workdir.fs.rm(f"{workdir.stage_dir(QUEUE_STAGE)}/queues.done.json")
    sorted_marker = workdir.read_marker(SORT_STAGE, keys[0])
    resumed = write_cluster_queues(workdir, keys, 3, shard_names={k: f"data/{k}.jsonl" for k in keys},
                                   row_group_size=16)
    assert not resumed["skipped"] and resumed["fingerprint"] == first["fingerprint"]
    assert workdir.read_marker(SORT_STAGE, keys[0])["created_at"] == sorted_marker["created_at"]
    # another seed is another order: redone, and a store of that seed
    other = write_cluster_queues(workdir, keys, 4, row_group_size=16)
    assert not other["skipped"] and other["fingerprint"] != first["fingerprint"]
    assert DiskClusterQueues(workdir).seed == 4


def test_partitions_group_consecutive_clusters_within_the_document_limit():
    assert partition_clusters({0: 5, 1: 5, 2: 0, 3: 20, 4: 3, 5: 3}, 10) == [[0, 1], [3], [4, 5]]
    assert partition_clusters({}, 10) == []


def test_disk_store_on_s3(s3_bucket, tmp_path):
    ids, clusters, tokens = _corpus([12, 30, 7])
    workdir = WorkDir(f"s3://{s3_bucket['bucket']}/root", "queues-s3", s3_bucket["storage_options"])
    keys = write_cluster_stage(workdir, ids, clusters, tokens)
    write_cluster_queues(workdir, keys, 0, row_group_size=8)
    disk = DiskClusterQueues(workdir)
    memory = ClusterQueues(ids, clusters, tokens, 0)
    assert disk.fingerprint() == memory.fingerprint()
    for c in (0, 1, 2):
        assert disk.read(c, 3, 20).doc_id == memory.read(c, 3, 20).doc_id


def _noise(doc_id: str) -> float:
    h = hashlib.blake2b(doc_id.encode(), digest_size=16).digest()
    return (sum(h) / len(h) - 127.5) / 18.5


@pytest.mark.parametrize("accept", ["block", "documents", "two_stage"])
def test_quad_on_the_disk_store_equals_quad_in_memory_round_by_round(tmp_path, accept):
    workdir, keys, _, _, disk, (ids, clusters, tokens) = _stores(tmp_path)
    neighbours = load_cluster_neighbours(workdir)
    cfg = QuadConfig(accept=accept, warmup_size=30, block_size=6, arms_per_round=2, fill_rejected=True)
    means = np.linspace(-1.5, 1.5, len(SIZES))
    budget = int(tokens.sum() * 0.4)
    memory = QuadSelector(cfg, ids, clusters, tokens, budget, neighbours, seed=3)
    on_disk = QuadSelector.on_store(cfg, disk, budget, neighbours, seed=3)
    rounds = 0
    while (plan := memory.plan_round()) is not None:
        disk_plan = on_disk.plan_round()
        assert [(it.cluster, it.block, it.sample, it.start, it.stop, it.positions) for it in disk_plan.items] == \
            [(it.cluster, it.block, it.sample, it.start, it.stop, it.positions) for it in plan.items]
        assert all(len(it.shards) == len(it.rows) == len(it.sample) and all(s.startswith("data/") for s in it.shards)
                   for it in disk_plan.items)
        scores = [[(means[it.cluster] + _noise(d)) * 1e-3 for d in it.sample] for it in plan.items]
        assert json.dumps(on_disk.apply_round(scores)) == json.dumps(memory.apply_round(scores))
        rounds += 1
    assert on_disk.plan_round() is None and rounds > 5
    assert on_disk.selection() == memory.selection()
    assert json.dumps(on_disk.summary()) == json.dumps(memory.summary())
    assert json.dumps(on_disk.to_dict()) == json.dumps(memory.to_dict())
    # a checkpoint taken in memory resumes on disk (same fingerprint)
    resumed = QuadSelector.from_dict(memory.to_dict(), neighbours=neighbours, store=disk)
    assert resumed.selection() == memory.selection()


@pytest.mark.parametrize("budget", [0, 500, 3000, 10**9])
def test_exploration_blocks_on_the_disk_store_take_what_exploration_only_takes_in_memory(tmp_path, budget):
    from selector.selection.baselines import exploration_blocks, exploration_only

    workdir, keys, _, _, disk, _ = _stores(tmp_path)
    docs, _ = load_cluster_inputs(workdir, keys)
    positions, rounds = exploration_only(docs["doc_id"], docs["cluster"], docs["n_tokens"], budget, block_size=8,
                                         seed=3)
    got_ids, got_rounds = [], []
    for cluster, start, stop, visit in exploration_blocks(disk, budget, block_size=8, seed=3):
        block = disk.read(cluster, start, stop)
        got_ids += block.doc_id
        got_rounds += [visit] * len(block)
        assert block.shard and all(s.startswith("data/") for s in block.shard)  # located, no id lookup needed
    assert got_ids == [docs["doc_id"][i] for i in positions]
    assert got_rounds == rounds.tolist()
    assert disk.cached_rows() <= 2 * 16  # two row groups cached, whatever was walked


def test_the_queue_step_as_ray_tasks_writes_what_the_in_process_loop_writes(ray_local, tmp_path):
    from workers.clusterer import queue_calls_on_ray

    ids, clusters, tokens = _corpus(SIZES)
    out = {}
    for name, calls in (("loop", None), ("ray", queue_calls_on_ray(num_cpus=0.25, in_flight=2))):
        workdir = WorkDir(str(tmp_path / name), "queues")
        keys = write_cluster_stage(workdir, ids, clusters, tokens, n_shards=4)
        info = write_cluster_queues(workdir, keys, 3, row_group_size=16, max_partition_docs=50, map_calls=calls)
        store = DiskClusterQueues(workdir)
        out[name] = (info["fingerprint"], [store.read(c, 0, store.size(c)).doc_id for c in store.cluster_ids])
    assert out["ray"] == out["loop"]


def test_queues_written_with_texts_hold_each_documents_text_and_read_them_by_position(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selector.clusters.kmeans import ASSIGN_STAGE
    from selector.data.corpus import Corpus, CorpusConfig
    from selector.data.workdir import shard_key

    ids, clusters, tokens = _corpus(SIZES, seed=4)
    text_of = {d: f"text of {d} " + "word " * (len(d) % 7) for d in ids}
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    n_shards = 3
    for s in range(n_shards):  # real shards: document i of the corpus is row i // 3 of shard i % 3
        part = list(range(s, len(ids), n_shards))
        pq.write_table(pa.table({"id": [ids[i] for i in part], "text": [text_of[ids[i]] for i in part]}),
                       corpus_dir / f"s{s}.parquet")
    config = CorpusConfig(uri=str(corpus_dir), id_column="id", min_doc_chars=1)
    shards = Corpus(config).list_shards()
    workdir = WorkDir(str(tmp_path / "work"), "queues-texts")
    keys = []
    for shard in shards:
        s = int(shard.relpath[1])
        part = np.arange(s, len(ids), n_shards)
        key = shard_key(shard.relpath)
        workdir.write_table(ASSIGN_STAGE, key, pa.table({
            "doc_id": [ids[i] for i in part], "row": pa.array(np.arange(len(part)), pa.int64()),
            "cluster": pa.array(clusters[part], pa.int32()), "distance": pa.array(np.zeros(len(part)), pa.float32()),
            "n_tokens": pa.array(tokens[part], pa.int64())}), "h")
        keys.append(key)
    infos = {shard_key(s.relpath): s for s in shards}
    info = write_cluster_queues(workdir, keys, 3, shard_names={k: s.relpath for k, s in infos.items()},
                                row_group_size=8, texts=(config, infos))
    disk = DiskClusterQueues(workdir)
    assert disk.has_texts and info["documents"] == len(ids)
    for c in disk.cluster_ids.tolist():
        entries = disk.read(c, 0, disk.size(c))
        positions = list(range(disk.size(c)))[::-1]  # any order, across row groups
        assert disk.read_texts(c, positions) == [text_of[entries.doc_id[p]] for p in positions]
    assert len(disk._texts) <= 8
    assert "text" not in disk._row_group(0, 0).column_names  # block reads never decode texts
    with pytest.raises(IndexError):
        disk.read_texts(0, [disk.size(0)])
    plain = WorkDir(str(tmp_path / "work"), "queues-plain")
    for key in keys:
        plain.write_table(ASSIGN_STAGE, key, workdir.read_table(ASSIGN_STAGE, key), "h")
    write_cluster_queues(plain, keys, 3, row_group_size=8)
    without = DiskClusterQueues(plain)
    assert not without.has_texts and without.fingerprint() == disk.fingerprint()
    with pytest.raises(ValueError, match="without texts"):
        without.read_texts(0, [0])
