"""Ray actors for Quad's influence: parallel K-FAC fitting and batch scoring.

Each :class:`InfluenceWorker` holds the proxy model (one GPU when the cluster has GPUs)
and, once set, the K-FAC factors and the query. It is a thin shell over
:mod:`selector.gradients.kfac` / :mod:`selector.gradients.influence`.

Driver-side helpers:

* :func:`fit_factors_parallel` - every worker accumulates partial factor sums over its share
  of the fitting texts; the driver adds them (sums + token counts are exact to merge),
  normalises and eigendecomposes; with EK-FAC a second parallel pass is reduced the same way.
* :func:`make_workers` - a pool with ``num_gpus=1`` when GPUs exist, fractional CPUs otherwise.

``topk-influence`` scores whole shards as a Ray Data per-shard stage (:class:`ScoreShardInfluence`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import ray

from selector.gradients.influence import InfluenceConfig
from workers.runtime import job_env
from workers.shard_stage import ShardStage


RUN_STAGE = "influence_runs"  # topk-influence: each shard's scores as a ranked run


@ray.remote
class InfluenceWorker:
    """Holds model, factors and query; scores documents by id."""

    def __init__(self, model_path: str, config: dict | None = None, device: str | None = None,
                 storage_options: dict | None = None):
        self.config = InfluenceConfig(**(config or {}))
        self.storage_options = storage_options
        self.tokenizer, self.model, self.blocks, self.device = load_proxy(model_path, self.config, device,
                                                                          storage_options)
        self.factors = None
        self.query = None

    def tracked_layers(self) -> list[dict]:
        from selector.gradients.tracked_layers import report

        return report(self.blocks)

    def _kw(self) -> dict:
        c = self.config
        return dict(chunk_tokens=c.chunk_tokens, batch_size=c.batch_size, fisher=c.kfac.fisher, seed=c.kfac.seed,
                    max_chunks_per_doc=c.max_chunks_per_doc)

    def fit_factors(self, texts: Sequence[str]) -> dict:
        """Partial A/G sums (numpy) over ``texts``; the driver merges them."""
        from selector.gradients.kfac import accumulate_factors

        return accumulate_factors(self.model, self.tokenizer, texts, self.blocks, **self._kw()).to_numpy()

    def fit_ekfac(self, texts: Sequence[str], factors_uri: str) -> dict:
        """Partial EK-FAC eigenvalue sums over ``texts`` in the eigenbasis of the saved factors."""
        from selector.gradients.kfac import KFACFactors, accumulate_ekfac

        factors = KFACFactors.load(factors_uri, self.storage_options)
        return accumulate_ekfac(self.model, self.tokenizer, texts, self.blocks, factors, **self._kw()).to_numpy()

    def load_state(self, factors_uri: str, query_uri: str | None = None) -> int:
        """Load factors (and the query, if already computed) from the work dir."""
        from selector.gradients.influence import InfluenceQuery
        from selector.gradients.kfac import KFACFactors

        self.factors = KFACFactors.load(factors_uri, self.storage_options)
        if query_uri is not None:
            self.query = InfluenceQuery.load(query_uri, self.storage_options)
        return len(self.factors.blocks)

    def compute_query(self, reference_texts: Sequence[str], query_uri: str | None = None) -> dict:
        """Build the preconditioned query from the reference set (and save it if a URI is given)."""
        from selector.gradients.influence import compute_query

        if self.factors is None:
            raise RuntimeError("InfluenceWorker.compute_query: call load_state(factors_uri) first")
        self.query = compute_query(self.model, self.tokenizer, reference_texts, self.factors, self.blocks, self.config)
        if query_uri is not None:
            self.query.save(query_uri, self.storage_options)
        return {"n_chunks": self.query.n_chunks, "n_tokens": self.query.n_tokens}

    def score(self, doc_ids: Sequence[str], texts: Sequence[str]) -> dict:
        """Influence of each document on the reference set (higher = lowers reference loss)."""
        from selector.gradients.influence import score_documents

        if self.query is None:
            raise RuntimeError("InfluenceWorker.score: no query loaded (load_state(factors, query) or compute_query)")
        if len(doc_ids) != len(texts):
            raise ValueError(f"score: {len(doc_ids)} doc ids but {len(texts)} texts")
        s = score_documents(self.model, self.tokenizer, texts, self.query, self.blocks, self.config)
        return {"doc_id": list(doc_ids), "score": s.score.tolist(), "n_chunks": s.n_chunks.tolist(),
                "cosine": None if s.cosine is None else s.cosine.tolist()}




def load_proxy(model_path: str, config: InfluenceConfig, device: str | None, storage_options: dict | None):
    """``(tokenizer, model, blocks, device)``: the proxy model on ``device`` (default: cuda if present)
    with its tracked layers."""
    import torch

    from selector.models.loading import load_causal_lm, load_tokenizer
    from selector.gradients.tracked_layers import discover_blocks

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_path, storage_options)
    model = load_causal_lm(model_path, device=device, storage_options=storage_options)
    return tokenizer, model, discover_blocks(model, config.layers), device


class ScoreShardInfluence(ShardStage):
    """``topk-influence``'s per-shard stage on Ray Data: the proxy model and the preconditioned query
    per actor; each shard's indexed documents (the index in the work dir, the texts read from the
    shard here) scored and written to the work dir as a run ranked highest first, ties by the seeded
    hash key (:mod:`selector.selection.ranked`), then the done marker; only counts come back. The rank
    score is the cosine variant with ``normalise``."""

    def __init__(self, model_path: str, config: dict, storage_options: dict | None, query_uri: str,
                 corpus_config: dict, work: tuple, seed: int):
        from selector.data.corpus import Corpus, CorpusConfig
        from selector.gradients.influence import InfluenceQuery
        from selector.data.workdir import WorkDir

        self.config = InfluenceConfig(**config)
        self.tokenizer, self.model, self.blocks, self.device = load_proxy(model_path, self.config, None,
                                                                          storage_options)
        self.query = InfluenceQuery.load(query_uri, storage_options)
        self.corpus = Corpus(CorpusConfig(**corpus_config))
        self.workdir = WorkDir(*work)
        self.seed = seed

    def process(self, shard, config_hash: str) -> dict:
        import pyarrow as pa

        from selector.data.index import hash_keys, indexed_documents
        from selector.gradients.influence import score_documents
        from selector.selection.ranked import ROW_GROUP, sort_run
        from selector.data.workdir import shard_key

        key = shard_key(shard.relpath)
        index, texts = indexed_documents(self.corpus, shard, self.workdir)
        doc_ids, rows = index["doc_id"].to_pylist(), index["row"].to_pylist()
        s = score_documents(self.model, self.tokenizer, texts, self.query, self.blocks, self.config) \
            if doc_ids else None
        rank = [] if s is None else (s.cosine if s.cosine is not None else s.score)
        table = pa.table({"doc_id": pa.array(doc_ids, pa.string()),
                          "shard": pa.array([shard.relpath] * len(doc_ids), pa.string()),
                          "row": pa.array(rows, pa.int64()), "n_tokens": index["n_tokens"].cast(pa.int64()),
                          "score": pa.array(np.asarray(rank, np.float64)),
                          "hash_key": pa.array(hash_keys(doc_ids, self.seed) if doc_ids else np.zeros(0))})
        run, unscored = sort_run(table, "score", True, tie="hash_key")
        tokens = run["n_tokens"].to_numpy()
        stats = {"shard": shard.relpath, "n_docs": table.num_rows, "unscored": unscored,
                 "min_tokens": int(tokens.min()) if tokens.size else 0}
        self.workdir.write_table(RUN_STAGE, key, run, config_hash, stats, row_group_size=ROW_GROUP)
        return stats


def make_workers(n: int, model_path: str, config: InfluenceConfig | dict | None = None, *,
                 num_cpus: float = 0.5, storage_options: dict | None = None) -> list:
    """``n`` influence workers: one GPU each when the cluster has GPUs, else ``num_cpus``."""
    cfg = config.model_dump() if isinstance(config, InfluenceConfig) else (config or {})
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": num_cpus}
    return [InfluenceWorker.options(**job_env(**opts)).remote(model_path, cfg, None, storage_options) for _ in range(n)]


def _split(texts: Sequence[str], n: int) -> list[list[str]]:
    return [list(texts[i::n]) for i in range(n)]


def fit_factors_parallel(workers: list, texts: Sequence[str], config: InfluenceConfig | None = None,
                         factors_uri: str | None = None, storage_options: dict | None = None):
    """Fit K-FAC factors across ``workers`` and reduce on the driver; optionally save to ``factors_uri``.

    EK-FAC needs the reduced eigenbasis on every worker, so it requires ``factors_uri``.
    """
    from selector.gradients.kfac import EKFACSums, FactorSums, KFACFactors

    config = config or InfluenceConfig()
    shares = [s for s in _split(texts, len(workers))]
    parts = ray.get([w.fit_factors.remote(s) for w, s in zip(workers, shares)])
    total = FactorSums.from_numpy(parts[0])
    for p in parts[1:]:
        total = total.merge(FactorSums.from_numpy(p))
    factors = KFACFactors.from_sums(total, damping=config.kfac.damping, damping_mode=config.kfac.damping_mode)
    if config.kfac.ekfac:
        if factors_uri is None:
            raise ValueError("fit_factors_parallel: EK-FAC needs factors_uri so workers can read the eigenbasis")
        factors.save(factors_uri, storage_options)
        eparts = ray.get([w.fit_ekfac.remote(s, factors_uri) for w, s in zip(workers, shares)])
        esum = EKFACSums.from_numpy(eparts[0])
        for p in eparts[1:]:
            esum = esum.merge(EKFACSums.from_numpy(p))
        factors.set_ekfac(esum)
    if factors_uri is not None:
        factors.save(factors_uri, storage_options)
    return factors


def score_parallel(workers: list, doc_ids: Sequence[str], texts: Sequence[str], batch_docs: int = 64) -> np.ndarray:
    """Scores for all documents, batches spread round-robin over the workers (order kept): the cosine
    variant when the workers' config has ``normalise: true``, else the raw influence."""
    refs = []
    for j, s in enumerate(range(0, len(texts), batch_docs)):
        w = workers[j % len(workers)]
        refs.append(w.score.remote(list(doc_ids[s:s + batch_docs]), list(texts[s:s + batch_docs])))
    out = []
    for r in ray.get(refs):
        # influence.normalise: the workers also compute the cosine variant; it is then the score
        # every selector ranks by (quad, topk-influence), the raw one stays in the worker result
        out.extend(r["cosine"] if r.get("cosine") is not None else r["score"])
    return np.asarray(out, dtype=np.float64)
