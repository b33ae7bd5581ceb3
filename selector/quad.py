"""Quad's selection loop as a pure, resumable state machine (no Ray, no model).

Inputs: every document's ``doc_id``, ``cluster`` and ``n_tokens`` (index + cluster stages),
the cluster neighbour pairs ``(cluster_a, cluster_b, centroid distance)``, a token budget
and a seed. The caller scores documents (influence on the reference set); this module
decides *which* documents to score and which to keep.

Queues and blocks. Each cluster's documents are put in a seeded order (hash order:
BLAKE2b(seed, doc_id), the same key as the ``random`` method) and consumed front to back in
blocks of ``block_size`` documents (the last block of a cluster may be shorter). A block is
consumed whether or not it is selected, so a cluster is *exhausted* when its queue is empty,
and then leaves the bandit.

Warm-up (round 0). When ``tau`` or ``reward_scale`` is ``auto``, the first round scores a
uniform sample of ``warmup_size`` documents (the documents with the smallest hash keys
corpus-wide), grouped by cluster. From those scores:

* ``tau = auto_tau(scores, tau_top_fraction)``: the boundary of the top 20% (the paper's
  4th of 20 influence buckets) = the ``1 - top_fraction`` quantile (linear interpolation);
* the reward scale ``s`` = :func:`selector.bandit.robust_scale` (IQR / 1.349, guarded).

Warm-up scores only calibrate; they update no arm and select nothing.

A bandit round (1, 2, ...). :meth:`QuadSelector.plan_round` takes the top ``arms_per_round``
active arms by UCB (:mod:`selector.bandit`) and, for each, the cluster's next block and a
sample of it: ``n = max(min_sample, ceil(sample_ratio * len(block)))`` documents (at most
the block), drawn without replacement by a generator seeded with ``(seed, cluster, block
start)`` — so a plan is a pure function of the state and re-planning after a crash gives the
same plan. :meth:`QuadSelector.apply_round` takes the sample scores; for each block, in plan
order (best UCB first):

* ``raw reward = mean(sample scores) - tau``; the bandit is updated with ``raw / s``
  (and, with ``propagate``, the neighbours; see :mod:`selector.bandit`);
* the block is *selected* when ``raw reward > 0``;
* budget edge: a selected block is accepted whole if its tokens fit in what is left of the
  budget; otherwise it is trimmed to its longest prefix (queue order) that fits and the
  selection stops — the same "until the next document would pass the budget" rule as the
  ``random`` method. A selected block's documents all get its sample mean as their score.

The loop stops when the budget is used up (or a block was trimmed), when every arm is
exhausted, or after ``max_rounds`` bandit rounds.

Under-filled budget. The paper's tau (top-20% boundary of single-document influence) is
strict for a *mean* of a few samples, so on a small corpus every arm can be exhausted before
the budget is reached (``stop_reason: exhausted``, ``selected_tokens < budget_tokens``). With
``fill_rejected: true`` (not in the paper; off by default) the rest of the budget is then
filled with the rejected blocks, best mean sample influence first (ties: earlier round,
smaller cluster), under the same budget-edge rule; they are logged as one ``kind: fill``
record and the stop reason becomes ``exhausted+filled`` (or ``budget``).

Resuming. :meth:`QuadSelector.to_dict` holds only the dynamic state (cursors, bandit
statistics, accepted block ranges, tau and scale, the round log) plus fingerprints of the
documents and neighbours; the document table is static input that
:meth:`QuadSelector.from_dict` takes again (so a checkpoint stays small: O(clusters +
rounds), not O(documents)). Restoring and continuing gives exactly the uninterrupted run.
For long runs the round log can be split off (``to_dict(history_since=n)`` and
``from_dict(..., history_prefix=...)``) so per-round checkpoints do not rewrite it all.

Carrying arm statistics forward (the nightly refresh, :mod:`ray_jobs.refresh`).
:meth:`QuadSelector.carry_forward` seeds a fresh selector's bandit with an earlier run's final
arm statistics (:meth:`selector.bandit.UCBBandit.carry_forward`): only valid when the cluster
ids mean the same clusters (same centroids). tau and the reward scale are not carried: the
warm-up recalibrates them on the current corpus.

History. One JSON record per round, for the report and for ``manifest.json["quad"]``
(:meth:`QuadSelector.summary`):

* ``kind: warmup`` (round 0): ``n_scored, tau, reward_scale, scores``;
* ``kind: bandit``: per pulled arm, in plan order, ``arms, ucb, block_docs, sample_docs,
  mean_influence, reward`` (normalised), ``selected`` (reward > 0), ``accepted_docs,
  accepted_tokens`` (after the budget edge), ``propagated_to`` (neighbours reached); and
  ``exhausted`` (arms that left), ``sample_scores_accepted / _rejected`` (the raw sample
  influences of selected / rejected blocks), ``budget_used, budget, active_arms, stop_reason``;
* ``kind: fill`` (only with ``fill_rejected``): ``blocks, accepted_docs, accepted_tokens,
  budget_used, budget, stop_reason``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field, model_validator

from selector.bandit import RewardNormaliser, UCBBandit, robust_scale
from selector.config_base import StrictModel
from selector.index import hash_keys

STATE_VERSION = 1


class QuadConfig(StrictModel):
    """Quad's selection loop (``quad:`` section of a job config)."""

    arms_per_round: int = Field(4, ge=1, description="m: clusters pulled per round.")
    block_size: int = Field(64, ge=1, description="b: documents per block of a cluster's queue.")
    sample_ratio: float = Field(0.05, gt=0, le=1, description="gamma: fraction of a block whose influence is computed.")
    min_sample: int = Field(1, ge=1, description="At least this many documents are scored per block.")
    tau: float | Literal["auto"] = Field("auto", description="Reward threshold on mean sample influence; "
                                                            "auto: top-fraction boundary of the warm-up scores.")
    tau_top_fraction: float = Field(0.2, gt=0, lt=1, description="auto tau: the top-fraction boundary (paper: 0.2).")
    reward_scale: float | Literal["auto"] = Field("auto", description="Divides rewards so alpha is scale-free; "
                                                                     "auto: IQR/1.349 of the warm-up scores.")
    warmup_size: int = Field(512, ge=0, description="Documents scored in round 0 to set tau and the reward scale.")
    alpha: float = Field(1.0, ge=0, description="UCB exploration weight (rewards are normalised).")
    neighbour_radius: float = Field(0.2, gt=0, description="Reward spreads to clusters with centroid distance "
                                                           "d < radius, weight 1 - d/radius.")
    propagate: bool = Field(True, description="Spread rewards to neighbouring clusters.")
    max_rounds: int | None = Field(None, ge=1, description="Stop after this many bandit rounds (default: no limit).")
    fill_rejected: bool = Field(False, description="When every arm is exhausted under budget, fill the budget with "
                                                   "the rejected blocks, best sample mean first (not in the paper).")

    @model_validator(mode="after")
    def _warmup_needed(self) -> "QuadConfig":
        if self.warmup_size == 0 and (self.tau == "auto" or self.reward_scale == "auto"):
            raise ValueError("tau: auto and reward_scale: auto need a warm-up sample (warmup_size >= 1)")
        if isinstance(self.reward_scale, float) and not self.reward_scale > 0:
            raise ValueError("reward_scale must be > 0")
        return self

    @property
    def needs_warmup(self) -> bool:
        return self.tau == "auto" or self.reward_scale == "auto"


class StateMismatch(ValueError):
    """A checkpoint does not belong to these documents / neighbours / settings."""


def auto_tau(warmup_scores: Sequence[float], top_fraction: float = 0.2) -> float:
    """The boundary of the top ``top_fraction`` of ``warmup_scores``: their ``1 - top_fraction``
    quantile (linear interpolation). The paper's "4th of 20 buckets" is ``top_fraction=0.2``."""
    x = np.asarray(warmup_scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("auto tau needs at least one warm-up score")
    if not np.isfinite(x).all():
        raise ValueError("warm-up scores contain NaN or inf")
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    return float(np.quantile(x, 1.0 - top_fraction))


def sample_size(n_block: int, ratio: float, minimum: int) -> int:
    """Documents scored for a block of ``n_block``: ``max(minimum, ceil(ratio * n))``, at most n."""
    # The epsilon keeps float noise (0.05 * 60 = 3.0000000000000004) from adding a document.
    return min(n_block, max(minimum, math.ceil(ratio * n_block - 1e-9)))


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A fresh generator that is a pure function of ``(seed, *keys)`` (no shared RNG state)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in (seed, *keys)]))


class ClusterQueues:
    """Documents grouped by cluster, each cluster in seeded hash order (shared with the baselines)."""

    def __init__(self, doc_ids: Sequence[str], clusters: Sequence[int], n_tokens: Sequence[int], seed: int):
        ids = [str(d) for d in doc_ids]
        clusters = np.asarray(clusters, dtype=np.int64)
        tokens = np.asarray(n_tokens, dtype=np.int64)
        if not (len(ids) == clusters.shape[0] == tokens.shape[0]):
            raise ValueError(f"doc_ids, clusters and n_tokens differ in length: "
                             f"{len(ids)}, {clusters.shape[0]}, {tokens.shape[0]}")
        if len(set(ids)) != len(ids):
            raise ValueError("doc_ids are not unique")
        if (tokens < 0).any():
            raise ValueError("n_tokens must be >= 0")
        keys = hash_keys(ids, seed) if ids else np.zeros(0)
        order = np.lexsort((keys, clusters))  # cluster-major, hash order inside a cluster
        self.order = order  # queue position -> position in the caller's input
        self.doc_ids = np.array(ids, dtype=object)[order] if ids else np.array([], dtype=object)
        self.clusters = clusters[order]
        self.n_tokens = tokens[order]
        self.keys = keys[order]
        self.cluster_ids, starts = np.unique(self.clusters, return_index=True)
        self.starts = starts.astype(np.int64)
        self.ends = np.append(self.starts[1:], len(ids)).astype(np.int64)
        self._pos = {int(c): i for i, c in enumerate(self.cluster_ids)}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.doc_ids)

    def index(self, cluster: int) -> int:
        return self._pos[int(cluster)]

    def size(self, cluster: int) -> int:
        i = self._pos[int(cluster)]
        return int(self.ends[i] - self.starts[i])

    def slice(self, cluster: int, start: int, stop: int) -> slice:
        """Global positions of a cluster's queue positions ``[start, stop)``."""
        base = int(self.starts[self._pos[int(cluster)]])
        return slice(base + start, base + stop)

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # the queues never change: hash once
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update("\n".join(self.doc_ids.tolist()).encode())
        h.update(self.clusters.tobytes())
        h.update(self.n_tokens.tobytes())
        return h.hexdigest()[:32]


def neighbours_fingerprint(bandit: UCBBandit) -> str:
    return hashlib.sha256(repr(bandit.neighbour_triples()).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class RoundItem:
    """One pulled arm: its block (queue positions ``[start, stop)``) and the sampled documents."""

    cluster: int
    block: list[str]
    sample: list[str]
    start: int = 0
    stop: int = 0
    ucb: float | None = None


@dataclass(frozen=True)
class RoundPlan:
    round: int
    kind: Literal["warmup", "bandit"]
    items: list[RoundItem] = field(default_factory=list)

    def requests(self) -> list[tuple[int, list[str]]]:
        """What must be scored: ``[(cluster, sample doc_ids)]`` in item order."""
        return [(it.cluster, list(it.sample)) for it in self.items]

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "kind": self.kind,
                "items": [{"cluster": it.cluster, "block": it.block, "sample": it.sample, "start": it.start,
                           "stop": it.stop, "ucb": it.ucb} for it in self.items]}


class QuadSelector:
    """The Quad loop: ``plan_round`` -> score the samples -> ``apply_round``, until ``done``."""

    def __init__(self, config: QuadConfig, doc_ids: Sequence[str], clusters: Sequence[int],
                 n_tokens: Sequence[int], budget_tokens: int, neighbours: Iterable[Sequence] = (), seed: int = 0):
        self.config = config
        self.seed = int(seed)
        self.budget = int(budget_tokens)
        if self.budget < 0:
            raise ValueError("budget_tokens must be >= 0")
        self.queues = ClusterQueues(doc_ids, clusters, n_tokens, self.seed)
        self.bandit = UCBBandit(self.queues.cluster_ids.tolist(), alpha=config.alpha, seed=self.seed,
                                neighbours=neighbours, radius=config.neighbour_radius, propagate=config.propagate)
        self._neighbours_fp = neighbours_fingerprint(self.bandit)  # static, like the queues
        self.cursor = np.zeros(len(self.queues.cluster_ids), np.int64)
        self.next_round = 0 if config.needs_warmup else 1
        self.tau: float | None = None if config.tau == "auto" else float(config.tau)
        self.scale: float | None = None if config.reward_scale == "auto" else float(config.reward_scale)
        self.used_tokens = 0
        self.accepted: list[list] = []  # [cluster, start, stop, round, score]
        self.rejected: list[list] = []  # same shape; kept only for fill_rejected
        self.history: list[dict] = []
        self.stop_reason: str | None = None
        self._check_stop()

    # -- planning --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def phase(self) -> str:
        return "warmup" if self.next_round == 0 else "bandit"

    def plan_round(self) -> RoundPlan | None:
        """The next round to score, or None when the selection is finished. Pure: calling it
        again before :meth:`apply_round` returns the same plan."""
        if self.done:
            return None
        if self.phase == "warmup":
            return RoundPlan(0, "warmup", self._warmup_items())
        items = []
        for cluster, ucb in self.bandit.select(self.config.arms_per_round):
            i = self.queues.index(cluster)
            start = int(self.cursor[i])
            stop = min(start + self.config.block_size, self.queues.size(cluster))
            block = self.queues.doc_ids[self.queues.slice(cluster, start, stop)].tolist()
            n = sample_size(len(block), self.config.sample_ratio, self.config.min_sample)
            picks = np.sort(seeded_rng(self.seed, 1, cluster, start).choice(len(block), size=n, replace=False))
            items.append(RoundItem(cluster, block, [block[p] for p in picks], start, stop, ucb))
        return RoundPlan(self.next_round, "bandit", items)

    def _warmup_items(self) -> list[RoundItem]:
        n = min(self.config.warmup_size, len(self.queues))
        if n == 0:
            return []
        # Smallest hash keys corpus-wide = a uniform sample; stable sort keeps it deterministic.
        picks = np.sort(np.argsort(self.queues.keys, kind="stable")[:n])  # cluster-major, then hash order
        items = []
        for cluster in np.unique(self.queues.clusters[picks]).tolist():
            ids = self.queues.doc_ids[picks[self.queues.clusters[picks] == cluster]].tolist()
            items.append(RoundItem(int(cluster), [], ids))
        return items

    # -- applying scores -------------------------------------------------------------------
    def apply_round(self, scores: Sequence[Sequence[float]] | Mapping[int, Sequence[float]]) -> dict:
        """Apply the scores of the planned round's samples; returns the round's history record.

        ``scores``: one list per item of :meth:`plan_round` (same order, one score per sampled
        document, in sample order), or a mapping ``cluster -> scores``.
        """
        plan = self.plan_round()
        if plan is None:
            raise ValueError(f"the selection is finished ({self.stop_reason}); nothing to apply")
        per_item = self._align(plan, scores)
        if plan.kind == "warmup":
            record = self._apply_warmup(plan, per_item)
        else:
            record = self._apply_bandit(plan, per_item)
        self.history.append(record)
        self.next_round += 1
        self._check_stop()
        record["stop_reason"] = self.stop_reason
        return record

    @staticmethod
    def _align(plan: RoundPlan, scores) -> list[np.ndarray]:
        if isinstance(scores, Mapping):
            scores = {int(k): v for k, v in scores.items()}
            missing = [it.cluster for it in plan.items if it.cluster not in scores]
            if missing:
                raise ValueError(f"round {plan.round}: no scores for clusters {missing[:5]}")
            scores = [scores[it.cluster] for it in plan.items]
        if len(scores) != len(plan.items):
            raise ValueError(f"round {plan.round}: {len(scores)} score lists for {len(plan.items)} planned arms")
        out = []
        for it, s in zip(plan.items, scores):
            arr = np.asarray(s, dtype=np.float64).ravel()
            if arr.shape[0] != len(it.sample):
                raise ValueError(f"round {plan.round}, cluster {it.cluster}: {arr.shape[0]} scores for "
                                 f"{len(it.sample)} sampled documents")
            if not np.isfinite(arr).all():
                bad = [it.sample[j] for j in np.nonzero(~np.isfinite(arr))[0][:5]]
                raise ValueError(f"round {plan.round}, cluster {it.cluster}: non-finite influence for {bad}")
            out.append(arr)
        return out

    def _apply_warmup(self, plan: RoundPlan, per_item: list[np.ndarray]) -> dict:
        allscores = np.concatenate(per_item) if per_item else np.zeros(0)
        if allscores.size == 0:
            raise ValueError("the warm-up round has no scores")
        if self.config.tau == "auto":
            self.tau = auto_tau(allscores, self.config.tau_top_fraction)
        if self.config.reward_scale == "auto":
            self.scale = robust_scale(allscores)
        return {"round": plan.round, "kind": "warmup", "n_scored": int(allscores.size), "tau": self.tau,
                "reward_scale": self.scale, "scores": allscores.tolist()}

    def _apply_bandit(self, plan: RoundPlan, per_item: list[np.ndarray]) -> dict:
        normalise = RewardNormaliser(self.tau, self.scale)
        rec: dict[str, Any] = {"round": plan.round, "kind": "bandit", "arms": [], "ucb": [], "block_docs": [],
                               "sample_docs": [], "mean_influence": [], "reward": [], "selected": [],
                               "accepted_docs": [], "accepted_tokens": [], "propagated_to": [], "exhausted": [],
                               "sample_scores_accepted": [], "sample_scores_rejected": []}
        for it, s in zip(plan.items, per_item):
            mean = float(s.mean())
            reward = normalise(mean)
            spread = self.bandit.update(it.cluster, reward)
            i = self.queues.index(it.cluster)
            self.cursor[i] = it.stop
            selected = mean - self.tau > 0
            take, tokens = 0, 0
            if selected and not self._budget_closed():
                take, tokens = self._accept(it.cluster, it.start, it.stop, plan.round, mean)
            elif not selected and self.config.fill_rejected:
                self.rejected.append([it.cluster, it.start, it.stop, plan.round, mean])
            if self.cursor[i] >= self.queues.size(it.cluster):
                self.bandit.remove(it.cluster)
                rec["exhausted"].append(it.cluster)
            rec["arms"].append(it.cluster)
            rec["ucb"].append(it.ucb)
            rec["block_docs"].append(len(it.block))
            rec["sample_docs"].append(len(it.sample))
            rec["mean_influence"].append(mean)
            rec["reward"].append(reward)
            rec["selected"].append(bool(selected))
            rec["accepted_docs"].append(take)
            rec["accepted_tokens"].append(tokens)
            rec["propagated_to"].append(len(spread))
            rec["sample_scores_accepted" if selected else "sample_scores_rejected"].extend(s.tolist())
        rec["budget_used"] = int(self.used_tokens)
        rec["budget"] = self.budget
        rec["active_arms"] = self.bandit.n_active()
        return rec

    def _accept(self, cluster: int, start: int, stop: int, rnd: int, score: float) -> tuple[int, int]:
        """Take the block's longest prefix that fits the budget; returns (documents, tokens)."""
        block_tokens = self.queues.n_tokens[self.queues.slice(cluster, start, stop)]
        take = int(np.searchsorted(np.cumsum(block_tokens), self.budget - self.used_tokens, side="right"))
        tokens = int(block_tokens[:take].sum())
        if take < len(block_tokens):
            self.stop_reason = "budget"  # trimmed at the edge: the next document would pass it
        if take:
            self.accepted.append([int(cluster), int(start), int(start) + take, int(rnd), float(score)])
            self.used_tokens += tokens
        return take, tokens

    def _fill(self) -> None:
        """fill_rejected: the rejected blocks, best sample mean first, until the budget is full."""
        rec = {"round": self.next_round, "kind": "fill", "blocks": 0, "accepted_docs": 0, "accepted_tokens": 0}
        for cluster, start, stop, rnd, score in sorted(self.rejected, key=lambda b: (-b[4], b[3], b[0])):
            if self._budget_closed():
                break
            take, tokens = self._accept(cluster, start, stop, rnd, score)
            rec["blocks"] += 1
            rec["accepted_docs"] += take
            rec["accepted_tokens"] += tokens
        self.rejected = []
        rec["budget_used"], rec["budget"] = int(self.used_tokens), self.budget
        self.history.append(rec)
        self.stop_reason = "budget" if self._budget_closed() else "exhausted+filled"
        rec["stop_reason"] = self.stop_reason

    def _budget_closed(self) -> bool:
        return self.stop_reason == "budget" or self.used_tokens >= self.budget

    def _check_stop(self) -> None:
        if self.stop_reason is not None:
            return
        if self._budget_closed():
            self.stop_reason = "budget"
        elif self.bandit.n_active() == 0:
            if self.config.fill_rejected and self.rejected:
                self._fill()
            else:
                self.stop_reason = "exhausted"
        elif self.config.max_rounds is not None and self.next_round > self.config.max_rounds:
            self.stop_reason = "max_rounds"

    # -- results ---------------------------------------------------------------------------
    def selection(self) -> dict[str, list]:
        """Selected documents as columns ``doc_id, cluster, n_tokens, score, round`` (acceptance
        order; ``score`` = the mean sample influence of the document's block)."""
        out: dict[str, list] = {"doc_id": [], "cluster": [], "n_tokens": [], "score": [], "round": []}
        for cluster, start, stop, rnd, score in self.accepted:
            sl = self.queues.slice(cluster, start, stop)
            n = stop - start
            out["doc_id"].extend(self.queues.doc_ids[sl].tolist())
            out["n_tokens"].extend(self.queues.n_tokens[sl].tolist())
            out["cluster"].extend([int(cluster)] * n)
            out["score"].extend([float(score)] * n)
            out["round"].extend([int(rnd)] * n)
        return out

    def summary(self) -> dict[str, Any]:
        """What goes into ``manifest.json["quad"]``: settings, calibration, outcome, round log."""
        bandit_rounds = self.next_round - 1 if self.next_round >= 1 else 0
        return {
            "config": self.config.model_dump(mode="json"),
            "seed": self.seed,
            "budget_tokens": self.budget,
            "selected_tokens": int(self.used_tokens),
            "selected_documents": int(sum(stop - start for _, start, stop, _, _ in self.accepted)),
            "selected_blocks": len(self.accepted),
            "tau": self.tau,
            "reward_scale": self.scale,
            "rounds": bandit_rounds,
            "stop_reason": self.stop_reason,
            "arms": len(self.queues.cluster_ids),
            "exhausted_arms": len(self.queues.cluster_ids) - self.bandit.n_active(),
            "scored_documents": int(sum(sum(h.get("sample_docs", [])) + h.get("n_scored", 0) for h in self.history)),
            "history": list(self.history),
        }

    def carry_forward(self, prior_bandit: dict[str, Any], decay: float = 1.0) -> int:
        """Seed the bandit from an earlier run's ``to_dict()["bandit"]`` before any round is
        applied; returns the number of arms carried."""
        if self.history or self.used_tokens:
            raise ValueError("carry_forward must come before the first round")
        return self.bandit.carry_forward(prior_bandit, decay)

    # -- state -----------------------------------------------------------------------------
    def to_dict(self, history_since: int = 0) -> dict[str, Any]:
        """The dynamic state as JSON-able data. The round log from ``history_since`` on is
        included (earlier records must then be passed back as ``history_prefix``)."""
        if not 0 <= history_since <= len(self.history):
            raise ValueError(f"history_since={history_since} outside the round log (0..{len(self.history)})")
        return {
            "version": STATE_VERSION,
            "config": self.config.model_dump(mode="json"),
            "seed": self.seed,
            "budget": self.budget,
            "documents": self.queues.fingerprint(),
            "neighbours": self._neighbours_fp,
            "next_round": int(self.next_round),
            "tau": self.tau,
            "scale": self.scale,
            "used_tokens": int(self.used_tokens),
            "cursor": self.cursor.tolist(),
            "accepted": [list(a) for a in self.accepted],
            "rejected": [list(r) for r in self.rejected],
            "stop_reason": self.stop_reason,
            "bandit": self.bandit.to_dict(include_neighbours=False),
            "history_offset": history_since,
            "history": self.history[history_since:],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], doc_ids: Sequence[str], clusters: Sequence[int],
                  n_tokens: Sequence[int], neighbours: Iterable[Sequence] = (),
                  history_prefix: Sequence[dict] = ()) -> "QuadSelector":
        """Restore a checkpoint for the same documents and neighbours (else :class:`StateMismatch`)."""
        if state.get("version") != STATE_VERSION:
            raise StateMismatch(f"unsupported quad state version {state.get('version')!r}")
        config = QuadConfig.model_validate(state["config"])
        q = cls(config, doc_ids, clusters, n_tokens, state["budget"], neighbours, state["seed"])
        if q.queues.fingerprint() != state["documents"]:
            raise StateMismatch("the checkpoint was taken over different documents (ids, clusters or tokens)")
        if q._neighbours_fp != state["neighbours"]:
            raise StateMismatch("the checkpoint was taken with different cluster neighbours")
        if len(history_prefix) != state["history_offset"]:
            raise StateMismatch(f"history prefix has {len(history_prefix)} records, the checkpoint expects "
                                f"{state['history_offset']}")
        q.bandit = UCBBandit.from_dict(state["bandit"], neighbours=q.bandit.neighbour_triples())
        q.next_round = int(state["next_round"])
        q.tau, q.scale = state["tau"], state["scale"]
        q.used_tokens = int(state["used_tokens"])
        q.cursor = np.array(state["cursor"], np.int64)
        q.accepted = [list(a) for a in state["accepted"]]
        q.rejected = [list(r) for r in state["rejected"]]
        q.stop_reason = state["stop_reason"]
        q.history = list(history_prefix) + list(state["history"])
        return q


def load_cluster_inputs(workdir, keys: Iterable[str]) -> tuple[dict[str, np.ndarray], list[tuple[int, int, float]]]:
    """The cluster stage's outputs as Quad's inputs: ``({doc_id, cluster, n_tokens}, neighbours)``.

    Reads ``cluster/<key>.parquet`` for each shard key and ``cluster_summary/neighbours.parquet``
    (see :mod:`selector.clustering`) from the work dir ``workdir`` (a :class:`selector.workdir.WorkDir`).
    """
    from selector.clustering import ASSIGN_STAGE, SUMMARY_STAGE

    ids: list[str] = []
    clusters, tokens = [], []
    for key in sorted(keys):
        t = workdir.read_table(ASSIGN_STAGE, key, columns=["doc_id", "cluster", "n_tokens"])
        ids.extend(t.column("doc_id").to_pylist())
        clusters.append(t.column("cluster").to_numpy().astype(np.int64))
        tokens.append(t.column("n_tokens").to_numpy().astype(np.int64))
    docs = {"doc_id": ids,
            "cluster": np.concatenate(clusters) if clusters else np.zeros(0, np.int64),
            "n_tokens": np.concatenate(tokens) if tokens else np.zeros(0, np.int64)}
    nb = workdir.read_table(SUMMARY_STAGE, "neighbours")
    neighbours = list(zip(nb.column("cluster").to_pylist(), nb.column("neighbour").to_pylist(),
                          nb.column("distance").to_pylist()))
    return docs, neighbours
