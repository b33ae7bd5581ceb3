"""Embed stage on Ray Data: an actor pool of ``EmbedShards``, each holding one encoder.

Thin over ``selector.clusters.embedding``: the stage adds residency (the model is loaded once per actor,
not per shard) and resources (one GPU per actor when the cluster has GPUs, else a fraction of a
CPU, since whole-CPU actors starve other Ray work on small machines); the executor is
:func:`workers.shard_stage.run_shard_stage`. The driver decides which shards are already done
(same config hash) before any actor starts, so a fully finished stage loads no model at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import ray

from selector.data.corpus import Corpus, CorpusConfig, ShardInfo
from selector.clusters.embedding import EmbedConfig, Encoder, embed_shard, encoder_identity, shard_config_hash, STAGE
from selector.data.workdir import WorkDir, shard_key
from workers.shard_stage import ShardStage, run_shard_stage

class EmbedShards(ShardStage):
    """One encoder; ``(shard, config_hash) -> stats`` embeds a shard into the work dir."""

    def __init__(self, corpus_config: dict, embed_config: dict, work_root: str, run_id: str,
                 work_storage_options: dict):
        self.corpus = Corpus(CorpusConfig.model_validate(corpus_config))
        self.encoder = Encoder(EmbedConfig.model_validate(embed_config))
        self.workdir = WorkDir(work_root, run_id, work_storage_options)

    def info(self) -> dict:
        import torch

        return {"pid": os.getpid(), "device": self.encoder.device, "dtype": str(self.encoder.torch_dtype),
                "dim": self.encoder.dim, "threads": torch.get_num_threads(), "identity": self.encoder.identity()}

    def process(self, shard: ShardInfo, config_hash: str) -> dict:
        return {**asdict(embed_shard(self.corpus, shard, self.encoder, self.workdir, config_hash)),
                "worker": self.info()}


def embed_corpus(corpus_config: CorpusConfig, embed_config: EmbedConfig, workdir: WorkDir,
                 shards: list[ShardInfo], n_workers: int = 2, progress: bool = True,
                 num_cpus: float | None = None, use_gpu: bool | None = None) -> dict:
    """Embed every shard not already done; returns totals and per-shard stats.

    ``use_gpu`` defaults to whether the Ray cluster has GPUs (and ``embed.device`` is not
    'cpu'); then each actor takes one GPU. On CPU each actor takes ``num_cpus`` (default
    0.5) and, unless ``embed.num_threads`` is set, that many torch threads (at least one).
    """
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and embed_config.device != "cpu"
    device = "cuda" if use_gpu else "cpu"
    identity = encoder_identity(embed_config, device)
    hashes = {s.relpath: shard_config_hash(identity, corpus_config, s) for s in shards}
    todo = [s for s in shards if not workdir.is_done(STAGE, shard_key(s.relpath), hashes[s.relpath])]
    skipped = [s for s in shards if s not in todo]
    start = time.perf_counter()
    per_shard: list[dict] = []
    for s in skipped:
        marker = (workdir.read_marker(STAGE, shard_key(s.relpath)) or {}).get("stats", {})
        per_shard.append({"shard": s.relpath, "key": shard_key(s.relpath), "skipped": True,
                          "n_docs": int(marker.get("n_docs", 0)), "n_truncated": int(marker.get("n_truncated", 0)),
                          "n_tokens": int(marker.get("n_tokens_encoder", 0)),
                          "n_rejected": int(marker.get("n_rejected", 0)), "seconds": 0.0})
    info = None
    if todo:
        cfg = embed_config
        if use_gpu:
            resources = {"num_gpus": 1, "num_cpus": num_cpus or 1}
            cfg = embed_config.model_copy(update={"device": "cuda"})
        else:
            cpus = num_cpus or 0.5
            resources = {"num_cpus": cpus}
            cfg = embed_config.model_copy(update={"device": "cpu",
                                                  "num_threads": embed_config.num_threads or max(1, int(cpus))})
        kwargs = {"corpus_config": corpus_config.model_dump(mode="json"), "embed_config": cfg.model_dump(mode="json"),
                  "work_root": workdir.root, "run_id": workdir.run_id, "work_storage_options": workdir.storage_options}
        # A shard's output is written whole, then its done marker, so a retried shard just writes it again.
        done = run_shard_stage("embed", EmbedShards, kwargs, todo, hashes, concurrency=n_workers,
                               progress=progress, count_key="n_docs", **resources)
        info = done[0].get("worker") if done else None
        per_shard.extend({k: v for k, v in d.items() if k != "worker"} for d in done)
    per_shard.sort(key=lambda r: r["shard"])
    return {
        "shards": per_shard,
        "documents": sum(r["n_docs"] for r in per_shard),
        "truncated": sum(r["n_truncated"] for r in per_shard),
        "encoder_tokens": sum(r["n_tokens"] for r in per_shard),
        "rejected": sum(r["n_rejected"] for r in per_shard),
        "shards_embedded": len(todo),
        "shards_skipped": len(skipped),
        "seconds": round(time.perf_counter() - start, 3),
        "device": device,
        "worker": info,
        "keys": [shard_key(s.relpath) for s in shards],
    }


__all__ = ["EmbedShards", "embed_corpus"]
