"""workers.embedder / workers.clusterer on a real local Ray: actor pool, resume, parity with in-process."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selector.clusters.kmeans import ASSIGN_STAGE, SUMMARY_STAGE, ClusterConfig, cluster_stage, load_centroids
from selector.data.corpus import Corpus, CorpusConfig
from selector.clusters.embedding import STAGE, EmbedConfig, Encoder
from selector.data.workdir import WorkDir, shard_key
from workers.clusterer import cluster_corpus
from workers.embedder import embed_corpus


def test_embed_and_cluster_on_ray(ray_local, tiny_bert_dir, real_texts, tmp_path):
    texts = real_texts[:90]
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": texts[i::3]}), root / f"part-{i}.parquet")
    corpus_cfg = CorpusConfig(uri=str(root), batch_size=16)
    shards = Corpus(corpus_cfg).list_shards()
    embed_cfg = EmbedConfig(model=str(tiny_bert_dir), max_tokens=48, batch_size=8)
    workdir = WorkDir(str(tmp_path / "work"), "r")

    stats = embed_corpus(corpus_cfg, embed_cfg, workdir, shards, n_workers=2, progress=False, num_cpus=0.5)
    assert stats["documents"] == 90 and stats["shards_embedded"] == 3 and stats["shards_skipped"] == 0
    assert stats["truncated"] > 0 and stats["device"] == "cpu"
    assert stats["worker"]["threads"] == 1 and stats["worker"]["dtype"] == "torch.float32"
    # The actors' vectors equal an in-process encoder's, shard by shard, in row order.
    local = Encoder(embed_cfg)
    for i, shard in enumerate(shards):
        got = workdir.read_array(STAGE, shard_key(shard.relpath))
        np.testing.assert_array_equal(got, local.encode(texts[i::3]).embeddings)

    npys = {s.relpath: f"{workdir.stage_dir(STAGE)}/{shard_key(s.relpath)}.npy" for s in shards}
    mtimes = {p: os.path.getmtime(f) for p, f in npys.items()}
    again = embed_corpus(corpus_cfg, embed_cfg, workdir, shards, n_workers=2, progress=False)
    assert again["shards_skipped"] == 3 and again["shards_embedded"] == 0 and again["worker"] is None
    assert again["documents"] == 90 and again["truncated"] == stats["truncated"]
    assert {p: os.path.getmtime(f) for p, f in npys.items()} == mtimes

    # A rewritten shard (new version) is the only one redone.
    time.sleep(0.01)
    pq.write_table(pa.table({"text": texts[1::3][:20]}), root / "part-1.parquet")
    shards = Corpus(corpus_cfg).list_shards()
    third = embed_corpus(corpus_cfg, embed_cfg, workdir, shards, n_workers=2, progress=False)
    assert third["shards_embedded"] == 1 and third["shards_skipped"] == 2 and third["documents"] == 80

    keys = third["keys"]
    cfg = ClusterConfig(k=5, sample_size=60, seed=1, neighbour_radius=0.5)
    result = cluster_corpus(workdir, keys, cfg, progress=False)
    assert result["k"] == 5 and result["documents"] == 80 and result["shards_assigned"] == 3
    sizes = workdir.read_table(SUMMARY_STAGE, "clusters").column("size").to_numpy()
    assert sizes.sum() == 80
    rerun = cluster_corpus(workdir, keys, cfg, progress=False)
    assert rerun["fit_skipped"] and rerun["shards_skipped"] == 3

    # Same seed in-process gives the same centroids and assignments (CPU determinism).
    other = WorkDir(str(tmp_path / "work"), "r2")
    for key in keys:
        other.write_table(STAGE, f"{key}.ids", workdir.read_table(STAGE, f"{key}.ids"), "x")
        marker = workdir.read_marker(STAGE, key)
        other.write_array(STAGE, key, workdir.read_array(STAGE, key), marker["config_hash"], marker["stats"])
    cluster_stage(other, keys, cfg)
    np.testing.assert_array_equal(load_centroids(other), load_centroids(workdir))
    for key in keys:
        assert other.read_table(ASSIGN_STAGE, key).equals(workdir.read_table(ASSIGN_STAGE, key))
