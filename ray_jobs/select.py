"""The selection job: corpus -> index -> [embed -> cluster] -> [reference] -> select -> manifest.

    python -m ray_jobs.select --config job.yaml

Runs on a local Ray, or on the cluster named by ``ray.address`` / ``RAY_ADDRESS`` (as under
``ray job submit``). Every stage writes its outputs to the work dir with the hash of the
config it depends on, so re-running a killed job redoes only unfinished work.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from selector.config import JobConfig, load_config
from selector.data.corpus import Corpus, ShardInfo
from selector.errors import ConfigError, ManifestError, ModelLoadError
from selector.data.manifest import ManifestWriter, manifest_uri, read_manifest, run_summary, selection_table
from selector.models.loading import load_tokenizer, tokenizer_fingerprint
from selector.data.storage import set_retry_seconds, storage_error
from ray_jobs.errors import quiet_ray_data_console, quiet_worker_tracebacks
from selector.data.workdir import WorkDir
from workers.runtime import connect, job_env, resolve_workers
from workers.index_reads import random_selection
from workers.indexer import index_corpus


@dataclass
class Job:
    """What every method's pipeline needs: the config, the work dir, the shard listing.

    The driver holds the shard listing (O(shards)). Nothing here holds the corpus index: every
    method's selection comes from per-shard or per-cluster files in the work dir (index tables,
    ranked runs, cluster queues, feature shards), read by tasks (:mod:`workers.index_reads`), and
    names documents by (shard, row).
    """

    config: JobConfig
    workdir: WorkDir
    shards: list[ShardInfo]
    budget: int
    progress: bool
    log: Callable[[str], None]
    hooks: object = None  # ray_jobs.refresh.RefreshHooks during a refresh, else None
    n_documents: int = 0  # in the index (the corpus's documents that passed validation)
    _loss_workers: list | None = None


def run(config: JobConfig, progress: bool = True, log=print) -> str:
    """Run the job described by ``config``; returns the committed manifest's URI."""
    set_retry_seconds(config.storage.retry_seconds)  # before Ray starts: local workers inherit it
    run_id = config.resolved_run_id()
    target = manifest_uri(config.work.root, run_id)
    started = time.monotonic()
    try:
        existing = read_manifest(target, config.work.storage_options, columns=["doc_id"])
        log(f"run {run_id} already committed its manifest ({len(existing)} documents): {target}")
        return target
    except ManifestError:
        pass  # not committed yet: run (finished stages are skipped)
    except Exception as exc:  # the first touch of the work root: name it if storage failed
        error = storage_error(exc, config.work.root, what="work root", setting="work",
                              storage_options=config.work.storage_options, elapsed=time.monotonic() - started)
        if error is None:
            raise
        raise error from exc
    workdir = WorkDir(config.work.root, run_id, config.work.storage_options)
    return run_pipeline(config, run_id, workdir, progress, log)


def run_pipeline(config: JobConfig, run_id: str, workdir: WorkDir, progress: bool = True, log=print,
                 shards: list[ShardInfo] | None = None, hooks=None) -> str:
    """The pipeline with its stages in ``workdir`` and its manifest committed as ``run_id``.

    ``shards``: the corpus listing to use (default: list it now). ``hooks``: the refresh job's
    (:class:`ray_jobs.refresh.RefreshHooks`): incremental clustering, bandit carry-forward,
    reuse of an unchanged selection and the delta file; None for a plain run.
    """
    set_retry_seconds(config.storage.retry_seconds)
    try:  # fail fast on a wrong path, before any Ray work
        tokenizer = load_tokenizer(config.tokenizer)
    except ModelLoadError as exc:
        raise ModelLoadError(f"tokenizer: {exc}\n  check: `tokenizer` in the job config names the trainer's "
                             "tokenizer folder (save_pretrained: tokenizer.json, tokenizer_config.json)") from exc
    check_model_paths(config)
    if shards is None:  # also before Ray starts: a wrong URI or an unreachable store fails in seconds
        shards = Corpus(config.corpus).list_shards()
    connect(config.ray)
    config = resolve_workers(config, log)  # `auto` pool sizes from the cluster's GPUs / CPU cores and memory
    quiet_worker_tracebacks()  # the error is reported once, by ray_jobs.errors (not with --debug)
    quiet_ray_data_console()

    # 1. index: list shards, validate, count documents and tokens
    log(f"run {run_id}: {len(shards)} shards under {config.corpus.uri}")
    index_stats = index_corpus(config.corpus, config.tokenizer, workdir, shards,
                               config.stage_hash("corpus", "tokenizer"), config.ray.shard_readers,
                               config.ray.reader_num_cpus, progress)
    log(f"indexed {index_stats['documents']:,} documents, {index_stats['tokens']:,} tokens, "
        f"{index_stats['rejected']} rejected ({index_stats['shards_skipped']} shards already indexed)")
    check_budget(config, index_stats)
    job = Job(config, workdir, shards, config.budget.resolve(index_stats["tokens"]), progress, log,
              hooks=hooks, n_documents=index_stats["documents"])

    tokenizer_info = {"path": config.tokenizer, "fingerprint": tokenizer_fingerprint(tokenizer)}
    reused = hooks.reuse(job, index_stats) if hooks is not None else None
    if reused is not None:  # a refresh of an unchanged corpus: the previous selection, as it was
        rows, extra = reused
    else:
        # 2-5. the method's own stages, then its selection
        rows, extra = METHODS[config.method](job)
        # 6. token masks (Rho-1) on top of any method's selection
        if config.mask_tokens:
            rows, mask_summary = add_token_masks(job, rows)
            extra.setdefault("stages", {})["mask"] = mask_summary
    if config.mask_tokens:
        tokenizer_info["token_masks"] = ("token_mask: np.packbits(mask, bitorder='little') "
                                         "over this tokenizer's tokens")

    # manifest, committed last
    table = selection_table(rows)
    writer = ManifestWriter(config.work.root, run_id, config.work.storage_options)
    writer.write(table)
    summary = run_summary(config, shards, index_stats, job.budget, table,
                          models=model_identities(config),
                          tokenizer=tokenizer_info,
                          stages={"index": {k: v for k, v in index_stats.items() if k != "shards"},
                                  **extra.pop("stages", {})})
    summary.update(extra)
    if hooks is not None:
        hooks.before_commit(job, writer, table, summary)
    uri = writer.commit(summary)
    selected = summary["budget"]["selected_tokens"]
    log(f"selected {summary['budget']['selected_documents']:,} documents, {selected:,} of {job.budget:,} "
        f"budget tokens -> {uri}")
    if selected < 0.9 * job.budget:
        log(f"warning: the selection fills only {selected / max(job.budget, 1):.0%} of the budget")
    return uri


def check_model_paths(config: JobConfig) -> None:
    """Every local model folder the method will load exists (checked before Ray starts; URIs are
    checked by the workers that copy them)."""
    from pathlib import Path

    wanted: list[tuple[str, str]] = []
    if config.method in ("quad", "topk-influence") and config.proxy_model:
        wanted.append(("proxy_model", config.proxy_model))
    if config.method in ("quad", "exploration-only"):
        from selector.clusters.embedding import PACKAGED_MINILM

        if config.embed.model != PACKAGED_MINILM:
            wanted.append(("embed.model", config.embed.model))
    if config.rho is not None and (config.method in ("perplexity", "rho") or config.mask_tokens):
        wanted += [("rho.reference_model", config.rho.reference_model),
                   ("rho.training_model", config.rho.training_model)]
    if config.method == "gtp" and config.gtp is not None:
        wanted += [(f"gtp.checkpoints[{i}]", p) for i, p in enumerate(config.gtp.checkpoints)]
    for key, path in wanted:
        if "://" in path and not path.startswith("file://"):
            continue
        local = Path(path.removeprefix("file://"))
        if not (local / "config.json").is_file():
            state = "does not exist" if not local.exists() else "is not a save_pretrained folder (no config.json)"
            raise ModelLoadError(f"{key} {path!r} {state}\n"
                                 f"  check: {key} in the job config names a model folder written by save_pretrained")


def check_budget(config: JobConfig, index_stats: dict) -> None:
    """A token budget the corpus cannot fill is a config error (every method would select everything)."""
    tokens = index_stats["tokens"]
    if config.budget.tokens is not None and config.budget.tokens > tokens:
        raise ConfigError(f"budget.tokens ({config.budget.tokens:,}) is larger than the corpus "
                          f"{config.corpus.uri} ({tokens:,} tokens in {index_stats['documents']:,} documents, "
                          f"{index_stats['rejected']} rejected)\n"
                          "  check: lower budget.tokens, or give budget.fraction (e.g. 0.2) instead")


# --------------------------------------------------------------------------- methods
# Each takes the Job and returns (manifest rows, extra manifest.json keys).


def select_random(job: Job):
    """The hash-order prefix under the budget, merged from the index groups' prefixes (O(selection))."""
    chosen = random_selection(job.workdir, [s.relpath for s in job.shards], job.config.seed, job.budget,
                              job.n_documents, min_groups=job.config.ray.shard_readers)
    return located_rows(job, chosen.select(["doc_id", "shard", "row", "n_tokens"]), "random"), {}


def select_quad(job: Job):
    """Quad with nothing O(documents) in the driver: the queues are written shard by shard and
    partition by partition (:func:`cluster_queues`), the bandit actor holds O(clusters) state, each
    round's plan (O(round)) names its documents by (shard, row) and carries their texts, and
    the selection comes back with its shards and rows (O(selection)) for the manifest."""
    from workers.bandit import run_quad_rounds, start_bandit
    from workers.influence_stage import influence_score_fn, prepare_influence

    keys, stages = embed_and_cluster(job)
    stages["cluster_queues"] = cluster_queues(job, keys, with_texts=True)
    workers = prepare_influence(job.config, job.workdir, job.shards, job.progress, job.log)
    scores = {}
    if job.hooks is not None:  # a refresh: seed the bandit with the previous run's arm statistics
        stages["bandit_carry"] = job.hooks.prepare_bandit(job)
        # ... and look up the influence scores the previous run computed (selector.quad.score_cache)
        stages["score_cache"] = cache = job.hooks.score_cache(job)
        scores = {"score_log": cache["log"], "score_cache": cache["cache_from"]}
    bandit = start_bandit(job.workdir, job.config.quad, job.budget, job.config.seed, **scores)  # reads the queues
    score_fn = influence_score_fn(workers, job.config.corpus, job.shards)
    status = run_quad_rounds(bandit, score_fn, job.progress, job.log, calibrate_fn=tau_calibration(job))
    spent = score_fn.spent
    job.log(f"quad: scored {spent['documents']:,} documents: reading texts {spent['read_seconds']:.1f} s, "
            f"influence {spent['influence_seconds']:.1f} s")
    chosen = ray.get(bandit.selection_table.remote())
    summary = ray.get(bandit.summary.remote())
    ray.kill(bandit)  # the run is finished; its checkpoint stays in the work dir
    rows = located_rows(job, chosen, "quad", cluster=chosen["cluster"], score=chosen["score"],
                        round=chosen["round"])
    stages["quad"] = {k: status[k] for k in ("round", "stop_reason", "used_tokens", "cache_hits", "cache_misses",
                                             "round_seconds") if k in status}
    stages["quad"]["scoring"] = {k: round(v, 3) for k, v in spent.items()}
    return rows, {"quad": summary, "stages": stages}


def _choose_tau_bucket(buckets, model: str, storage_options, validation, **kw) -> dict:
    from selector.models.loading import local_model_path
    from selector.quad.tau_validation import choose_bucket

    return choose_bucket(buckets, local_model_path(model, storage_options), validation, **kw)


def tau_calibration(job: Job):
    """``quad.tau: validate``: a function that picks tau from the warm-up's influence buckets by
    short proxy trainings scored on the held-out part of the reference set (selector.quad.tau_validation),
    run as one Ray task (a GPU when the cluster has one). The buckets' texts are read by their
    (shard, row): O(warm-up)."""
    if job.config.quad.tau != "validate":
        return None
    from workers.influence_stage import query_and_validation_texts
    from workers.index_reads import read_located

    def calibrate(buckets: list[dict]) -> dict:
        _, validation = query_and_validation_texts(job.config, job.log)
        by_path = {s.relpath: s for s in job.shards}
        for b in buckets:
            b["texts"] = read_located(job.config.corpus, by_path, b["shards"], b["rows"])
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(_choose_tau_bucket).options(**job_env(num_cpus=job.config.ray.worker_num_cpus, num_gpus=gpus))
        result = ray.get(task.remote(buckets, job.config.proxy_model, job.workdir.storage_options, validation,
                                     steps=job.config.quad.validation_steps, seed=job.config.seed))
        job.log(f"quad: tau validated on {len(validation)} held-out reference documents: bucket {result['bucket']} "
                f"of {len(buckets)} (tau {result['tau']:.4g}) in {result['seconds']:.1f} s")
        return result

    return calibrate


INFLUENCE_RUN_STAGE = "influence_runs"  # topk-influence: per-shard influence scores, ranked


def select_topk_influence(job: Job):
    """Influence of every document, highest first under the budget (selector.selection.baselines.topk_influence).

    The per-shard scoring is a Ray Data stage (workers.influence.ScoreShardInfluence: the proxy and the
    query per actor, each shard's texts read by its actor, never through the driver), each shard
    written as a ranked run to the work dir (resumable per shard); the selection is the k-way merge
    of the runs (selector.selection.ranked, rule ``prefix``, ties by hash key)."""
    from selector.selection.ranked import KEY, select_from_runs
    from selector.data.workdir import shard_key
    from workers.influence import RUN_STAGE, ScoreShardInfluence
    from workers.influence_stage import STAGE, prepare_influence
    from workers.runtime import pending_shards
    from workers.shard_stage import run_shard_stage

    job_hash = job.config.stage_hash("corpus", "tokenizer", "proxy_model", "influence", "factors", "seed", "reference")
    hashes, todo, per_shard = pending_shards(job.workdir, RUN_STAGE, job.shards, job_hash)
    keys = {s.relpath: shard_key(s.relpath) for s in job.shards}
    if todo:
        # factors and query (fitted, or found in the work dir); the fitting actors then make way
        for worker in prepare_influence(job.config, job.workdir, job.shards, job.progress, job.log):
            ray.kill(worker)
        kwargs = {"model_path": job.config.proxy_model, "config": job.config.influence.model_dump(mode="json"),
                  "storage_options": job.workdir.storage_options,
                  "query_uri": job.workdir.uri(STAGE, "query.safetensors"),
                  "corpus_config": job.config.corpus.model_dump(mode="json"),
                  "work": (job.workdir.root, job.workdir.run_id, job.workdir.storage_options), "seed": job.config.seed}
        per_shard += run_shard_stage("influence", ScoreShardInfluence, kwargs, todo, hashes,
                                     concurrency=job.config.ray.influence_workers, progress=job.progress,
                                     count_key="n_docs", **model_actor_resources(job))
    runs = [job.workdir.iter_row_groups(RUN_STAGE, keys[s.relpath],
                                        columns=[KEY, "hash_key", "doc_id", "shard", "row", "n_tokens", "score"])
            for s in job.shards]
    mins = [int(p["min_tokens"]) for p in per_shard if p["n_docs"] - p["unscored"] > 0]
    chosen = select_from_runs(runs, job.budget, min(mins) if mins else 0, columns=("shard", "row", "n_tokens", "score"),
                              tie="hash_key", rule="prefix")
    rows = located_rows(job, chosen, "topk-influence", score=[float(x) for x in chosen["score"]])
    return rows, {"stages": {"influence": {"scored_documents": int(sum(p["n_docs"] for p in per_shard)),
                                           "unscored_documents": int(sum(p["unscored"] for p in per_shard)),
                                           "shards_scored": len(todo), "shards_skipped": len(job.shards) - len(todo)}}}


def select_exploration_only(job: Job):
    """Quad's walk over the clusters without scoring: the blocks come from the queues in the work
    dir (selector.selection.baselines.exploration_blocks), read one block at a time; O(selection) here."""
    from selector.selection.baselines import exploration_blocks
    from selector.clusters.queues import DiskClusterQueues

    keys, stages = embed_and_cluster(job)
    stages["cluster_queues"] = cluster_queues(job, keys)
    store = DiskClusterQueues(job.workdir)
    chosen: dict[str, list] = {"doc_id": [], "shard": [], "row": [], "n_tokens": [], "cluster": [], "round": []}
    for cluster, start, stop, visit in exploration_blocks(store, job.budget, job.config.quad.block_size,
                                                          job.config.seed):
        block = store.read(cluster, start, stop)
        chosen["doc_id"] += block.doc_id
        chosen["shard"] += block.shard
        chosen["row"] += block.row.tolist()
        chosen["n_tokens"] += block.n_tokens.tolist()
        chosen["cluster"] += [cluster] * len(block)
        chosen["round"] += [visit] * len(block)
    rows = located_rows(job, chosen, "exploration-only", cluster=chosen["cluster"], round=chosen["round"])
    return rows, {"stages": stages}


def select_by_loss(job: Job):
    """``perplexity`` (lowest mean reference loss first) or ``rho`` (highest mean excess loss first).

    The loss workers write each shard's scores as a sorted run to the work dir (resumable); the
    selection is the k-way merge of the runs (selector.selection.ranked): one row group per shard
    in memory here, never the corpus."""
    from selector.selection.ranked import KEY, select_from_runs
    from workers.loss_scorer import LOSS_STAGE, score_shards

    column, descending = ("excess_mean", True) if job.config.method == "rho" else ("ref_mean", False)
    job_hash = job.config.stage_hash("corpus", "tokenizer", "rho", extra={"method": job.config.method})
    check_loss_models(job.config)
    stats = score_shards(job.shards, job.config.rho, job.workdir, job_hash, column, descending,
                         corpus_config=job.config.corpus, n_workers=job.config.ray.loss_workers, progress=job.progress)
    keys = stats.pop("keys")
    runs = [job.workdir.iter_row_groups(LOSS_STAGE, k, columns=[KEY, "doc_id", "shard", "row", "n_tokens", column])
            for k in keys]
    chosen = select_from_runs(runs, job.budget, stats.pop("min_tokens"), columns=("shard", "row", "n_tokens", column))
    rows = located_rows(job, chosen, job.config.method, score=[float(x) for x in chosen[column]])
    return rows, {"stages": {"losses": stats}}


def select_gtp(job: Job):
    from selector.gtp.features import STAGE, FeatureShardRef, features_config_hash
    from selector.data.workdir import shard_key
    from workers.gtp import FeaturizeShards, TrajectoryFeatureActor, corpus_mean_on_ray, distributed_pursuit, \
        locate_selection
    from workers.influence_stage import reference_texts
    from workers.shard_stage import run_shard_stage

    cfg = job.config.gtp
    keys = [shard_key(s.relpath) for s in job.shards]
    # stage: per-shard trajectory features (Ray Data), resumable; each actor reads its shard's texts itself
    feature_hash = features_config_hash(cfg)
    todo = [s for s, k in zip(job.shards, keys) if not job.workdir.is_done(STAGE, k, feature_hash)]
    resources = model_actor_resources(job)
    device = "cuda" if resources.get("num_gpus") else "cpu"
    work = (job.workdir.root, job.workdir.run_id, job.workdir.storage_options)
    computed = run_shard_stage("gtp features", FeaturizeShards, {"config": cfg.model_dump(mode="json"), "work": work,
                                                                 "corpus_config": job.config.corpus.model_dump(mode="json"),
                                                                 "device": device},
                               todo, {s.relpath: feature_hash for s in todo}, concurrency=job.config.ray.influence_workers,
                               progress=job.progress, **resources)
    refs = [FeatureShardRef(job.workdir.root, job.workdir.run_id, k, job.workdir.storage_options) for k in keys]
    if cfg.target == "reference":
        actor = TrajectoryFeatureActor.options(**job_env(**resources)).remote(
            cfg.model_dump(mode="json"), job.workdir.root, job.workdir.run_id, job.workdir.storage_options, device)
        try:
            y = ray.get(actor.reference_target.remote(reference_texts(job.config, job.log)))
        finally:
            ray.kill(actor)
    else:
        y = corpus_mean_on_ray(refs)
    result = distributed_pursuit(refs, y, budget_tokens=job.budget, oversample=cfg.oversample,
                                 max_rounds=cfg.max_rounds, num_cpus=job.config.ray.worker_num_cpus,
                                 **cfg.pursuit_kwargs())
    weights = np.asarray(result.weights, dtype=np.float64)
    # Weights are reported on the mean-1 scale a trainer uses as per-document loss weights.
    scaled = weights / weights.mean() if len(weights) else weights
    ids = [str(d) for d in result.ids]
    located = locate_selection(refs, {k: s.relpath for k, s in zip(keys, job.shards)}, ids)
    rows = located_rows(job, located, "gtp", score=weights.tolist(), weight=scaled.tolist())
    stats = {"rel_residual": result.rel_residual, "stop_reason": result.stop_reason,
             "candidates": result.n_candidates, "shards_featurized": sum(1 for c in computed if c["computed"]),
             "feature_dim": int(len(y))}
    job.log(f"gtp: {len(ids)} documents, relative residual {result.rel_residual:.3f} ({result.stop_reason})")
    return rows, {"stages": {"gtp": stats}}


METHODS = {
    "random": select_random,
    "quad": select_quad,
    "topk-influence": select_topk_influence,
    "exploration-only": select_exploration_only,
    "perplexity": select_by_loss,
    "rho": select_by_loss,
    "gtp": select_gtp,
}


def add_token_masks(job: Job, rows: dict[str, list]) -> tuple[pa.Table, dict]:
    """Stage 6 (mask): Rho-1 token masks for the selected documents of any method."""
    from selector.rho.excess_loss import attach_token_masks
    from workers.loss_scorer import compute_token_masks, work_items

    selection = selection_table(rows)
    result = compute_token_masks(work_items(selection, job.shards), job.config.rho, actors=loss_workers(job),
                                 corpus_config=job.config.corpus, progress=progress_bar(job, "masks"))
    masked = attach_token_masks(selection, result.table)
    return masked, result.summary


# --------------------------------------------------------------------------- shared stages


def embed_and_cluster(job: Job) -> tuple[list[str], dict]:
    """Stages 2-3: per-shard embeddings, then k-means fit on a sample and assignment of every document."""
    from workers.clusterer import cluster_corpus
    from workers.embedder import embed_corpus

    embedded = embed_corpus(job.config.corpus, job.config.embed, job.workdir, job.shards,
                            n_workers=job.config.ray.embed_workers, progress=job.progress,
                            num_cpus=job.config.ray.worker_num_cpus)
    job.log(f"embed: {embedded['documents']:,} documents ({embedded['shards_skipped']} shards already embedded, "
            f"{embedded['truncated']:,} truncated to {job.config.embed.max_tokens} tokens) on {embedded['device']}")
    if job.hooks is not None:  # a refresh: assign new shards to the kept centroids, refit only on drift
        clustered = job.hooks.cluster(job, embedded["keys"])
    else:
        clustered = cluster_corpus(job.workdir, embedded["keys"], job.config.cluster, progress=job.progress)
    job.log(f"cluster: k={clustered['k']}, {clustered['neighbour_pairs']} neighbour pairs, "
            f"{clustered['shards_skipped']} shards already assigned")
    stages = {"embed": {k: embedded[k] for k in ("documents", "truncated", "shards_embedded", "shards_skipped",
                                                 "device") if k in embedded},
              "cluster": {k: clustered[k] for k in ("k", "neighbour_pairs", "empty_clusters", "fit_skipped",
                                                    "shards_assigned", "refit", "drift") if k in clustered}}
    return embedded["keys"], stages


def cluster_queues(job: Job, keys: list[str], with_texts: bool = False) -> dict:
    """Stage 3b (quad, exploration-only): every cluster's queue in seeded hash order, one Parquet file per
    cluster in the work dir (selector.clusters.queues; Ray tasks per shard, then per cluster partition:
    the driver adds up O(clusters) counts). Entries name their shard by its path relative to the corpus.
    ``with_texts`` (quad): the files also hold the texts, so each round reads its sampled texts from
    the blocks it pulls (sequential in a cluster's file) instead of from shards all over the corpus."""
    from selector.clusters.queues import write_cluster_queues
    from selector.data.workdir import shard_key
    from workers.clusterer import queue_calls_on_ray

    names = {shard_key(s.relpath): s.relpath for s in job.shards}
    texts = (job.config.corpus, {shard_key(s.relpath): s for s in job.shards}) if with_texts else None
    info = write_cluster_queues(job.workdir, keys, job.config.seed, shard_names=names,
                                map_calls=queue_calls_on_ray(num_cpus=job.config.ray.worker_num_cpus), texts=texts)
    job.log(f"cluster queues: {info['clusters']} clusters, {info['documents']:,} documents"
            + (" (already written)" if info["skipped"] else ""))
    return {k: info[k] for k in ("clusters", "documents", "skipped")}


def check_loss_models(config: JobConfig) -> None:
    """Refuse a reference or training model whose tokenizer is not the job's (before any actor starts)."""
    from selector.models.loading import require_same_tokenizer

    rho = config.rho
    require_same_tokenizer({"tokenizer": config.tokenizer, "rho.reference_model": rho.reference_model,
                            "rho.training_model": rho.training_model})


def loss_workers(job: Job) -> list:
    """The reference+training model actors of the mask stage, started once per job (refuses mismatched
    tokenizers)."""
    from workers.loss_scorer import start_workers

    if job._loss_workers is None:
        check_loss_models(job.config)
        job._loss_workers = start_workers(job.config.rho, corpus_config=job.config.corpus,
                                          n_workers=job.config.ray.loss_workers)
    return job._loss_workers


def model_actor_resources(job: Job) -> dict:
    from workers.runtime import gpu_available

    return {"num_gpus": 1} if gpu_available() else {"num_cpus": job.config.ray.worker_num_cpus}


def progress_bar(job: Job, desc: str):
    """A callable taking the count of finished work items, drawing a tqdm bar (or nothing)."""
    from tqdm import tqdm

    if not job.progress:
        return None
    bar = tqdm(desc=desc, unit="batch", file=sys.stderr, mininterval=0.5)

    def update(done: int) -> None:
        bar.n = done
        bar.refresh()

    return update


def model_identities(config: JobConfig) -> dict:
    """The models a run used, for manifest.json."""
    models = {}
    if config.proxy_model:
        models["proxy_model"] = config.proxy_model
    if config.rho:
        models["reference_model"] = config.rho.reference_model
        models["training_model"] = config.rho.training_model
    if config.gtp:
        models["gtp_checkpoints"] = list(config.gtp.checkpoints)
    if config.method in ("quad", "exploration-only"):
        models["encoder"] = config.embed.model
    return models


def located_rows(job: Job, chosen: dict[str, list] | pa.Table, method: str, **columns: list) -> dict[str, list]:
    """Manifest rows from ``chosen`` columns ``doc_id, shard`` (relpath), ``row, n_tokens``, plus
    ``columns``: shard URIs from the listing (O(shards)), nothing looked up by id. A table stays
    Arrow columns (a large selection is never Python lists in the driver)."""
    if isinstance(chosen, pa.Table):
        relpaths = pa.array([s.relpath for s in job.shards])
        at = pc.index_in(chosen["shard"], value_set=relpaths)
        if at.null_count:
            raise KeyError(f"selection names a shard not in the listing: {chosen['shard'].filter(pc.is_null(at))[0]}")
        rows = {"doc_id": chosen["doc_id"], "shard": pa.array([s.uri for s in job.shards]).take(at),
                "row": chosen["row"], "n_tokens": chosen["n_tokens"],
                "method": pa.repeat(pa.scalar(method), chosen.num_rows)}
        rows.update(columns)
        return rows
    uri_of = {s.relpath: s.uri for s in job.shards}
    rows = {
        "doc_id": list(chosen["doc_id"]),
        "shard": [uri_of[p] for p in chosen["shard"]],
        "row": [int(r) for r in chosen["row"]],
        "n_tokens": [int(n) for n in chosen["n_tokens"]],
        "method": [method] * len(chosen["doc_id"]),
    }
    rows.update({k: list(v) for k, v in columns.items()})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_jobs.select``: errors as ``thresher run`` reports them (ray_jobs.errors), exit 2."""
    from ray_jobs.errors import enable_debug, quiet_ray_reports, report

    parser = argparse.ArgumentParser(prog="python -m ray_jobs.select", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML job config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="full tracebacks (also THRESHER_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.debug:
        enable_debug()
    quiet_ray_reports()
    try:
        uri = run(load_config(args.config), progress=not args.no_progress)
    except Exception as exc:
        return report(exc)
    print(f"manifest: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
