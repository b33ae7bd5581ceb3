"""Cluster stage on Ray: one k-means fit task, then one assignment task per shard.

Thin over ``selector.clusters.kmeans``. The fit runs as a single task (on a GPU when the cluster
has one and faiss-gpu is installed there) that samples the embeddings, picks k and writes
the centroids; the assignment tasks each read the centroids and one shard's embeddings
from the work dir, so no large array passes through the driver. The driver then writes the
cluster and neighbour tables (streaming the per-shard assignment files).

:func:`queue_calls_on_ray` runs Quad's queue step (selector.clusters.queues) as Ray tasks: one per
shard to sort, one per cluster partition to merge.
"""

from __future__ import annotations

import time

import ray

from selector.clusters.kmeans import (ClusterConfig, ClusterModel, assign_hash_for, assign_shard, fit_stage,
                                 load_centroids, write_summaries)
from selector.data.workdir import WorkDir
from workers.runtime import job_env


def _limit_threads(num_cpus: float) -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, int(num_cpus)))


@ray.remote
def _fit_task(work: tuple, keys: list[str], config: dict, num_cpus: float) -> dict:
    _limit_threads(num_cpus)
    workdir = WorkDir(*work)
    cfg = ClusterConfig.model_validate(config)
    model, result = fit_stage(workdir, keys, cfg)
    return {"k": result.k, "fit_hash": result.fit_hash, "assign_hash": assign_hash_for(result.fit_hash, model),
            "elbow": result.elbow, "fit_seconds": result.fit_seconds, "fit_skipped": result.fit_skipped}


@ray.remote
def _assign_task(work: tuple, key: str, assign_hash: str, batch_size: int, use_gpu: bool, num_cpus: float) -> dict:
    _limit_threads(num_cpus)
    workdir = WorkDir(*work)
    model = ClusterModel(load_centroids(workdir), use_gpu=use_gpu)
    return dict(assign_shard(workdir, key, model, assign_hash, batch_size), key=key)


def cluster_corpus(workdir: WorkDir, keys: list[str], config: ClusterConfig, progress: bool = True,
                   num_cpus: float = 0.5, fit_num_cpus: float = 1.0, use_gpu: bool | None = None) -> dict:
    """Fit (or reuse) the centroids, assign every shard in parallel, write the summary tables.

    ``keys`` are the embedded shards' keys (``embed_corpus(...)["keys"]``). The fit task
    takes ``fit_num_cpus`` (and as many faiss threads), each assignment task ``num_cpus``.
    ``use_gpu`` defaults to whether the Ray cluster has GPUs and ``cluster.use_gpu`` is not
    false; the tasks then take a GPU each and faiss-gpu must be importable on the workers.
    """
    from workers.progress import gather

    keys = sorted(keys)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and config.use_gpu is not False
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": num_cpus}
    fit_resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": fit_num_cpus}
    cfg = config.model_copy(update={"use_gpu": bool(use_gpu)})
    work = (workdir.root, workdir.run_id, workdir.storage_options)
    start = time.perf_counter()
    fit = ray.get(_fit_task.options(**job_env(**fit_resources)).remote(work, keys, cfg.model_dump(mode="json"),
                                                            fit_resources["num_cpus"]))
    fit_done = time.perf_counter()
    futures = [_assign_task.options(**job_env(**resources)).remote(work, key, fit["assign_hash"], cfg.assign_batch_size,
                                                        bool(use_gpu), resources["num_cpus"]) for key in keys]
    per_shard = gather(futures, "cluster", enabled=progress)
    model = ClusterModel(load_centroids(workdir))  # the neighbour search is small: CPU on the driver
    table, neighbours = write_summaries(workdir, keys, model, fit["assign_hash"], config)
    sizes = table.column("size").to_numpy()
    return {
        **fit,
        "documents": int(sum(s.get("n_docs", 0) for s in per_shard)),
        "shards_assigned": sum(1 for s in per_shard if not s["skipped"]),
        "shards_skipped": sum(1 for s in per_shard if s["skipped"]),
        "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "neighbour_pairs": neighbours.num_rows,
        "assign_seconds": round(time.perf_counter() - fit_done, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "use_gpu": bool(use_gpu),
        "shards": per_shard,
    }


@ray.remote
def _queue_task(module: str, name: str, work: tuple, *args):
    import importlib

    return getattr(importlib.import_module(module), name)(WorkDir(*work), *args)


def queue_calls_on_ray(num_cpus: float = 0.5, in_flight: int = 8):
    """``map_calls`` for :func:`selector.clusters.queues.write_cluster_queues` (and
    :func:`selector.quad.score_cache.build_score_cache`): each unit (one shard's sort, one partition's merge,
    one range of the score cache) as a Ray task, at most ``in_flight`` at a time, results
    yielded in call order as they are needed (the caller adds each shard's cluster counts before the
    next arrives, so it holds O(clusters), never O(shards x clusters))."""

    def run(fn, calls):
        pending = []
        for workdir, *args in calls:
            work = (workdir.root, workdir.run_id, workdir.storage_options)
            task = _queue_task.options(**job_env(num_cpus=num_cpus))
            pending.append(task.remote(fn.__module__, fn.__name__, work, *args))
            if len(pending) >= in_flight:
                yield ray.get(pending.pop(0))
        while pending:
            yield ray.get(pending.pop(0))

    return run


__all__ = ["cluster_corpus", "queue_calls_on_ray"]
