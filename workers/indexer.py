"""Index stage on Ray Data: every shard validated, tokenised and counted, its index table written to
the work dir; then the distributed duplicate-id check.

Thin over ``selector.data.index``: :class:`IndexShards` indexes one shard (``index_shard``: quarantine
of bad records, the done marker after the table); :func:`index_corpus` runs it on the shards not
already indexed under the same config hash as Ray Data tasks (no model to keep resident: each
worker process loads the tokenizer once, :func:`workers.shard_stage.resident_stage`), reads the
done markers' stats of the others, and checks that document ids are unique
(:func:`workers.index_reads.duplicate_ids`). The driver receives one stats dict per shard.
"""

from __future__ import annotations

from selector.data.corpus import Corpus, CorpusConfig, ShardInfo, TokenCounter
from selector.errors import CorpusError
from selector.data.index import INDEX_STAGE, index_shard, shard_index_hash
from selector.data.workdir import WorkDir, shard_key
from workers.index_reads import duplicate_ids
from workers.shard_stage import ShardStage, run_shard_stage


class IndexShards(ShardStage):
    """``(shard, config_hash) -> stats``: the shard's index table and rejects in the work dir."""

    def __init__(self, corpus_config: dict, tokenizer: str, work: tuple):
        self.corpus = Corpus(CorpusConfig.model_validate(corpus_config))
        self.counter = TokenCounter(tokenizer)
        self.workdir = WorkDir(*work)

    def process(self, shard: ShardInfo, config_hash: str) -> dict:
        _, stats = index_shard(self.corpus, shard, self.counter, self.workdir, config_hash)
        return stats


def index_corpus(corpus_config: CorpusConfig, tokenizer: str, workdir: WorkDir, shards: list[ShardInfo],
                 config_hash: str, concurrency: int = 2, num_cpus: float = 0.25, progress: bool = True) -> dict:
    """Index every shard not already indexed (at most ``concurrency`` tasks at once, ``num_cpus`` each),
    then check the ids; returns the per-shard stats and their totals."""
    todo, per_shard = [], []
    for shard in shards:
        key, full_hash = shard_key(shard.relpath), shard_index_hash(config_hash, shard)
        if workdir.is_done(INDEX_STAGE, key, full_hash):
            per_shard.append(dict(workdir.read_marker(INDEX_STAGE, key)["stats"], skipped=True))
        else:
            todo.append(shard)
    kwargs = {"corpus_config": corpus_config.model_dump(mode="json"), "tokenizer": tokenizer,
              "work": (workdir.root, workdir.run_id, workdir.storage_options)}
    per_shard += run_shard_stage("index", IndexShards, kwargs, todo, {s.relpath: config_hash for s in todo},
                                 concurrency=concurrency, num_cpus=num_cpus, progress=progress,
                                 count_key="documents", actors=False)
    per_shard.sort(key=lambda s: s["shard"])
    documents = sum(s["documents"] for s in per_shard)
    duplicates = duplicate_ids(workdir, [s.relpath for s in shards], documents, min_groups=concurrency)
    if duplicates:
        raise CorpusError("document ids must be unique across the corpus (fix the id column, or drop "
                          "corpus.id_column to use <shard>:<row> ids): " + "; ".join(duplicates))
    return {
        "shards": per_shard,
        "documents": documents,
        "tokens": sum(s["tokens"] for s in per_shard),
        "rejected": sum(s["rejected"] for s in per_shard),
        "shards_skipped": sum(1 for s in per_shard if s["skipped"]),
    }


__all__ = ["IndexShards", "index_corpus"]
