"""Best-first greedy fill of a token budget, from per-shard sorted runs (no process holds the corpus).

``perplexity`` and ``rho`` rank every document by one score and take them best-first until the
token budget is used; a document that would overshoot is passed over and smaller ones after it
may still fit. With the order ``o`` (ascending key ``k_i = s_i`` for lowest-first, ``-s_i`` for
highest-first; ties by doc id) the selection is

    S = { o_j : n(o_j) + sum_{i < j, o_i in S} n(o_i) <= B }

which is :func:`selector.rho.excess_loss.select_by_score` over the whole corpus (``rule="fill"``). ``topk-influence``
uses the same walk with highest influence first, ties by the seeded hash key, and ``rule="prefix"``:
the selection stops at the first document that would overshoot
(:func:`selector.selection.baselines.topk_influence`). Here the corpus is never
gathered: each shard's scores are written as a *run* sorted by ``(k, doc_id)``
(:func:`sort_run`), and :func:`select_from_runs` walks the k-way merge of the runs, reading each
run a row group at a time. Because ``S`` depends only on the global order, the result is the
same document set, in the same order, as the single-table rule; memory is one row group per
shard, time O(walked rows x log shards). The walk ends when the budget left is smaller than the
shortest scored document (``min_tokens``: no later document can fit), or when the runs end.

Documents without a score (NaN: too short to score) are never taken; :func:`sort_run` drops them
and counts them, so they are reported, not silently lost.
"""

from __future__ import annotations

import heapq
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selector.errors import StageError

KEY = "order_key"
ROW_GROUP = 1024  # rows per row group of a run: what the merge holds per shard


def sort_run(table: pa.Table, column: str, descending: bool, tie: str = "doc_id") -> tuple[pa.Table, int]:
    """``table`` (``doc_id, n_tokens, <column>``, ...) as a run: rows with a finite ``column``,
    an ``order_key`` column (``column`` or its negation), sorted by ``(order_key, tie)`` (``tie``: a
    column that orders equal scores; doc ids unless the method says otherwise, e.g. a seeded hash key).
    Returns ``(run, dropped)``: ``dropped`` rows had no finite score."""
    for name in ("doc_id", "n_tokens", column, tie):
        if name not in table.column_names:
            raise StageError(f"sort_run: the scores table has no {name!r} column")
    score = table[column].to_numpy(zero_copy_only=False).astype(np.float64)
    finite = np.isfinite(score)
    kept = table.filter(pa.array(finite)) if not finite.all() else table
    key = -score[finite] if descending else score[finite]
    kept = kept.append_column(KEY, pa.array(key + 0.0, pa.float64()))  # + 0.0: -0.0 -> 0.0, one tie class
    order = pc.sort_indices(kept, sort_keys=[(KEY, "ascending"), (tie, "ascending")])
    return kept.take(order), int((~finite).sum())


def _rows(batches: Iterable[pa.Table], names: list[str]) -> Iterator[tuple]:
    for batch in batches:
        yield from zip(*(batch[c].to_pylist() for c in names))


def select_from_runs(runs: Iterable[Iterable[pa.Table]], budget_tokens: int, min_tokens: int,
                     columns: tuple[str, ...] = ("shard", "row", "n_tokens"), tie: str = "doc_id",
                     rule: str = "fill") -> dict[str, list]:
    """The selection of the module docstring from sorted ``runs`` (each an iterable of tables,
    in run order, as :func:`sort_run` wrote them with the same ``tie``; read lazily). Returns
    columns ``order_key``, ``tie``, ``doc_id`` and ``columns`` (``n_tokens`` must be among them), best first.

    ``rule``: ``fill`` passes over a document that would overshoot and goes on (perplexity, rho);
    ``prefix`` stops at the first such document (topk-influence, like random and Quad)."""
    if budget_tokens < 0:
        raise StageError(f"budget_tokens must be >= 0, got {budget_tokens}")
    if "n_tokens" not in columns:
        raise StageError("select_from_runs: columns must include n_tokens")
    if rule not in ("fill", "prefix"):
        raise StageError(f"select_from_runs: rule must be 'fill' or 'prefix', not {rule!r}")
    names = [KEY, tie, *(c for c in ("doc_id", *columns) if c != tie)]
    at_tokens = names.index("n_tokens")
    out: dict[str, list] = {name: [] for name in names}
    used, floor = 0, max(1, int(min_tokens))
    if budget_tokens < floor:
        return out
    previous = None
    for row in heapq.merge(*(_rows(r, names) for r in runs)):
        if previous is not None and row[:2] < previous:
            raise StageError(f"select_from_runs: a run is not sorted by (order_key, {tie}) at {row[2]!r}")
        previous = row[:2]
        n = int(row[at_tokens])
        if used + n > budget_tokens:
            if rule == "prefix":
                break
            continue
        for name, value in zip(names, row):
            out[name].append(value)
        used += n
        if budget_tokens - used < floor:
            break
    return out


__all__ = ["KEY", "ROW_GROUP", "sort_run", "select_from_runs"]
