"""Quad's selection loop as a pure, resumable state machine (no Ray, no model).

Inputs: the cluster queues (:mod:`selector.clusters.queues`: every document's ``doc_id``, shard,
row and ``n_tokens``, per cluster in seeded hash order -- in memory from columns, or read a block at
a time from the per-cluster files the queue step wrote to the work dir, :meth:`QuadSelector.on_store`),
the cluster neighbour pairs ``(cluster_a, cluster_b, centroid distance)``, a token budget and a seed.
The caller scores documents (influence on the reference set); this module decides *which* documents
to score and which to keep. Its own state is O(clusters + rounds + kept ranges): per-arm statistics, a
cursor per queue, the kept queue ranges and the round log; it reads only the blocks it plans (and, once,
the front of every queue for the warm-up), so over the on-disk store nothing O(documents) is in memory.

Queues and blocks. Each cluster's documents are put in a seeded order (hash order:
BLAKE2b(seed, doc_id), the same key as the ``random`` method; ties keep the input order) and
consumed front to back in blocks of ``block_size`` documents (the last block of a cluster may be
shorter). A block is
consumed whether or not anything of it is kept, so a cluster is *exhausted* when its queue is
empty, and then leaves the bandit.

What is kept (``accept``). The paper scores a sample (ratio gamma) of a pulled block and keeps
the whole block when the sample's mean influence clears tau. That rule caps the quality of what
is kept at the purity of the clusters: an accepted block brings its off-domain documents along.
Three rules, one bandit:

* ``block`` (the paper's rule): keep the whole block when ``mean(sample) > tau_block``;
* ``documents``: the bandit picks which blocks to score; every document of the block is scored
  and each document whose own score clears ``tau_doc`` is kept;
* ``two_stage``: score a sample; when ``mean(sample) > tau_gate`` the rest of the block is scored
  in the next round (kind ``expand``) and filtered per document at ``tau_doc``.

In every rule a scored document that clears ``tau_doc`` is kept (warm-up documents, and the
sampled documents of a block that does not pass): a computed score is never thrown away.

Calibration: each threshold on the quantity it is compared with. The warm-up (round 0) scores
the ``warmup_size`` documents with the smallest hash keys corpus-wide: a uniform sample, and the
*front of every cluster's queue*, so those documents are consumed (the cursors move past them),
they update their clusters' arms and the ones that clear ``tau_doc`` are kept. From their scores,
for a pass rate ``p``:

* ``tau_doc``  = the score above which a share ``p`` of the warm-up *tokens* lies (a
  token-weighted ``1 - p`` quantile: the budget is in tokens);
* ``tau_block`` / ``tau_gate`` = the ``1 - p`` (gate: ``1 - min(1, gate_slack * p)``) quantile of
  the *mean of a block sample* (``n = sample_size(block_size)`` documents), estimated by a seeded
  bootstrap that draws each sample inside one cluster (cluster picked in proportion to its warm-up
  count), since a block's documents share a cluster.

``tau: auto`` aims ``p = min(1, tau_slack * budget / corpus tokens)``: the budget's share of the
corpus times a slack, so what passes fills the budget with room for the bandit to choose (slack 1:
every block must be pulled; slack 2: half of them). ``tau: quantile`` is the paper's fixed pass
rate ``p = tau_top_fraction`` (its 4th of 20 influence buckets: 0.2), now on the compared
quantity. ``tau: validate`` asks the caller to pick the bucket (:meth:`QuadSelector.tau_buckets`,
:meth:`QuadSelector.set_tau`; see :mod:`selector.quad.tau_validation`). A number fixes ``tau_doc`` and
``tau_block = tau_gate = tau``.

Rewards are bounded. Arm ``i``'s reward for a scored set ``S`` of its documents is

* ``pass_fraction`` (default): ``|{d in S : score_d > tau_doc}| / |S|`` in [0, 1] -- the arm's
  yield, what the budget needs, and scale-free: scaling every influence leaves it unchanged;
* ``clipped``: ``clip((mean(S) - tau_cmp) / s, -reward_clip, reward_clip)`` with ``s`` the robust
  scale (IQR / 1.349) of the compared quantity and ``tau_cmp`` its threshold, so one heavy-tailed
  document cannot lock UCB onto an arm.

A bandit round (1, 2, ...). :meth:`QuadSelector.plan_round` takes the top ``arms_per_round``
active arms by UCB (:mod:`selector.quad.bandit`: ``mean reward + alpha sqrt(2 ln N / (n_i + 1))``) and,
for each, the cluster's next block and what of it to score: all of it (``documents``) or a sample
of ``n = max(min_sample, ceil(sample_ratio * len(block)))`` documents drawn without replacement by
a generator seeded with ``(seed, cluster, block start)``, so a plan is a pure function of the state
and re-planning after a crash gives the same plan. :meth:`QuadSelector.apply_round` takes the
scores; per item, in plan order (best UCB first), the arm is updated (and, with ``propagate``, its
neighbours), then the accept rule runs.

Budget edge: kept documents are taken in queue order while their tokens fit what is left of the
budget; the first one that does not fit closes the selection -- the "until the next document would
pass the budget" rule of the ``random`` method. A block-rule document's score is its block's sample
mean; every other kept document's score is its own.

The loop stops when the budget is used up, when every arm is exhausted (then ``fill_rejected``,
off by default, fills the rest with the best rejected blocks or scored documents, logged as one
``kind: fill`` record), or after ``max_rounds`` bandit rounds.

Resuming. :meth:`QuadSelector.to_dict` holds only the dynamic state (cursors, bandit statistics,
kept ranges, pending expansions, thresholds, the round log) plus fingerprints of the documents (the
queue store's: per-cluster sizes, tokens and content hashes, :func:`selector.clusters.queues.store_fingerprint`)
and neighbours; the queues are static input that :meth:`QuadSelector.from_dict` takes again (columns
or ``store=``; a checkpoint taken over one store resumes over the other).
Restoring and continuing gives exactly the uninterrupted run. The round log can be split off
(``to_dict(history_since=n)`` / ``from_dict(..., history_prefix=...)``).

Carrying arm statistics forward (the nightly refresh, :mod:`ray_jobs.refresh`):
:meth:`QuadSelector.carry_forward` seeds a fresh selector's bandit with an earlier run's arm
statistics; thresholds are not carried (the warm-up recalibrates them).

History. One JSON record per round, for the report and ``manifest.json["quad"]``:

* ``kind: warmup`` (round 0): ``n_scored, tau, tau_doc, tau_block, tau_gate, pass_rate, reward_scale,
  scores`` and the per-arm fields below;
* ``kind: bandit`` / ``expand``: per item, in plan order, ``arms, ucb, block_docs, sample_docs,
  mean_influence, reward, selected`` (the block rule passed / the gate passed / any document kept),
  ``accepted_docs, accepted_tokens, propagated_to``; and ``exhausted``, ``sample_scores_accepted /
  _rejected`` (scores of kept / not kept scored documents), ``budget_used, budget, active_arms,
  stop_reason``;
* ``kind: fill``: ``blocks, accepted_docs, accepted_tokens, budget_used, budget, stop_reason``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Iterable, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field, model_validator

from selector.quad.bandit import UCBBandit, robust_scale
from selector.clusters.queues import ClusterQueues, ClusterQueueStore, QueueEntries
from selector.config_base import StrictModel

STATE_VERSION = 3  # 3: the documents fingerprint is the queue store's (per-cluster sizes, tokens, hashes)
BOOTSTRAP_DRAWS = 4000


class QuadConfig(StrictModel):
    """Quad's selection loop (``quad:`` section of a job config)."""

    accept: Literal["block", "documents", "two_stage"] = Field(
        "block", description="What is kept: whole blocks whose sample mean clears tau (the paper), every "
                                 "scored document that clears tau, or blocks whose sample passes, scored in full "
                                 "and filtered per document. See docs/quad.md for the measurements behind the default.")
    arms_per_round: int = Field(4, ge=1, description="m: clusters pulled per round.")
    block_size: int = Field(64, ge=1, description="b: documents per block of a cluster's queue.")
    sample_ratio: float = Field(0.05, gt=0, le=1, description="gamma: fraction of a block scored (block, two_stage).")
    min_sample: int = Field(1, ge=1, description="At least this many documents are scored per block.")
    tau: float | Literal["auto", "quantile", "validate"] = Field(
        "auto", description="Threshold. auto: pass rate min(1, tau_slack x budget share of the corpus); quantile: "
                            "pass rate tau_top_fraction (the paper's top 20%); validate: the influence bucket whose "
                            "documents give the lowest validation loss (selector.quad.tau_validation); or a number.")
    tau_slack: float = Field(2.0, ge=1, description="auto tau: pass rate = slack x budget share (room to choose).")
    tau_top_fraction: float = Field(0.2, gt=0, lt=1, description="quantile tau: the pass rate (paper: 0.2).")
    tau_buckets: int = Field(20, ge=2, description="validate tau: influence buckets of the warm-up (paper: 20).")
    validation_fraction: float = Field(0.25, gt=0, lt=1, description="validate tau: share of the reference set held "
                                                                     "out of the query to measure validation loss.")
    validation_steps: int = Field(30, ge=1, description="validate tau: proxy training steps per bucket.")
    gate_slack: float = Field(2.0, ge=1, description="two_stage: the sample gate passes gate_slack x the pass rate.")
    reward: Literal["pass_fraction", "clipped"] = Field(
        "pass_fraction", description="Arm reward: share of scored documents above tau_doc, or the clipped "
                                     "normalised mean.")
    reward_clip: float = Field(3.0, gt=0, description="clipped reward: bound in units of the reward scale.")
    reward_scale: float | Literal["auto"] = Field("auto", description="clipped reward: divides (mean - tau); "
                                                                     "auto: IQR/1.349 of the compared quantity.")
    warmup_size: int = Field(512, ge=0, description="Documents scored in round 0 to calibrate (and kept if they pass).")
    alpha: float = Field(0.5, ge=0, description="UCB exploration weight (rewards are bounded).")
    neighbour_radius: float = Field(0.2, gt=0, description="Reward spreads to clusters with centroid distance "
                                                           "d < radius, weight 1 - d/radius.")
    propagate: bool = Field(True, description="Spread rewards to neighbouring clusters.")
    max_rounds: int | None = Field(None, ge=1, description="Stop after this many bandit rounds (default: no limit).")
    fill_rejected: bool = Field(False, description="When every arm is exhausted under budget, fill the budget with "
                                                   "the best rejected blocks / scored documents (not in the paper).")

    @model_validator(mode="after")
    def _warmup_needed(self) -> "QuadConfig":
        if self.warmup_size == 0 and self.needs_warmup:
            raise ValueError("tau: auto/quantile/validate and reward_scale: auto (with reward: clipped) need a "
                             "warm-up sample (warmup_size >= 1)")
        if isinstance(self.reward_scale, float) and not self.reward_scale > 0:
            raise ValueError("reward_scale must be > 0")
        return self

    @property
    def needs_warmup(self) -> bool:
        return isinstance(self.tau, str) or (self.reward == "clipped" and self.reward_scale == "auto")


class StateMismatch(ValueError):
    """A checkpoint does not belong to these documents / neighbours / settings."""


def _finite(scores: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{what} needs at least one warm-up score")
    if not np.isfinite(x).all():
        raise ValueError("warm-up scores contain NaN or inf")
    return x


def auto_tau(warmup_scores: Sequence[float], top_fraction: float = 0.2) -> float:
    """The boundary of the top ``top_fraction`` of ``warmup_scores``: their ``1 - top_fraction``
    quantile (linear interpolation). The paper's "4th of 20 buckets" is ``top_fraction=0.2``."""
    x = _finite(warmup_scores, "auto tau")
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    return float(np.quantile(x, 1.0 - top_fraction))


def token_tau(scores: Sequence[float], n_tokens: Sequence[int], pass_rate: float) -> float:
    """The document threshold above which a share ``pass_rate`` of the tokens lies.

    Documents sorted by score, best first; tau is the midpoint between the last document taken and
    the next one once the taken tokens reach ``pass_rate`` of the total, so ``score > tau`` keeps
    exactly those documents. ``pass_rate >= 1`` gives a tau below every score.
    """
    x = _finite(scores, "token tau")
    w = np.maximum(np.asarray(n_tokens, dtype=np.float64).ravel(), 1.0)
    if w.shape != x.shape:
        raise ValueError(f"{x.size} scores but {w.size} token counts")
    if not pass_rate > 0:
        raise ValueError(f"pass_rate must be > 0, got {pass_rate}")
    order = np.argsort(-x, kind="stable")
    xs, cum = x[order], np.cumsum(w[order]) / w.sum()
    k = int(np.searchsorted(cum, min(pass_rate, 1.0) - 1e-12))  # index of the document that reaches the share
    if k >= x.size - 1:
        return float(xs[-1] - max(1e-12, abs(xs[-1]) * 1e-9))
    return float((xs[k] + xs[k + 1]) / 2.0) if xs[k] > xs[k + 1] else float(xs[k])


def bootstrap_sample_means(scores: Sequence[float], clusters: Sequence[int], n: int, seed: int,
                           draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """``draws`` means of ``n`` scores drawn (with replacement) inside one cluster each.

    A cluster is picked with probability proportional to its number of warm-up scores, as a block is
    drawn from one cluster; clusters with a single warm-up score draw from all scores instead (one
    document says nothing about a cluster's spread).
    """
    x = _finite(scores, "bootstrap")
    c = np.asarray(clusters, dtype=np.int64).ravel()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 7, int(n)]))
    ids, inverse, counts = np.unique(c, return_inverse=True, return_counts=True)
    picks = rng.choice(len(ids), size=draws, p=counts / counts.sum())
    members = [np.nonzero(inverse == i)[0] for i in range(len(ids))]
    out = np.empty(draws)
    for j, i in enumerate(picks):
        pool = members[i] if counts[i] > 1 else np.arange(x.size)
        out[j] = x[rng.choice(pool, size=max(int(n), 1), replace=True)].mean()
    return out


def sample_size(n_block: int, ratio: float, minimum: int) -> int:
    """Documents scored for a block of ``n_block``: ``max(minimum, ceil(ratio * n))``, at most n."""
    # The epsilon keeps float noise (0.05 * 60 = 3.0000000000000004) from adding a document.
    return min(n_block, max(minimum, math.ceil(ratio * n_block - 1e-9)))


def sample_picks(keys: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The block offsets of the ``n`` documents to score: those whose mixed key
    ``splitmix64(bits(key) xor seed)`` is smallest, in block order.

    A function of the documents, not of their positions: when a refresh inserts new documents into
    the queues (shifting every block), a block mostly samples the documents it sampled before, so
    their scores come from the previous run's cache (selector.quad.score_cache). The mixed key is
    independent of the queue order (which is the key itself), so the sample is uniform in the block.
    """
    bits = np.ascontiguousarray(keys, np.float64).view(np.uint64) ^ np.uint64(int(seed) % 2**64)
    z = bits + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.sort(np.argsort(z, kind="stable")[: int(n)])


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A fresh generator that is a pure function of ``(seed, *keys)`` (no shared RNG state)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in (seed, *keys)]))


@dataclass(frozen=True)
class Thresholds:
    """What the warm-up calibrated: per-document and sample-mean thresholds and the reward scale."""

    doc: float
    block: float
    gate: float
    pass_rate: float | None
    scale: float

    def to_dict(self) -> dict:
        return {"doc": self.doc, "block": self.block, "gate": self.gate, "pass_rate": self.pass_rate,
                "scale": self.scale}


def calibrate(config: QuadConfig, scores: np.ndarray, n_tokens: np.ndarray, clusters: np.ndarray,
              budget_share: float, seed: int) -> Thresholds:
    """The thresholds of the module docstring from the warm-up ``scores`` (their tokens and clusters)."""
    if config.tau == "auto":
        p = min(1.0, config.tau_slack * budget_share)
    elif config.tau in ("quantile", "validate"):  # validate: a provisional tau until set_tau
        p = config.tau_top_fraction
    else:
        p = None
    block_n = sample_size(config.block_size, config.sample_ratio, config.min_sample)
    means = bootstrap_sample_means(scores, clusters, block_n, seed) if scores.size else np.zeros(0)
    if p is None:
        doc = block = gate = float(config.tau)
    else:
        doc = token_tau(scores, n_tokens, p)
        floor = float(means.min()) - 1.0  # pass rate 1: below every mean (finite, so JSON stays strict)
        block = float(np.quantile(means, 1.0 - p)) if p < 1 else floor
        g = min(1.0, config.gate_slack * p)
        gate = float(np.quantile(means, 1.0 - g)) if g < 1 else floor
    if isinstance(config.reward_scale, float):
        scale = float(config.reward_scale)
    else:
        scale = robust_scale(scores if config.accept == "documents" else means) if scores.size else 1.0
    return Thresholds(doc, block, gate, p, scale)


def neighbours_fingerprint(bandit: UCBBandit) -> str:
    return bandit.neighbours_fingerprint()


@dataclass(frozen=True)
class RoundItem:
    """One pulled arm: its block (queue positions ``[start, stop)``) and the documents to score."""

    cluster: int
    block: list[str]
    sample: list[str]
    start: int = 0
    stop: int = 0
    ucb: float | None = None
    positions: tuple[int, ...] = ()  # queue positions of ``sample`` (absolute within the cluster)
    shards: tuple = ()               # shard of each ``sample`` document (None where the store has none)
    rows: tuple[int, ...] = ()       # row of each ``sample`` document in its shard (-1 where unknown)
    keys: tuple[float, ...] = ()     # queue key of each ``sample`` document (selector.quad.score_cache looks it up)


@dataclass(frozen=True)
class RoundPlan:
    round: int
    kind: Literal["warmup", "bandit", "expand"]
    items: list[RoundItem] = field(default_factory=list)

    def requests(self) -> list[tuple[int, list[str]]]:
        """What must be scored: ``[(cluster, sample doc_ids)]`` in item order."""
        return [(it.cluster, list(it.sample)) for it in self.items]

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "kind": self.kind,
                "items": [{"cluster": it.cluster, "block": it.block, "sample": it.sample, "start": it.start,
                           "stop": it.stop, "ucb": it.ucb, "shards": list(it.shards), "rows": list(it.rows),
                           "keys": list(it.keys)}
                          for it in self.items]}


class QuadSelector:
    """The Quad loop: ``plan_round`` -> score the samples -> ``apply_round``, until ``done``."""

    def __init__(self, config: QuadConfig, doc_ids: Sequence[str], clusters: Sequence[int],
                 n_tokens: Sequence[int], budget_tokens: int, neighbours: Iterable[Sequence] = (), seed: int = 0):
        self._setup(config, ClusterQueues(doc_ids, clusters, n_tokens, int(seed)), budget_tokens, neighbours, seed)

    @classmethod
    def on_store(cls, config: QuadConfig, store: ClusterQueueStore, budget_tokens: int,
                 neighbours: Iterable[Sequence] = (), seed: int = 0) -> "QuadSelector":
        """A selector over queues already built (e.g. :class:`selector.clusters.queues.DiskClusterQueues`)."""
        q = cls.__new__(cls)
        q._setup(config, store, budget_tokens, neighbours, seed)
        return q

    def _setup(self, config: QuadConfig, store: ClusterQueueStore, budget_tokens: int,
               neighbours: Iterable[Sequence], seed: int) -> None:
        self.config = config
        self.seed = int(seed)
        self.budget = int(budget_tokens)
        if self.budget < 0:
            raise ValueError("budget_tokens must be >= 0")
        if int(store.seed) != self.seed:
            raise ValueError(f"the queues are in the hash order of seed {store.seed}, the selector's seed is {self.seed}")
        self.queues = store
        total = self.queues.total_tokens
        self.budget_share = self.budget / total if total else 1.0
        self.bandit = UCBBandit(self.queues.cluster_ids.tolist(), alpha=config.alpha, seed=self.seed,
                                neighbours=neighbours, radius=config.neighbour_radius, propagate=config.propagate)
        self._neighbours_fp = neighbours_fingerprint(self.bandit)  # static, like the queues
        self.cursor = np.zeros(len(self.queues.cluster_ids), np.int64)
        self.next_round = 0 if config.needs_warmup else 1
        self.thresholds: Thresholds | None = None
        if not config.needs_warmup:
            scale = float(config.reward_scale) if isinstance(config.reward_scale, float) else 1.0
            self.thresholds = Thresholds(float(config.tau), float(config.tau), float(config.tau), None, scale)
        self.tau_validation: dict | None = None  # tau: validate: the chosen bucket and its table
        self.used_tokens = 0
        self.accepted: list[list] = []  # [cluster, start, stop, round, score]: queue ranges kept
        self.rejected: list[list] = []  # same shape, for fill_rejected: blocks (block rule) or single documents
        self.pending: list[list] = []   # two_stage: [cluster, start, stop, round, [sampled positions]]
        self.scored = 0
        self.history: list[dict] = []
        self.stop_reason: str | None = None
        self._warmup_counts: dict[int, int] | None = None  # round 0 only: warm-up documents per cluster
        self._check_stop()

    # -- thresholds ------------------------------------------------------------------------
    @property
    def tau(self) -> float | None:
        """The threshold the accept rule compares with (tau_block for ``block``, else tau_doc)."""
        if self.thresholds is None:
            return None
        return self.thresholds.block if self.config.accept == "block" else self.thresholds.doc

    @property
    def scale(self) -> float | None:
        return None if self.thresholds is None else self.thresholds.scale

    @property
    def awaiting_tau(self) -> bool:
        """``tau: validate`` after the warm-up: the caller must :meth:`set_tau` before round 1."""
        return self.config.tau == "validate" and self.tau_validation is None and self.next_round == 1

    def tau_buckets(self) -> list[dict]:
        """``tau: validate``: the warm-up documents in ``tau_buckets`` equal-count influence buckets,
        best first: ``[{"bucket", "low", "high", "doc_ids", "shards", "rows"}]`` (``low`` = the bucket's
        tau; shards / rows locate the documents, None / -1 where the store has none)."""
        warm = next((h for h in self.history if h.get("kind") == "warmup"), None)
        if warm is None:
            raise ValueError("tau buckets need the warm-up round first")
        ids, scores = list(warm["doc_ids"]), np.asarray(warm["scores"], np.float64)
        shards, rows = self._warmup_locations(warm)
        order = np.argsort(-scores, kind="stable")
        out = []
        for b, part in enumerate(np.array_split(order, self.config.tau_buckets)):
            if part.size:
                out.append({"bucket": b, "low": float(scores[part].min()), "high": float(scores[part].max()),
                            "doc_ids": [ids[i] for i in part], "shards": [shards[i] for i in part],
                            "rows": [rows[i] for i in part]})
        return out

    def _warmup_locations(self, warm: dict) -> tuple[list, list[int]]:
        """Shards and rows of the warm-up documents in the record's order. Each warm-up item is the
        front ``[0, n)`` of its cluster's queue (record order: item by item), so they are read back
        from the queues: O(warm-up), nothing kept in the round log."""
        shards: list = []
        rows: list[int] = []
        clusters, ids = warm["clusters"], warm["doc_ids"]
        i = 0
        while i < len(clusters):
            n = 1
            while i + n < len(clusters) and clusters[i + n] == clusters[i]:
                n += 1
            entries = self.queues.read(int(clusters[i]), 0, n)
            if entries.doc_id != ids[i:i + n]:
                raise StateMismatch(f"warm-up documents of cluster {clusters[i]} are not the front of its queue")
            shards.extend(entries.shard)
            rows.extend(entries.row.tolist())
            i += n
        return shards, rows

    def set_tau(self, tau_doc: float, report: dict) -> None:
        """Fix the document threshold chosen by validation (and the matching sample-mean thresholds)."""
        if not self.awaiting_tau:
            raise ValueError("set_tau: only after the warm-up of a tau: validate run")
        warm = next(h for h in self.history if h.get("kind") == "warmup")
        scores = np.asarray(warm["scores"], np.float64)
        tokens = np.asarray(warm["n_tokens"], np.float64)
        p = float(tokens[scores > tau_doc].sum() / max(tokens.sum(), 1.0)) or 1.0 / max(len(scores), 1)
        cfg = self.config.model_copy(update={"tau": "quantile", "tau_top_fraction": min(max(p, 1e-6), 1 - 1e-6)})
        t = calibrate(cfg, scores, tokens.astype(np.int64), np.asarray(warm["clusters"]), self.budget_share, self.seed)
        self.thresholds = Thresholds(float(tau_doc), t.block, t.gate, p, t.scale)
        self.tau_validation = dict(report, tau_doc=float(tau_doc), pass_rate=p)
        warm["tau_doc"], warm["tau_block"], warm["tau_gate"], warm["pass_rate"] = (
            self.thresholds.doc, self.thresholds.block, self.thresholds.gate, p)
        self._keep_validated_warmup(warm)

    def _keep_validated_warmup(self, warm: dict) -> None:
        """``tau: validate``: keep the warm-up documents that clear the chosen tau."""
        scores = np.asarray(warm["scores"], np.float64)
        ids = warm["doc_ids"]
        by_cluster: dict[int, list[int]] = {}
        for j, c in enumerate(warm["clusters"]):
            by_cluster.setdefault(int(c), []).append(j)
        take_all = tokens_all = 0
        for c, js in by_cluster.items():
            it = RoundItem(c, [ids[j] for j in js], [ids[j] for j in js], 0, len(js), None, tuple(range(len(js))))
            take, tokens, _ = self._keep_documents(it, scores[js], 0)
            take_all, tokens_all = take_all + take, tokens_all + tokens
        warm["accepted_after_validation"] = {"docs": take_all, "tokens": tokens_all}
        self._check_stop()

    # -- planning --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def phase(self) -> str:
        if self.next_round == 0:
            return "warmup"
        return "expand" if self.pending else "bandit"

    def plan_round(self) -> RoundPlan | None:
        """The next round to score, or None when the selection is finished. Pure: calling it
        again before :meth:`apply_round` returns the same plan."""
        if self.done:
            return None
        if self.awaiting_tau:
            raise ValueError("tau: validate: set_tau must be called after the warm-up, before round 1")
        if self.phase == "warmup":
            return RoundPlan(0, "warmup", self._warmup_items())
        if self.phase == "expand":
            return RoundPlan(self.next_round, "expand", self._expand_items())
        items = []
        for cluster, ucb in self.bandit.select(self.config.arms_per_round):
            i = self.queues.index(cluster)
            start = int(self.cursor[i])
            stop = min(start + self.config.block_size, self.queues.size(cluster))
            entries = self.queues.read(cluster, start, stop)
            if self.config.accept == "documents":
                picks = np.arange(len(entries))
            else:
                n = sample_size(len(entries), self.config.sample_ratio, self.config.min_sample)
                picks = sample_picks(entries.key, n, self.seed)
            items.append(_item(cluster, entries, picks.tolist(), start, stop, ucb))
        return RoundPlan(self.next_round, "bandit", items)

    def _warmup_items(self) -> list[RoundItem]:
        if self.next_round != 0:
            return []
        if self._warmup_counts is None:  # computed once: the store reads every cluster's queue front
            self._warmup_counts = self.queues.smallest_keys_counts(self.config.warmup_size)
        # Smallest hash keys corpus-wide = a uniform sample, and the front of each cluster's queue.
        items = []
        for cluster, n in sorted(self._warmup_counts.items()):
            entries = self.queues.read(cluster, 0, n)
            items.append(_item(cluster, entries, list(range(n)), 0, n, None))
        return items

    def _expand_items(self) -> list[RoundItem]:
        items = []
        for cluster, start, stop, _rnd, sampled in self.pending:
            entries = self.queues.read(cluster, start, stop)
            done = set(sampled)
            rest = [p - start for p in range(start, stop) if p not in done]
            items.append(_item(int(cluster), entries, rest, start, stop, None))
        return items

    # -- applying scores -------------------------------------------------------------------
    def apply_round(self, scores: Sequence[Sequence[float]] | Mapping[int, Sequence[float]]) -> dict:
        """Apply the scores of the planned round's documents; returns the round's history record.

        ``scores``: one list per item of :meth:`plan_round` (same order, one score per document to
        score, in that order), or a mapping ``cluster -> scores``.
        """
        plan = self.plan_round()
        if plan is None:
            raise ValueError(f"the selection is finished ({self.stop_reason}); nothing to apply")
        per_item = self._align(plan, scores)
        self.scored += sum(len(s) for s in per_item)
        if plan.kind == "warmup":
            record = self._apply_warmup(plan, per_item)
        elif plan.kind == "expand":
            record = self._apply_expand(plan, per_item)
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

    def _reward(self, s: np.ndarray, compared: float) -> float:
        t = self.thresholds
        if self.config.reward == "pass_fraction":
            return float((s > t.doc).mean()) if s.size else 0.0
        return float(np.clip((s.mean() - compared) / t.scale, -self.config.reward_clip, self.config.reward_clip))

    def _new_record(self, plan: RoundPlan) -> dict[str, Any]:
        return {"round": plan.round, "kind": plan.kind, "arms": [], "ucb": [], "block_docs": [], "sample_docs": [],
                "mean_influence": [], "reward": [], "selected": [], "accepted_docs": [], "accepted_tokens": [],
                "propagated_to": [], "exhausted": [], "sample_scores_accepted": [], "sample_scores_rejected": []}

    def _log_item(self, rec: dict, it: RoundItem, s: np.ndarray, reward: float | None, selected: bool,
                  take: int, tokens: int, spread: list, kept: np.ndarray) -> None:
        i = self.queues.index(it.cluster)
        if self.cursor[i] >= self.queues.size(it.cluster) and self.bandit.active[self.bandit.index(it.cluster)] \
                and not any(p[0] == it.cluster for p in self.pending):
            self.bandit.remove(it.cluster)
            rec["exhausted"].append(it.cluster)
        rec["arms"].append(it.cluster)
        rec["ucb"].append(it.ucb)
        rec["block_docs"].append(len(it.block))
        rec["sample_docs"].append(len(it.sample))
        rec["mean_influence"].append(float(s.mean()) if s.size else None)
        rec["reward"].append(reward)
        rec["selected"].append(bool(selected))
        rec["accepted_docs"].append(take)
        rec["accepted_tokens"].append(tokens)
        rec["propagated_to"].append(len(spread))
        rec["sample_scores_accepted"].extend(s[kept].tolist())
        rec["sample_scores_rejected"].extend(s[~kept].tolist())

    def _finish_record(self, rec: dict) -> dict:
        rec["budget_used"] = int(self.used_tokens)
        rec["budget"] = self.budget
        rec["active_arms"] = self.bandit.n_active()
        return rec

    def _apply_warmup(self, plan: RoundPlan, per_item: list[np.ndarray]) -> dict:
        allscores = np.concatenate(per_item) if per_item else np.zeros(0)
        if allscores.size == 0:
            raise ValueError("the warm-up round has no scores")
        tokens = np.concatenate([self.queues.read(it.cluster, it.start, it.stop).n_tokens for it in plan.items])
        clusters = np.concatenate([np.full(len(it.positions), it.cluster) for it in plan.items])
        self.thresholds = calibrate(self.config, allscores, tokens, clusters, self.budget_share, self.seed)
        t = self.thresholds
        rec = self._new_record(plan)
        rec.update({"n_scored": int(allscores.size), "tau": self.tau, "tau_doc": t.doc, "tau_block": t.block,
                    "tau_gate": t.gate, "pass_rate": t.pass_rate, "reward_scale": t.scale,
                    "scores": allscores.tolist(), "n_tokens": tokens.tolist(), "clusters": clusters.tolist(),
                    "doc_ids": [d for it in plan.items for d in it.sample]})
        validate_later = self.config.tau == "validate"
        for it, s in zip(plan.items, per_item):
            self.cursor[self.queues.index(it.cluster)] = it.stop
            reward = self._reward(s, t.doc)
            spread = self.bandit.update(it.cluster, reward)
            # tau: validate keeps nothing yet: its tau is chosen after this round (set_tau)
            take, tokens_kept, kept = (0, 0, np.zeros(s.size, bool)) if validate_later else \
                self._keep_documents(it, s, plan.round)
            self._log_item(rec, it, s, reward, bool(take), take, tokens_kept, spread, kept)
        return self._finish_record(rec)

    def _apply_bandit(self, plan: RoundPlan, per_item: list[np.ndarray]) -> dict:
        t = self.thresholds
        rec = self._new_record(plan)
        for it, s in zip(plan.items, per_item):
            i = self.queues.index(it.cluster)
            self.cursor[i] = it.stop
            mode = self.config.accept
            compared = t.doc if mode == "documents" else (t.block if mode == "block" else t.gate)
            reward = self._reward(s, compared)
            spread = self.bandit.update(it.cluster, reward)
            mean = float(s.mean())
            if mode == "block":
                selected = mean > t.block
                take = tokens = 0
                if selected and not self._budget_closed():
                    take, tokens = self._accept_range(it.cluster, it.start, it.stop, plan.round, mean)
                elif not selected and self.config.fill_rejected:
                    self.rejected.append([it.cluster, it.start, it.stop, plan.round, mean])
                kept = np.full(s.size, bool(take))
            else:
                take, tokens, kept = self._keep_documents(it, s, plan.round)
                selected = bool(take)
                if mode == "two_stage" and mean > t.gate and len(it.sample) < len(it.block):
                    selected = True
                    self.pending.append([it.cluster, it.start, it.stop, plan.round, list(it.positions)])
            self._log_item(rec, it, s, reward, selected, take, tokens, spread, kept)
        return self._finish_record(rec)

    def _apply_expand(self, plan: RoundPlan, per_item: list[np.ndarray]) -> dict:
        rec = self._new_record(plan)
        self.pending = []
        for it, s in zip(plan.items, per_item):
            reward = self._reward(s, self.thresholds.doc)
            spread = self.bandit.update(it.cluster, reward) if self.bandit.active[self.bandit.index(it.cluster)] else []
            take, tokens, kept = self._keep_documents(it, s, plan.round)
            self._log_item(rec, it, s, reward, bool(take), take, tokens, spread, kept)
        return self._finish_record(rec)

    def _keep_documents(self, it: RoundItem, s: np.ndarray, rnd: int) -> tuple[int, int, np.ndarray]:
        """Keep each scored document above tau_doc (queue order) while the budget lasts."""
        kept = np.zeros(s.size, bool)
        take = tokens = 0
        for j, (p, score) in enumerate(zip(it.positions, s.tolist())):
            if score > self.thresholds.doc:
                if self._budget_closed():
                    continue
                n, t = self._accept_range(it.cluster, p, p + 1, rnd, score)
                kept[j] = bool(n)
                take, tokens = take + n, tokens + t
            elif self.config.fill_rejected:
                self.rejected.append([it.cluster, p, p + 1, rnd, score])
        return take, tokens, kept

    def _accept_range(self, cluster: int, start: int, stop: int, rnd: int, score: float) -> tuple[int, int]:
        """Take the range's longest prefix that fits the budget; returns (documents, tokens)."""
        block_tokens = self.queues.read(cluster, start, stop).n_tokens
        take = int(np.searchsorted(np.cumsum(block_tokens), self.budget - self.used_tokens, side="right"))
        tokens = int(block_tokens[:take].sum())
        if take < len(block_tokens):
            self.stop_reason = "budget"  # trimmed at the edge: the next document would pass it
        if take:
            self.accepted.append([int(cluster), int(start), int(start) + take, int(rnd), float(score)])
            self.used_tokens += tokens
        return take, tokens

    def _fill(self) -> None:
        """fill_rejected: the rejected blocks / documents, best score first, until the budget is full."""
        rec = {"round": self.next_round, "kind": "fill", "blocks": 0, "accepted_docs": 0, "accepted_tokens": 0}
        for cluster, start, stop, rnd, score in sorted(self.rejected, key=lambda b: (-b[4], b[3], b[0], b[1])):
            if self._budget_closed():
                break
            take, tokens = self._accept_range(cluster, start, stop, rnd, score)
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
        if self.stop_reason is not None or self.awaiting_tau:
            return
        if self._budget_closed():
            self.stop_reason = "budget"
        elif self.bandit.n_active() == 0 and not self.pending:
            if self.config.fill_rejected and self.rejected:
                self._fill()
            else:
                self.stop_reason = "exhausted"
        elif self.config.max_rounds is not None and self.next_round > self.config.max_rounds and not self.pending:
            self.stop_reason = "max_rounds"

    # -- results ---------------------------------------------------------------------------
    def selection(self, locations: bool = False) -> dict[str, list]:
        """Selected documents as columns ``doc_id, cluster, n_tokens, score, round`` (acceptance
        order; ``score`` = the document's own influence, or its block's sample mean under ``block``).
        With ``locations``, also ``shard, row`` from the queues (None / -1 where the store has none), so a
        manifest needs no lookup by id. Reads the kept ranges: O(selection)."""
        out: dict[str, list] = {}
        for batch in self.selection_batches(locations):
            for name, values in batch.items():
                out.setdefault(name, []).extend(values)
        return out or {name: [] for name in ("doc_id", "cluster", "n_tokens", "score", "round")
                       + (("shard", "row") if locations else ())}

    def selection_batches(self, locations: bool = False, rows_per_batch: int = 65_536) -> Iterator[dict[str, list]]:
        """:meth:`selection` in pieces of at least ``rows_per_batch`` rows (the last may be smaller): what
        a caller that converts as it goes (to Arrow) holds at once instead of every row's Python objects."""
        names = ("doc_id", "cluster", "n_tokens", "score", "round") + (("shard", "row") if locations else ())
        out: dict[str, list] = {name: [] for name in names}
        for cluster, start, stop, rnd, score in self.accepted:
            entries = self.queues.read(cluster, start, stop)
            n = stop - start
            out["doc_id"].extend(entries.doc_id)
            if locations:
                out["shard"].extend(entries.shard)
                out["row"].extend(entries.row.tolist())
            out["n_tokens"].extend(entries.n_tokens.tolist())
            out["cluster"].extend([int(cluster)] * n)
            out["score"].extend([float(score)] * n)
            out["round"].extend([int(rnd)] * n)
            if len(out["doc_id"]) >= rows_per_batch:
                yield out
                out = {name: [] for name in names}
        if out["doc_id"]:
            yield out

    def summary(self) -> dict[str, Any]:
        """What goes into ``manifest.json["quad"]``: settings, calibration, outcome, round log."""
        bandit_rounds = sum(1 for h in self.history if h.get("kind") in ("bandit", "expand"))
        t = self.thresholds
        return {
            "config": self.config.model_dump(mode="json"),
            "seed": self.seed,
            "accept": self.config.accept,
            "budget_tokens": self.budget,
            "budget_share": self.budget_share,
            "selected_tokens": int(self.used_tokens),
            "selected_documents": int(sum(stop - start for _, start, stop, _, _ in self.accepted)),
            "selected_blocks": len(self.accepted),
            "tau": self.tau,
            "thresholds": None if t is None else t.to_dict(),
            "tau_validation": self.tau_validation,
            "reward_scale": self.scale,
            "rounds": bandit_rounds,
            "stop_reason": self.stop_reason,
            "arms": len(self.queues.cluster_ids),
            "exhausted_arms": len(self.queues.cluster_ids) - self.bandit.n_active(),
            "scored_documents": int(self.scored),
            "scored_fraction": self.scored / len(self.queues) if len(self.queues) else 0.0,
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
            "thresholds": None if self.thresholds is None else self.thresholds.to_dict(),
            "tau_validation": self.tau_validation,
            "used_tokens": int(self.used_tokens),
            "scored": int(self.scored),
            "cursor": self.cursor.tolist(),
            "accepted": [list(a) for a in self.accepted],
            "rejected": [list(r) for r in self.rejected],
            "pending": [list(p) for p in self.pending],
            "stop_reason": self.stop_reason,
            "bandit": self.bandit.to_dict(include_neighbours=False),
            "history_offset": history_since,
            "history": self.history[history_since:],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], doc_ids: Sequence[str] | None = None,
                  clusters: Sequence[int] | None = None, n_tokens: Sequence[int] | None = None,
                  neighbours: Iterable[Sequence] = (), history_prefix: Sequence[dict] = (),
                  store: ClusterQueueStore | None = None) -> "QuadSelector":
        """Restore a checkpoint for the same documents and neighbours (else :class:`StateMismatch`).
        The documents are given as columns (``doc_ids, clusters, n_tokens``) or as a queue ``store``."""
        if state.get("version") != STATE_VERSION:
            raise StateMismatch(f"unsupported quad state version {state.get('version')!r}")
        config = QuadConfig.model_validate(state["config"])
        if store is None:
            store = ClusterQueues(doc_ids, clusters, n_tokens, int(state["seed"]))
        elif int(store.seed) != int(state["seed"]):
            raise StateMismatch(f"the queues are in the hash order of seed {store.seed}, the checkpoint's is "
                                f"{state['seed']}")
        q = cls.on_store(config, store, state["budget"], neighbours, state["seed"])
        if q.queues.fingerprint() != state["documents"]:
            raise StateMismatch("the checkpoint was taken over different documents (ids, clusters or tokens)")
        if q._neighbours_fp != state["neighbours"]:
            raise StateMismatch("the checkpoint was taken with different cluster neighbours")
        if len(history_prefix) != state["history_offset"]:
            raise StateMismatch(f"history prefix has {len(history_prefix)} records, the checkpoint expects "
                                f"{state['history_offset']}")
        q.bandit = UCBBandit.from_dict(state["bandit"], neighbours=q.bandit.neighbour_arrays())
        q.next_round = int(state["next_round"])
        q.thresholds = None if state["thresholds"] is None else Thresholds(**state["thresholds"])
        q.tau_validation = state["tau_validation"]
        q.used_tokens = int(state["used_tokens"])
        q.scored = int(state["scored"])
        if len(state["cursor"]) != len(q.queues.cluster_ids):
            raise StateMismatch("the checkpoint has a cursor per cluster of another cluster set")
        q.cursor = np.array(state["cursor"], np.int64)
        q.accepted = [list(a) for a in state["accepted"]]
        q.rejected = [list(r) for r in state["rejected"]]
        q.pending = [list(p) for p in state["pending"]]
        q.stop_reason = state["stop_reason"]
        q.history = list(history_prefix) + list(state["history"])
        return q


def load_cluster_inputs(workdir, keys: Iterable[str]) -> tuple[dict[str, np.ndarray], list[tuple[int, int, float]]]:
    """The cluster stage's outputs as Quad's inputs: ``({doc_id, cluster, n_tokens}, neighbours)``.

    Reads ``cluster/<key>.parquet`` for each shard key and ``cluster_summary/neighbours.parquet``
    (see :mod:`selector.clusters.kmeans`) from the work dir ``workdir`` (a :class:`selector.data.workdir.WorkDir`).
    """
    from selector.clusters.kmeans import ASSIGN_STAGE

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
    return docs, load_cluster_neighbours(workdir)


def load_cluster_neighbours(workdir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cluster stage's neighbour pairs ``(cluster, neighbour, distance)`` (both directions),
    as three arrays (no Python object per pair: k clusters x ``cluster.max_neighbours``)."""
    from selector.quad.bandit import neighbour_arrays
    from selector.clusters.kmeans import SUMMARY_STAGE

    return neighbour_arrays(workdir.read_table(SUMMARY_STAGE, "neighbours"))


def _item(cluster: int, entries: QueueEntries, picks: Sequence[int], start: int, stop: int,
          ucb: float | None) -> RoundItem:
    """A round item for the block ``entries`` (queue positions ``[start, stop)``) scoring ``picks``
    (offsets into the block)."""
    return RoundItem(int(cluster), list(entries.doc_id), [entries.doc_id[p] for p in picks], int(start), int(stop),
                     ucb, tuple(int(start + p) for p in picks), tuple(entries.shard[p] for p in picks),
                     tuple(int(entries.row[p]) for p in picks), tuple(float(entries.key[p]) for p in picks))
