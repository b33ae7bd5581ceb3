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

from typing import Sequence

import numpy as np

from selector.bandit import arm_priority
from selector.index import hash_keys
from selector.quad import ClusterQueues, seeded_rng


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
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    queues = ClusterQueues(doc_ids, clusters, n_tokens, seed)
    budget = int(budget_tokens)
    cluster_ids = queues.cluster_ids.tolist()
    visit_order = sorted(cluster_ids, key=lambda c: (arm_priority(seed, c), c))
    n_blocks = {c: -(-queues.size(c) // block_size) for c in cluster_ids}
    block_order = {c: seeded_rng(seed, 2, c).permutation(n_blocks[c]) for c in cluster_ids}
    chosen: list[np.ndarray] = []
    rounds: list[np.ndarray] = []
    used = 0
    for visit in range(max(n_blocks.values(), default=0)):
        for c in visit_order:
            if visit >= n_blocks[c]:
                continue  # this cluster is exhausted
            b = int(block_order[c][visit])
            sl = queues.slice(c, b * block_size, min((b + 1) * block_size, queues.size(c)))
            take = _prefix_within(queues.n_tokens[sl], budget - used)
            positions = queues.order[sl][:take]
            chosen.append(positions)
            rounds.append(np.full(take, visit + 1, np.int64))
            used += int(queues.n_tokens[sl][:take].sum())
            if take < sl.stop - sl.start or used >= budget:
                return _concat(chosen), _concat(rounds)
    return _concat(chosen), _concat(rounds)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
