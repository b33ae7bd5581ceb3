"""Ray shell over ``selector.gtp.pursuit``: the two-level (distributed) GTP pursuit.

Features: :class:`TrajectoryFeatureActor` holds the T checkpoint models and writes one corpus
shard's trajectory features to the work dir per call (skipping shards already done under the
same config hash), reading the shard's documents from its shard reader itself, and computes the
reference target. :func:`locate_selection` finds the selected documents' (shard, row) in the
feature shards, one task per shard.

Level 1 runs one Ray task per partition (a partition is typically one corpus shard's feature
file): the task loads its partition, pursues the target y over its own columns and returns
only its candidates (ids, feature rows, token counts) — so the driver never holds the full
feature matrix. Level 2 is one more task that receives the candidates of all partitions
(Ray passes the object refs straight from the level-1 tasks to it) and pursues again with k,
or under the token budget. The math, and why partitions nominate ceil(oversample * k), are in
``selector.gtp.pursuit``; ``selector.gtp.pursuit.two_level_pursuit`` is the same algorithm in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray

from selector.gtp.features import STAGE as FEATURE_STAGE
from workers.shard_stage import ShardStage

from selector.errors import StageError
from selector.gtp.pursuit import (GTPPartition, budget_local_k, global_pursuit, local_candidates, local_k,
                          pursue, pursue_under_budget, validate_inputs)


@dataclass
class DistributedResult:
    """Selected documents (ordered by decreasing weight) and what each level did."""

    ids: np.ndarray                  # document ids of the selection
    weights: np.ndarray              # float64 > 0, original feature scale
    n_tokens: np.ndarray | None      # tokens per selected document (when partitions carry them)
    rel_residual: float              # ||Phi w - y|| / ||y|| of the selection
    residual_history: list[float]    # of the global pursuit
    stop_reason: str
    n_candidates: int
    local: list[dict]                # per partition: n, k_local, n_candidates, rel_residual, seconds
    global_seconds: float
    tokens_selected: int | None = None


def _load(part: Any) -> GTPPartition:
    if isinstance(part, GTPPartition):
        return part
    load = getattr(part, "load", None)  # e.g. selector.gtp.features.FeatureShardRef
    if callable(load):
        loaded = load()
        if isinstance(loaded, GTPPartition):
            return loaded
    raise StageError(f"a GTP partition must be a GTPPartition (or a ref whose .load() returns one), "
                     f"got {type(part).__name__}")


@ray.remote
def _local_task(part: Any, y: np.ndarray, k: int | None, budget_tokens: int | None, oversample: float,
                pursuit_kw: dict) -> dict:
    t0 = time.perf_counter()
    p = _load(part)
    if budget_tokens is not None:
        if p.n_tokens is None:
            raise StageError("distributed GTP under a token budget needs n_tokens in every partition")
        kl = budget_local_k(budget_tokens, p.n_tokens, oversample)
    else:
        kl = local_k(k, len(p.ids), oversample)
    loc, rel = local_candidates(p.features, y, kl, n_tokens=p.n_tokens, budget_tokens=budget_tokens, **pursuit_kw)
    return {"ids": p.ids[loc], "features": np.ascontiguousarray(p.features[loc]),
            "n_tokens": None if p.n_tokens is None else p.n_tokens[loc],
            "stats": {"n": int(len(p.ids)), "k_local": int(kl), "n_candidates": int(loc.size),
                      "rel_residual": float(rel), "seconds": time.perf_counter() - t0}}


@ray.remote
def _global_task(y: np.ndarray, k: int | None, budget_tokens: int | None, pursuit_kw: dict, max_rounds: int,
                 *locals_: dict) -> dict:
    t0 = time.perf_counter()
    feats = [l["features"] for l in locals_ if l["ids"].size]
    if not feats:
        raise StageError("GTP global pursuit: no partition nominated any candidate "
                         "(all documents are zero-gradient or longer than the budget)")
    features = np.concatenate(feats)
    ids = np.concatenate([l["ids"] for l in locals_ if l["ids"].size])
    has_tokens = all(l["n_tokens"] is not None for l in locals_)
    tokens = np.concatenate([l["n_tokens"] for l in locals_ if l["ids"].size]) if has_tokens else None
    if len(np.unique(ids)) != len(ids):
        raise StageError("GTP partitions overlap: a document id was nominated by two partitions")
    extra = {"max_rounds": max_rounds} if budget_tokens is not None else {}
    g = global_pursuit(features, y, k, n_tokens=tokens, budget_tokens=budget_tokens, **extra, **pursuit_kw)
    pr = g.pursuit if budget_tokens is not None else g
    return {"ids": ids[g.support], "weights": g.weights,
            "n_tokens": None if tokens is None else tokens[g.support],
            "rel_residual": float(g.rel_residual), "history": list(pr.residual_history),
            "stop_reason": pr.stop_reason, "n_candidates": int(len(ids)),
            "tokens_selected": getattr(g, "tokens_selected", None), "seconds": time.perf_counter() - t0}


def distributed_pursuit(partitions: Sequence[Any], y: np.ndarray, k: int | None = None, *,
                        budget_tokens: int | None = None, oversample: float = 2.0, max_rounds: int = 3,
                        num_cpus: float = 1.0, max_iter: int = 30, tol: float = 1e-6, normalize: bool = True,
                        refit: bool = True) -> DistributedResult:
    """Two-level GTP across Ray: one local pursuit per partition, then one global pursuit.

    partitions: GTPPartition objects, ``ray.ObjectRef`` s to them (``ray.put(part)``), or refs
    with a ``.load()`` returning one (e.g. ``selector.gtp.features.FeatureShardRef``: the task
    reads the shard from the work dir itself). Partitions must hold disjoint documents and share
    the feature dimension of y. Exactly one of ``k`` and ``budget_tokens`` (the latter needs
    ``n_tokens`` in every partition). Call inside an initialised Ray session.
    """
    if (k is None) == (budget_tokens is None):
        raise StageError("give exactly one of k and budget_tokens")
    if not partitions:
        raise StageError("distributed GTP got no partitions")
    if k is not None and (isinstance(k, bool) or int(k) < 1):
        raise StageError(f"GTP k must be >= 1, got {k}")
    if budget_tokens is not None and int(budget_tokens) < 1:
        raise StageError(f"budget_tokens must be >= 1, got {budget_tokens}")
    y = np.asarray(y, dtype=np.float64)
    validate_inputs(np.ones((1, y.shape[0]), dtype=np.float32), y)  # y's own checks (zero, NaN) up front
    kw = {"max_iter": max_iter, "tol": tol, "normalize": normalize, "refit": refit}
    y_ref = ray.put(y)
    local = [_local_task.options(num_cpus=num_cpus).remote(p, y_ref, k, budget_tokens, oversample, kw)
             for p in partitions]
    out = ray.get(_global_task.options(num_cpus=num_cpus).remote(y_ref, k, budget_tokens, kw, max_rounds, *local))
    # Only the small per-partition stats come back to the driver, not the candidate features.
    stats = ray.get([_stats.remote(l) for l in local])
    return DistributedResult(ids=out["ids"], weights=out["weights"], n_tokens=out["n_tokens"],
                             rel_residual=out["rel_residual"], residual_history=out["history"],
                             stop_reason=out["stop_reason"], n_candidates=out["n_candidates"], local=stats,
                             global_seconds=out["seconds"], tokens_selected=out["tokens_selected"])


@ray.remote(num_cpus=0)
def _stats(local: dict) -> dict:
    return local["stats"]


@ray.remote
def _single_task(y: np.ndarray, k: int | None, budget_tokens: int | None, pursuit_kw: dict, max_rounds: int,
                 *parts: Any) -> dict:
    loaded = [_load(p) for p in parts]
    features = np.concatenate([p.features for p in loaded])
    if budget_tokens is not None:
        tokens = np.concatenate([p.n_tokens for p in loaded])
        r = pursue_under_budget(features, y, tokens, budget_tokens, max_rounds=max_rounds, **pursuit_kw)
    else:
        r = pursue(features, y, k, **pursuit_kw)
    ids = np.concatenate([p.ids for p in loaded])
    return {"ids": ids[r.support], "weights": r.weights, "rel_residual": float(r.rel_residual),
            "n_docs": int(features.shape[0])}


def single_machine_pursuit(partitions: Sequence[Any], y: np.ndarray, k: int | None = None, *,
                           budget_tokens: int | None = None, max_rounds: int = 3, num_cpus: float = 1.0,
                           max_iter: int = 30, tol: float = 1e-6, normalize: bool = True, refit: bool = True) -> dict:
    """The same selection by one pursuit over all partitions at once, in one Ray task — for inputs
    small enough for one machine, to report the distributed residual gap
    (``distributed_pursuit(...).rel_residual - single_machine_pursuit(...)["rel_residual"]``).
    Returns {ids, weights, rel_residual, n_docs}."""
    if (k is None) == (budget_tokens is None):
        raise StageError("give exactly one of k and budget_tokens")
    kw = {"max_iter": max_iter, "tol": tol, "normalize": normalize, "refit": refit}
    return ray.get(_single_task.options(num_cpus=num_cpus).remote(np.asarray(y, dtype=np.float64), k, budget_tokens,
                                                                    kw, max_rounds, *partitions))


@ray.remote(num_cpus=0.25)
def _locate_task(ref: Any, wanted: set) -> dict:
    from selector.data.workdir import WorkDir

    table = WorkDir(ref.root, ref.run_id, ref.storage_options).read_table(FEATURE_STAGE, ref.key,
                                                                         columns=["doc_id", "row", "n_tokens"])
    ids = table["doc_id"].to_pylist()
    keep = [i for i, d in enumerate(ids) if d in wanted]
    return {"doc_id": [ids[i] for i in keep], "row": table["row"].take(keep).to_pylist() if keep else [],
            "n_tokens": table["n_tokens"].take(keep).to_pylist() if keep else []}


@ray.remote(num_cpus=0.25)
def _feature_sum(ref: Any) -> tuple[np.ndarray, int]:
    part = _load(ref)
    return part.features.astype(np.float64).sum(axis=0), int(part.features.shape[0])


def corpus_mean_on_ray(refs: Sequence[Any]) -> np.ndarray:
    """``target: corpus_mean`` (:func:`selector.gtp.features.corpus_mean_target`) with one task per
    feature shard: each sums its rows, the driver adds O(shards) vectors of the feature dimension."""
    total, count = None, 0
    for s, n in ray.get([_feature_sum.remote(r) for r in refs]):
        total = s if total is None else total + s
        count += n
    if count == 0:
        raise StageError("GTP target 'corpus_mean': the corpus has no documents with features")
    return total / count


def locate_selection(refs: Sequence[Any], shard_of_key: dict[str, str], ids: Sequence[str]) -> dict[str, list]:
    """``doc_id, shard, row, n_tokens`` of the selected ``ids``, in the order given: one task per feature
    shard (``selector.gtp.features.FeatureShardRef``) reads its ``doc_id, row`` columns and keeps the
    selected ones, so the driver holds O(selection), never the corpus index."""
    wanted = ray.put(set(map(str, ids)))
    found: dict[str, tuple] = {}
    for ref, part in zip(refs, ray.get([_locate_task.remote(r, wanted) for r in refs])):
        for d, row, n in zip(part["doc_id"], part["row"], part["n_tokens"]):
            found[d] = (shard_of_key[ref.key], int(row), int(n))
    missing = [d for d in ids if str(d) not in found]
    if missing:
        raise StageError(f"GTP selected documents that no feature shard holds: {missing[:5]}")
    return {"doc_id": [str(d) for d in ids], "shard": [found[str(d)][0] for d in ids],
            "row": [found[str(d)][1] for d in ids], "n_tokens": [found[str(d)][2] for d in ids]}


class FeaturizeShards(ShardStage):
    """GTP's per-shard feature stage on Ray Data: the checkpoints loaded once per actor; each shard's
    indexed documents (the index in the work dir, the texts read from the shard here) featurized
    into the work dir (:func:`selector.gtp.features.compute_shard_features`), written whole, then
    marked done."""

    def __init__(self, config: dict, work: tuple, corpus_config: dict, device: str = "cpu"):
        from selector.data.corpus import Corpus, CorpusConfig
        from selector.gtp.pursuit import GTPConfig
        from selector.gtp.features import TrajectoryFeaturizer
        from selector.data.workdir import WorkDir

        self.workdir = WorkDir(*work)
        self.featurizer = TrajectoryFeaturizer(GTPConfig.model_validate(config), device=device,
                                               storage_options=self.workdir.storage_options)
        self.corpus = Corpus(CorpusConfig(**corpus_config))

    def process(self, shard, config_hash: str) -> dict:
        from selector.gtp.features import compute_shard_features
        from selector.data.index import indexed_documents
        from selector.data.workdir import shard_key

        key = shard_key(shard.relpath)
        index, texts = indexed_documents(self.corpus, shard, self.workdir)
        computed = compute_shard_features(self.workdir, key, self.featurizer, index["doc_id"].to_pylist(),
                                          index["row"].to_pylist(), texts, index["n_tokens"].to_pylist(), config_hash)
        return {"key": key, "computed": computed, "dim": int(self.featurizer.dim)}


@ray.remote
class TrajectoryFeatureActor:
    """Loads the GTP checkpoints once; ``shard(...)`` featurizes given documents of one shard into the
    work dir, ``reference_target`` the reference set (the job's ``gtp.target: reference``).

    Give it fractional ``num_cpus`` (``.options(num_cpus=0.5)``) next to Ray Data readers, or
    ``num_gpus=1`` with ``device='cuda'``.
    """

    def __init__(self, config: dict, workdir_root: str, run_id: str, storage_options: dict | None = None,
                 device: str = "cpu"):
        from selector.gtp.pursuit import GTPConfig
        from selector.gtp.features import TrajectoryFeaturizer, features_config_hash
        from selector.data.workdir import WorkDir

        cfg = GTPConfig.model_validate(config)
        self.featurizer = TrajectoryFeaturizer(cfg, device=device, storage_options=storage_options)
        self.workdir = WorkDir(workdir_root, run_id, storage_options)
        self.config_hash = features_config_hash(cfg)

    def shard(self, key: str, doc_ids: list[str], rows: list[int], texts: list[str], n_tokens: list[int]) -> dict:
        """Featurize one shard (resumable); returns {key, computed, dim}."""
        from selector.gtp.features import compute_shard_features

        computed = compute_shard_features(self.workdir, key, self.featurizer, doc_ids, rows, texts, n_tokens,
                                          self.config_hash)
        return {"key": key, "computed": computed, "dim": int(self.featurizer.dim)}

    def reference_target(self, texts: list[str]) -> np.ndarray:
        return self.featurizer.reference_target(texts)
