"""Rho-1 on Ray: reference/training per-token losses, document scores, token masks.

Each :class:`LossWorker` (and each :class:`ScoreShardLosses` actor) holds both models (one GPU each when the cluster has GPUs, else
``worker_num_cpus`` CPUs) and is a thin shell over :class:`selector.rho.excess_loss.RhoScorer`.

Two driver-side entry points:

* :func:`score_shards` — document scores for ``method: perplexity`` (mean reference loss)
  and ``method: rho`` (mean excess loss), written per shard to the work dir as sorted runs
  (:mod:`selector.selection.ranked`) by a Ray Data actor pool (:class:`ScoreShardLosses`, a per-shard
  map stage); only per-shard counts travel to the driver.
  (:func:`score_documents` returns the scores of given batches instead: tests and benches.)
* :func:`compute_token_masks` — the ``mask`` stage over a selection, on :class:`LossWorker` actors
  (not a per-shard map: the sketch mode keeps state in the actors between two phases). Global-sketch mode is
  two-phase so per-token losses never leave the workers: (1) every worker scores its batches,
  keeps their excess losses and returns a histogram; (2) the driver merges the histograms,
  picks the threshold bin, and every worker turns its stored losses into packed masks.
  Global-exact mode ships the excess losses to the driver and ranks them there (memory:
  4 bytes per token on the driver). Per-batch mode is computed inside each worker call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import ray

from selector.data.corpus import Corpus, CorpusConfig, DocumentBatch, RejectSink
from selector.errors import ModelLoadError, ThresherError
from selector.models.loading import require_same_tokenizer
from workers.runtime import fit_num_cpus, job_env, pending_shards, round_robin
from workers.shard_stage import ShardStage
from selector.rho.excess_loss import (ExcessHistogram, RhoConfig, excess_losses, mean_scores, pack_mask, topk_masks_exact,
                          topk_masks_per_batch)

RESTARTS = 3  # restarts of a dead loss actor (and retries of its in-flight calls)
ACTOR_PREFIX = "thresher-loss-"  # actor names: <prefix><job tag>-<i> (visible in `ray list actors`)


def resolve_item(corpus: Corpus | None, item) -> DocumentBatch:
    """A work item is a DocumentBatch, or ``(ShardInfo, rows | None)`` read here (so texts never pass
    through the driver); ``rows=None`` means the whole shard."""
    if isinstance(item, DocumentBatch):
        return item
    if corpus is None:
        raise ValueError("shard work items need the worker to be started with a corpus_config")
    shard, rows = item
    if rows is not None:
        return corpus.read_rows(shard, list(rows))
    out = DocumentBatch(shard.relpath)
    for b in corpus.iter_batches(shard, rejects=RejectSink()):
        for row, doc_id, text in zip(b.rows, b.doc_ids, b.texts):
            out.append(row, doc_id, text)
    return out


def score_batch(scorer, batch: DocumentBatch) -> dict:
    """Per-document scores of ``batch`` under ``scorer`` (a :class:`selector.rho.excess_loss.RhoScorer`)."""
    ref, train = scorer.score(batch.texts)
    excess = excess_losses(train.losses, ref.losses)
    return {"doc_id": batch.doc_ids, "shard": [batch.shard] * len(batch), "row": batch.rows,
            "n_tokens": ref.n_tokens, "ref_mean": mean_scores(ref.losses), "train_mean": mean_scores(train.losses),
            "excess_mean": mean_scores(excess), "skipped": ref.skipped, "tokens_scored": ref.tokens_scored}


class ScoreShardLosses(ShardStage):
    """The per-shard loss stage of ``perplexity`` / ``rho`` on Ray Data: both models per actor; each
    shard's scores written to the work dir as a run sorted by the method's order
    (:mod:`selector.selection.ranked`), then its done marker; only the shard's counts come back.
    Written whole then marked, so a shard retried after a restart just writes it again."""

    def __init__(self, config: dict, storage_options: dict | None, corpus_config: dict, work: tuple,
                 stage: str, column: str, descending: bool):
        from selector.rho.excess_loss import RhoScorer
        from selector.data.workdir import WorkDir

        self.scorer = RhoScorer(RhoConfig(**config), storage_options=storage_options)
        self.corpus = Corpus(CorpusConfig(**corpus_config))
        self.workdir = WorkDir(*work)
        self.stage, self.column, self.descending = stage, column, descending

    def process(self, shard, config_hash: str) -> dict:
        from selector.selection.ranked import ROW_GROUP, sort_run
        from selector.data.workdir import shard_key

        part = score_batch(self.scorer, resolve_item(self.corpus, (shard, None)))
        table = _score_table([part])
        run, unscored = sort_run(table, self.column, self.descending)
        tokens = run["n_tokens"].to_numpy()
        stats = {"shard": shard.relpath, "n_docs": table.num_rows, "unscored": unscored, "skipped": part["skipped"],
                 "tokens_scored": int(part["tokens_scored"]), "min_tokens": int(tokens.min()) if tokens.size else 0}
        self.workdir.write_table(self.stage, shard_key(shard.relpath), run, config_hash, stats,
                                 row_group_size=ROW_GROUP)
        return stats


@ray.remote
class LossWorker:
    """Both models of one Rho-1 run; scores documents and keeps excess losses for masking."""

    def __init__(self, config: dict, storage_options: dict | None = None, corpus_config: dict | None = None):
        from selector.rho.excess_loss import RhoScorer

        self.config = RhoConfig(**config)
        self.scorer = RhoScorer(self.config, storage_options=storage_options)
        self.corpus = Corpus(CorpusConfig(**corpus_config)) if corpus_config else None
        self._stored: list[tuple[str, str, int, int, np.ndarray]] = []  # (doc_id, shard, row, n_tokens, excess)
        self.generation = uuid.uuid4().hex  # new after a restart: the driver sees lost sketch-mode state

    def _resolve(self, item) -> DocumentBatch:
        return resolve_item(self.corpus, item)

    def tokenizer_fingerprint(self) -> str:
        return self.scorer.tokenizer_fingerprint

    def info(self) -> dict:
        """This actor's process and generation (both change when Ray restarts it)."""
        import os

        return {"pid": os.getpid(), "generation": self.generation}

    def score(self, item) -> dict:
        """Per-document scores of one work item (skipped documents have NaN scores)."""
        return score_batch(self.scorer, self._resolve(item))

    def score_for_masks(self, item, mode: str) -> dict:
        """Score a work item for the mask stage. ``mode``: 'sketch' keeps the losses here and
        returns a histogram; 'exact' returns the losses; 'per_batch' returns finished masks."""
        c = self.config
        batch = self._resolve(item)
        ref, train = self.scorer.score(batch.texts)
        excess = excess_losses(train.losses, ref.losses)
        keep = [i for i, x in enumerate(excess) if x is not None]
        out = {"skipped": ref.skipped, "skipped_ids": [batch.doc_ids[i] for i, x in enumerate(excess) if x is None]}
        meta = [(batch.doc_ids[i], batch.shard, batch.rows[i], ref.n_tokens[i]) for i in keep]
        kept_excess = [excess[i] for i in keep]
        if mode == "sketch":
            hist = ExcessHistogram(c.sketch_range[0], c.sketch_range[1], c.sketch_bins)
            for x in kept_excess:
                hist.add(x)
            self._stored.extend((*m, x) for m, x in zip(meta, kept_excess))
            out["histogram"] = hist.to_dict()
            out["generation"] = self.generation
        elif mode == "exact":
            out.update(meta=meta, excess=kept_excess)
        elif mode == "per_batch":
            masks = topk_masks_per_batch(kept_excess, c.keep_ratio, c.per_batch_tokens)
            out.update(meta=meta, masks=[pack_mask(m) for m in masks], n_kept=[int(m.sum()) for m in masks])
        else:
            raise ValueError(f"unknown mask mode {mode!r}")
        return out

    def reset(self) -> None:
        """Drop excess losses left by an interrupted sketch-mode mask stage."""
        self._stored = []

    def finish_masks(self, bin_threshold: int) -> dict:
        """Phase 2 of sketch mode: packed masks of every stored document; clears the store."""
        c = self.config
        hist = ExcessHistogram(c.sketch_range[0], c.sketch_range[1], c.sketch_bins)
        stored, self._stored = self._stored, []
        masks = hist.masks([s[4] for s in stored], bin_threshold)
        return {"meta": [s[:4] for s in stored], "masks": [pack_mask(m) for m in masks],
                "n_kept": [int(m.sum()) for m in masks], "generation": self.generation}


@dataclass
class MaskResult:
    """The ``mask`` stage's output: a table (doc_id, shard, row, n_tokens, n_kept, token_mask)
    and a summary for ``manifest.json`` (tokenizer, mode, threshold, realised error bound)."""

    table: pa.Table
    summary: dict = field(default_factory=dict)


def start_workers(config: RhoConfig, storage_options: dict | None = None,
                  corpus_config: CorpusConfig | None = None, n_workers: int | None = None) -> list:
    """The actor pool: ``rho.num_workers`` actors, else ``n_workers`` (the job's resolved
    ``ray.loss_workers``), else one per GPU (at least one); one GPU each, or fractional CPUs.

    An actor that dies (its process killed, its node lost) is restarted and its in-flight calls
    are retried (``max_restarts`` / ``max_task_retries``): scoring calls are stateless, and the
    sketch-mode mask stage detects a restarted actor and redoes its work (:func:`compute_token_masks`)."""
    paths = {"reference_model": config.reference_model, "training_model": config.training_model}
    if all("://" not in p or p.startswith("file://") for p in paths.values()):
        # Local paths: refuse a missing path or mismatched tokenizers before starting actors
        # (remote models are checked by the actors, which copy them once to their cache).
        require_same_tokenizer(paths)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = config.num_workers or n_workers or max(gpus, 1)
    opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": fit_num_cpus(config.worker_num_cpus, n)}
    tag = uuid.uuid4().hex[:8]
    actors = [LossWorker.options(**job_env(**opts), name=f"{ACTOR_PREFIX}{tag}-{i}", max_restarts=RESTARTS,
                                 max_task_retries=RESTARTS).remote(config.model_dump(mode="json"), storage_options,
                                                corpus_config.model_dump(mode="json") if corpus_config else None)
              for i in range(n)]
    try:
        fingerprints = ray.get([a.tokenizer_fingerprint.remote() for a in actors])  # surfaces load errors now
    except ray.exceptions.RayActorError as exc:
        for a in actors:
            ray.kill(a)
        cause = getattr(exc.args[0] if exc.args else None, "cause", None)
        if isinstance(cause, ThresherError):
            raise cause from None
        raise ModelLoadError(f"loss workers failed to load the models: {exc}") from exc
    if len(set(fingerprints)) != 1:
        raise ModelLoadError(f"loss workers disagree on the tokenizer: {sorted(set(fingerprints))}")
    return actors


def work_items(selection: pa.Table, shards: list, docs_per_item: int = 256) -> list[tuple]:
    """``(ShardInfo, rows)`` work items for the documents of ``selection`` (columns ``shard``,
    as shard URI or relpath, and ``row``), grouped by shard in chunks of ``docs_per_item``."""
    by_key = {s.uri: s for s in shards} | {s.relpath: s for s in shards}
    grouped: dict[str, list[int]] = {}
    for shard, row in zip(selection["shard"].to_pylist(), selection["row"].to_pylist()):
        if shard not in by_key:
            raise ValueError(f"selection names shard {shard!r}, which is not in the corpus listing")
        grouped.setdefault(by_key[shard].relpath, []).append(int(row))
    relpath_of = {s.relpath: s for s in shards}
    return [(relpath_of[rel], rows[i:i + docs_per_item]) for rel, rows in sorted(grouped.items())
            for i in range(0, len(rows), docs_per_item)]


def _sum_skips(parts: list[dict]) -> dict:
    total = {"empty": 0, "too_short": 0}
    for p in parts:
        for k, v in p["skipped"].items():
            total[k] = total.get(k, 0) + v
    return total


def score_documents(batches: Iterable[DocumentBatch], config: RhoConfig, storage_options: dict | None = None,
                    progress: Callable[[int], None] | None = None, actors: list | None = None,
        corpus_config: CorpusConfig | None = None) -> tuple[pa.Table, dict]:
    """Document scores: ``(table, stats)``.

    ``batches``: DocumentBatch objects, or ``(ShardInfo, rows | None)`` work items that the
    workers read themselves (needs ``corpus_config``). The table has doc_id, shard (relpath), row, n_tokens,
    ref_mean (the ``perplexity`` score, mean reference loss in nats), train_mean and
    excess_mean (the ``rho`` score). Skipped documents (< 2 tokens) have NaN scores and are
    counted in ``stats['skipped']``."""
    own = actors is None
    actors = actors or start_workers(config, storage_options, corpus_config)
    try:
        parts = round_robin(actors, "score", batches, progress=progress)
    finally:
        if own:
            for a in actors:
                ray.kill(a)
    table = _score_table(parts)
    stats = {"skipped": _sum_skips(parts), "tokens_scored": int(sum(p["tokens_scored"] for p in parts)),
             "documents": table.num_rows}
    return table, stats


def _score_table(parts: list[dict]) -> pa.Table:
    cols = ["doc_id", "shard", "row", "n_tokens", "ref_mean", "train_mean", "excess_mean"]
    data = {c: [v for p in parts for v in p[c]] for c in cols}
    return pa.table({"doc_id": pa.array(data["doc_id"], pa.string()), "shard": pa.array(data["shard"], pa.string()),
                     "row": pa.array(data["row"], pa.int64()), "n_tokens": pa.array(data["n_tokens"], pa.int64()),
                     **{c: pa.array(np.asarray(data[c], dtype=np.float64)) for c in cols[4:]}})


LOSS_STAGE = "losses"  # per-shard score runs of perplexity / rho (selector.selection.ranked)


def score_shards(shards: list, config: RhoConfig, workdir, job_hash: str, column: str, descending: bool,
                 corpus_config: CorpusConfig, n_workers: int | None = None, storage_options: dict | None = None,
                 progress: bool = True) -> dict:
    """Score every shard not already done under ``job_hash`` (resume) on a Ray Data actor pool
    (:class:`ScoreShardLosses`; ``rho.num_workers``, else ``n_workers``, else one per GPU; one GPU each,
    or ``rho.worker_num_cpus``), each shard written to ``losses/<shard key>.parquet`` as a sorted run;
    returns the totals and ``min_tokens`` (the shortest scored document), read from the done markers
    of skipped shards. O(shards) here."""
    from selector.data.workdir import shard_key
    from workers.shard_stage import run_shard_stage

    hashes, todo, per_shard = pending_shards(workdir, LOSS_STAGE, shards, job_hash)
    if todo:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = min(config.num_workers or n_workers or max(gpus, 1), len(todo))
        resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": fit_num_cpus(config.worker_num_cpus, n)}
        kwargs = {"config": config.model_dump(mode="json"), "storage_options": storage_options,
                  "corpus_config": corpus_config.model_dump(mode="json"),
                  "work": (workdir.root, workdir.run_id, workdir.storage_options), "stage": LOSS_STAGE,
                  "column": column, "descending": descending}
        per_shard += run_shard_stage("losses", ScoreShardLosses, kwargs, todo, hashes, concurrency=n,
                                     progress=progress, count_key="n_docs", **resources)
    mins = [int(p["min_tokens"]) for p in per_shard if p.get("n_docs", 0) - p.get("unscored", 0) > 0]
    return {"skipped": _sum_skips(per_shard), "tokens_scored": int(sum(p["tokens_scored"] for p in per_shard)),
            "documents": int(sum(p["n_docs"] for p in per_shard)),
            "unscored_documents": int(sum(p["unscored"] for p in per_shard)),
            "shards_scored": len(todo), "shards_skipped": len(shards) - len(todo),
            "min_tokens": min(mins) if mins else 0, "keys": [shard_key(s.relpath) for s in shards]}


def compute_token_masks(batches: Iterable[DocumentBatch], config: RhoConfig, storage_options: dict | None = None,
                        progress: Callable[[int], None] | None = None, actors: list | None = None,
        corpus_config: CorpusConfig | None = None) -> MaskResult:
    """Rho-1 token masks for the documents in ``batches`` (the selection of any method; work
    items as in :func:`score_documents`). Merge into a selection with
    :func:`selector.rho.excess_loss.attach_token_masks` (the table rows come in no particular order)."""
    mode = "per_batch" if config.mask_mode == "per_batch" else config.global_method
    own = actors is None
    actors = actors or start_workers(config, storage_options, corpus_config)
    summary: dict = {"mask_mode": config.mask_mode, "keep_ratio": config.keep_ratio,
                     "tokenizer_fingerprint": ray.get(actors[0].tokenizer_fingerprint.remote()),
                     "reference_model": config.reference_model, "training_model": config.training_model,
                     "bit_order": "little", "add_bos": config.add_bos}
    batches = list(batches)
    try:
        for attempt in range(RESTARTS + 1):
            ray.get([a.reset.remote() for a in actors])
            parts = round_robin(actors, "score_for_masks", batches, (mode,), progress=progress)
            if mode != "sketch":
                break
            merged = ExcessHistogram(config.sketch_range[0], config.sketch_range[1], config.sketch_bins)
            for p in parts:
                merged = merged.merge(ExcessHistogram.from_dict(p["histogram"]))
            b, info = merged.threshold(config.keep_ratio)
            finished = ray.get([a.finish_masks.remote(b) for a in actors])
            # An actor restarted between the phases lost the losses it kept: redo the stage.
            if {p["generation"] for p in parts} <= {f["generation"] for f in finished}:
                break
            if attempt == RESTARTS:
                raise ThresherError("mask stage: loss actors kept restarting; their stored losses were lost "
                                    f"{RESTARTS + 1} times")
        if mode == "sketch":
            summary.update(global_method="sketch", threshold_bin=b, **info)
            meta = [m for f in finished for m in f["meta"]]
            masks = [m for f in finished for m in f["masks"]]
            n_kept = [k for f in finished for k in f["n_kept"]]
        elif mode == "exact":
            meta = [m for p in parts for m in p["meta"]]
            bool_masks = topk_masks_exact([x for p in parts for x in p["excess"]], config.keep_ratio)
            masks = [pack_mask(m) for m in bool_masks]
            n_kept = [int(m.sum()) for m in bool_masks]
            summary["global_method"] = "exact"
        else:
            meta = [m for p in parts for m in p["meta"]]
            masks = [m for p in parts for m in p["masks"]]
            n_kept = [k for p in parts for k in p["n_kept"]]
            summary["per_batch_tokens"] = config.per_batch_tokens
    finally:
        if own:
            for a in actors:
                ray.kill(a)
    summary["skipped"] = _sum_skips(parts)
    # Capped so manifest.json stays small; the counts in "skipped" are complete.
    summary["skipped_ids"] = [d for p in parts for d in p["skipped_ids"]][:1000]
    summary["tokens_scored"] = int(sum(m[3] - 1 for m in meta))
    summary["tokens_kept"] = int(sum(n_kept))
    table = pa.table({"doc_id": pa.array([m[0] for m in meta], pa.string()),
                      "shard": pa.array([m[1] for m in meta], pa.string()),
                      "row": pa.array([m[2] for m in meta], pa.int64()),
                      "n_tokens": pa.array([m[3] for m in meta], pa.int64()),
                      "n_kept": pa.array(n_kept, pa.int64()),
                      "token_mask": pa.array(masks, pa.binary())})
    return MaskResult(table=table, summary=summary)
