"""Stage 4 (reference): fit K-FAC factors in parallel, build the query, load it on every worker.

Both outputs live in the work dir (``kfac/factors.safetensors``, ``kfac/query.safetensors``)
with done markers, so a resumed job loads them instead of refitting.

Documents are read by location, ``(shard, row)``, by tasks over the work-dir index and the shards
(:mod:`workers.index_reads`); the driver holds no per-document map (the factor sample is
O(task groups x factors.documents), a scored batch O(batch)).
"""

from __future__ import annotations

import time
from typing import Callable

import ray

from selector.data.corpus import Corpus, RejectSink
from selector.data.workdir import WorkDir
from workers.influence import fit_factors_parallel, make_workers, score_parallel
from workers.index_reads import random_sample_located, read_located

STAGE = "kfac"


def reference_texts(config, log: Callable[[str], None] = print) -> list[str]:
    """Up to ``reference.max_documents`` documents of the reference set, in shard order."""
    ref = config.reference
    corpus = Corpus(ref)
    sink = RejectSink()
    texts: list[str] = []
    for shard in corpus.list_shards():
        for batch in corpus.iter_batches(shard, rejects=sink):
            texts.extend(batch.texts)
            if len(texts) >= ref.max_documents:
                return texts[: ref.max_documents]
    if len(sink):
        log(f"reference set: {len(sink)} bad records quarantined (first: {sink.records[0].message()})")
    return texts


def validates_tau(config) -> bool:
    return config.method == "quad" and config.quad.tau == "validate"


def query_and_validation_texts(config, log: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """The reference documents that build the influence query, and (``quad.tau: validate``) the
    held-out validation part that picks tau (:func:`selector.quad.tau_validation.split_reference`)."""
    texts = reference_texts(config, log)
    if not validates_tau(config):
        return texts, []
    from selector.quad.tau_validation import split_reference

    return split_reference(texts, config.quad.validation_fraction, config.seed)


def prepare_influence(config, workdir: WorkDir, shards: list, progress: bool = True,
                      log: Callable[[str], None] = print) -> list:
    """Influence workers holding the model, the fitted factors and the preconditioned query."""
    # The work dir's storage options reach the workers: they read and write the factor and query
    # files there (an S3-compatible store needs its endpoint_url from them).
    workers = make_workers(config.ray.influence_workers, config.proxy_model, config.influence,
                           num_cpus=config.ray.worker_num_cpus, storage_options=workdir.storage_options)
    fit_hash = config.stage_hash("corpus", "tokenizer", "proxy_model", "influence", "factors", "seed",
                                 extra={"reference": config.reference.model_dump(mode="json")
                                        if config.factors.source == "reference" else None})
    factors_uri = workdir.uri(STAGE, "factors.safetensors")
    query_uri = workdir.uri(STAGE, "query.safetensors")
    query_hash = f"{fit_hash}-{config.stage_hash('reference')}" + (
        f"-val{config.quad.validation_fraction}-s{config.seed}" if validates_tau(config) else "")

    if workdir.is_done(STAGE, "factors", fit_hash):
        log("reference: K-FAC factors found in the work dir")
    else:
        if config.factors.source == "corpus":
            sample = random_sample_located(workdir, [s.relpath for s in shards], config.factors.documents,
                                           config.seed, min_groups=config.ray.shard_readers)
            texts = read_located(config.corpus, {s.relpath: s for s in shards}, sample["shard"], sample["row"])
        else:
            texts = reference_texts(config, log)[: config.factors.documents]
        log(f"reference: fitting K-FAC factors on {len(texts)} {config.factors.source} documents "
            f"with {len(workers)} workers")
        fit_factors_parallel(workers, texts, config.influence, factors_uri=factors_uri,
                             storage_options=workdir.storage_options)
        workdir.mark_done(STAGE, "factors", fit_hash, {"documents": len(texts), "source": config.factors.source})

    if workdir.is_done(STAGE, "query", query_hash):
        log("reference: query found in the work dir")
    else:
        ref_texts, held_out = query_and_validation_texts(config, log)
        if held_out:
            log(f"reference: {len(held_out)} documents held out to validate quad's tau")
        ray.get(workers[0].load_state.remote(factors_uri))
        info = ray.get(workers[0].compute_query.remote(ref_texts, query_uri))
        workdir.mark_done(STAGE, "query", query_hash, info)
        log(f"reference: query from {len(ref_texts)} reference documents ({info['n_tokens']:,} tokens)")
    ray.get([w.load_state.remote(factors_uri, query_uri) for w in workers])
    return workers


def influence_score_fn(workers: list, corpus_config, shards: list):
    """``score_fn`` for the bandit loop: the requested documents' texts (brought by the plan, or read
    by their ``(shard, row)``, :class:`workers.bandit.ScoreRequest`), scored in parallel."""
    by_path = {s.relpath: s for s in shards}
    spent = {"documents": 0, "read_seconds": 0.0, "influence_seconds": 0.0}

    def score(requests: list) -> list[list[float]]:
        flat = [doc_id for _, ids in requests for doc_id in ids]
        if not flat:
            return [[] for _ in requests]
        shards = [s for r in requests for s in r.shards]
        rows = [row for r in requests for row in r.rows]
        if len(shards) != len(flat) or len(rows) != len(flat):
            raise ValueError("influence_score_fn: every request needs the shards and rows of its documents")
        t0 = time.perf_counter()
        if all(getattr(r, "texts", None) is not None for r in requests):  # the plan brought them
            texts = [t for r in requests for t in r.texts]
        else:
            texts = read_located(corpus_config, by_path, shards, rows)
        t1 = time.perf_counter()
        scores = score_parallel(workers, flat, texts, batch_docs=max(1, min(64, -(-len(flat) // len(workers)))))
        spent["documents"] += len(flat)
        spent["read_seconds"] += t1 - t0
        spent["influence_seconds"] += time.perf_counter() - t1
        out, i = [], 0
        for _, ids in requests:
            out.append(scores[i:i + len(ids)].tolist())
            i += len(ids)
        return out

    score.spent = spent  # what the rounds spent reading texts and scoring them (logged by the job)
    return score
