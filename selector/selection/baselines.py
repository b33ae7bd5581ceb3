"""Baselines Quad is measured against: quality only and diversity only. Pure, seeded.

* :func:`topk_influence` — score every document, keep the best under the budget (quality
  without diversity: near-duplicates of a good document are all kept).
* :func:`exploration_only` — visit clusters round-robin (in a seeded order) and take a
  random whole block from each visit, scoring nothing (diversity without quality).

Both return positions into the caller's input arrays, so the caller can ``table.take`` them.
The budget edge follows the rule of the ``random`` method and of Quad: documents are taken in
selection order until the next one would pass the budget, and selection stops there.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from selector.quad.bandit import arm_priority
from selector.data.index import hash_keys
from selector.clusters.queues import ClusterQueueStore
from selector.quad.loop import ClusterQueues, seeded_rng


def _prefix_within(tokens: np.ndarray, budget: int) -> int:
    """How many leading documents fit in ``budget`` tokens."""
    return int(np.searchsorted(np.cumsum(tokens), budget, side="right"))


def topk_influence(doc_ids: Sequence[str], n_tokens: Sequence[int], scores: Sequence[float],
                   budget_tokens: int, seed: int = 0) -> np.ndarray:
    """Positions of the highest-scoring documents whose cumulative tokens fit ``budget_tokens``,
    best first. Equal scores are ordered by the seeded hash key of the document id."""
    scores = np.asarray(scores, dtype=np.float64)
    tokens = np.asarray(n_tokens, dtype=np.int64)
    ids = [str(d) for d in doc_ids]
    if not (len(ids) == scores.shape[0] == tokens.shape[0]):
        raise ValueError(f"doc_ids, n_tokens and scores differ in length: {len(ids)}, {tokens.shape[0]}, "
                         f"{scores.shape[0]}")
    if not np.isfinite(scores).all():
        bad = [ids[i] for i in np.nonzero(~np.isfinite(scores))[0][:5]]
        raise ValueError(f"non-finite scores for documents {bad}")
    if not ids:
        return np.zeros(0, np.int64)
    order = np.lexsort((hash_keys(ids, seed), -scores))  # score desc, then hash order
    return order[:_prefix_within(tokens[order], int(budget_tokens))].astype(np.int64)


def exploration_only(doc_ids: Sequence[str], clusters: Sequence[int], n_tokens: Sequence[int],
                     budget_tokens: int, block_size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Round-robin over clusters, one random unvisited block per visit, no scoring.

    Clusters are visited in the order of their seeded priority; a cluster's blocks are the
    ``block_size`` chunks of its hash-ordered queue (as in Quad), taken in a seeded random
    order. Visits continue over the clusters with blocks left until the budget is reached
    (a block that does not fit whole is trimmed to the prefix that fits, then selection
    stops) or every block is taken. Returns ``(positions, round)``: positions into the
    inputs in selection order, and the pass over the clusters (1, 2, ...) each came from.
    """
    queues = ClusterQueues(doc_ids, clusters, n_tokens, seed)
    chosen: list[np.ndarray] = []
    rounds: list[np.ndarray] = []
    for cluster, start, stop, visit in exploration_blocks(queues, budget_tokens, block_size, seed):
        sl = queues.slice(cluster, start, stop)
        chosen.append(queues.order[sl])
        rounds.append(np.full(stop - start, visit, np.int64))
    return _concat(chosen), _concat(rounds)


def exploration_blocks(store: ClusterQueueStore, budget_tokens: int, block_size: int = 64,
                       seed: int = 0) -> Iterator[tuple[int, int, int, int]]:
    """The blocks :func:`exploration_only` takes, on any queue store (in memory, or the work dir's
    :class:`selector.clusters.queues.DiskClusterQueues`: one block read at a time, O(clusters) state):
    ``(cluster, start, stop, visit)`` queue ranges in selection order (the last one trimmed to fit)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    budget = int(budget_tokens)
    cluster_ids = [int(c) for c in store.cluster_ids.tolist()]
    visit_order = sorted(cluster_ids, key=lambda c: (arm_priority(seed, c), c))
    n_blocks = {c: -(-store.size(c) // block_size) for c in cluster_ids}
    block_order = {c: seeded_rng(seed, 2, c).permutation(n_blocks[c]) for c in cluster_ids}
    used = 0
    for visit in range(max(n_blocks.values(), default=0)):
        for c in visit_order:
            if visit >= n_blocks[c]:
                continue  # this cluster is exhausted
            start = int(block_order[c][visit]) * block_size
            stop = min(start + block_size, store.size(c))
            tokens = store.read(c, start, stop).n_tokens
            take = _prefix_within(tokens, budget - used)
            if take:
                yield c, start, start + take, visit + 1
            used += int(tokens[:take].sum())
            if take < stop - start or used >= budget:
                return


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
