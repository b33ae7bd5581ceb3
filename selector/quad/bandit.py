"""Quad's bandit: an upper-confidence-bound (UCB) state machine over clusters.

Each k-means cluster is an arm. The Quad paper (Zhang et al., ICLR 2025, "Harnessing
Diversity for Important Data Selection in Pretraining LLMs") scores arm ``i`` with

    UCB_i = R_i + alpha * sqrt( 2 ln(sum_j T_j) / T_i )

where ``R_i`` is the arm's mean reward (the mean influence of its sampled documents minus the
threshold ``tau``) and ``T_i`` the number of times it was pulled. Like the published code we
use ``T_i + 1`` in the denominator, so an arm never pulled has a finite bonus:

    score_i = mean_reward_i + alpha * sqrt( 2 ln(max(total_pulls, 1)) / (pulls_i + 1) )

``total_pulls`` counts every pull so far, including pulls of arms that have since left.

Reward scale. Raw influences are tiny (~1e-3) and their scale depends on the model, the
reference set and the damping, so an ``alpha`` tuned on raw rewards would not transfer. We
normalise instead (:class:`RewardNormaliser`)::

    reward = (mean sampled influence - tau) / s

with ``s`` a robust scale of the influences of the warm-up sample: the interquartile range
divided by 1.349 (equal to the standard deviation for a normal distribution, but not thrown
by the heavy tails influences have). Guards for a degenerate warm-up: if the IQR is 0 we use
the standard deviation, then the largest absolute value, then 1. Rewards are then in units
of "typical influence spread", so ``alpha ~ 1`` means the same thing on every corpus, and
scaling all influences by any factor leaves the selection unchanged.

An arm never pulled (and never reached by propagation) has mean reward 0, i.e. "exactly at
the threshold"; its exploration bonus does the rest.

Reward propagation (optional, as in the paper's code). When arm ``i`` receives reward ``r``,
every still-active neighbour ``j`` whose centroid lies at distance ``d < radius`` from ``i``'s
gets ``r`` folded into its mean with weight ``w = 1 - d / radius``. Propagation updates the
neighbour's *reward mean only*, not its pull count: the neighbour was not sampled, so its
exploration bonus (uncertainty) must not shrink. The mean is the weighted mean
``sum(w * r) / sum(w)`` over direct pulls (weight 1) and propagated rewards.

Exhausted arms (clusters with no documents left) leave the bandit and are never chosen again.

Carrying statistics forward (the nightly refresh). :meth:`UCBBandit.carry_forward` starts a
fresh bandit from another run's arm statistics (``to_dict`` output) for the arms both share:
pulls, reward weight and weighted reward sum are multiplied by a ``decay`` in [0, 1] (pulls
rounded), so the means are kept and only their confidence shrinks; ``total_pulls`` becomes the
sum of the carried pulls. Arms only in the new run start at zero; arms only in the old one are
dropped. Every arm starts active (exhaustion is per run).

Determinism. There is no random state: ties in the score are broken by a per-arm priority,
a hash of ``(seed, arm)``, so the same seed and the same rewards give the same choices, and
:meth:`UCBBandit.to_dict` / :meth:`UCBBandit.from_dict` round-trip exactly through JSON.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Sequence

import numpy as np

STATE_VERSION = 1


def arm_priority(seed: int, arm: int) -> float:
    """A uniform [0, 1) tie-break key for ``arm``, a pure function of ``(seed, arm)``."""
    digest = hashlib.blake2b(f"{seed}:arm:{arm}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def robust_scale(values: Iterable[float]) -> float:
    """IQR / 1.349 of ``values``; falls back to std, max |x|, then 1.0 so it is never 0."""
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 1.0
    q75, q25 = np.percentile(x, [75, 25])
    for s in ((q75 - q25) / 1.349, float(np.std(x)), float(np.max(np.abs(x)))):
        if s > 0 and math.isfinite(s):
            return float(s)
    return 1.0


class RewardNormaliser:
    """``reward = (mean influence - offset) / scale`` (offset is Quad's tau)."""

    def __init__(self, offset: float, scale: float):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"reward scale must be a positive finite number, got {scale!r}")
        self.offset = float(offset)
        self.scale = float(scale)

    @classmethod
    def from_warmup(cls, warmup_scores: Sequence[float], tau: float) -> "RewardNormaliser":
        return cls(tau, robust_scale(warmup_scores))

    def __call__(self, mean_influence: float) -> float:
        return (float(mean_influence) - self.offset) / self.scale

    def to_dict(self) -> dict[str, float]:
        return {"offset": self.offset, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> "RewardNormaliser":
        return cls(d["offset"], d["scale"])


def neighbour_arrays(neighbours) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cluster, neighbour, distance)`` as three arrays, from a table with those columns (the
    cluster stage's ``neighbours`` table, read without a Python object per pair) or from an
    iterable of triples."""
    if hasattr(neighbours, "column_names"):  # a pyarrow table
        return (neighbours.column("cluster").to_numpy().astype(np.int64),
                neighbours.column("neighbour").to_numpy().astype(np.int64),
                neighbours.column("distance").to_numpy().astype(np.float64))
    if isinstance(neighbours, tuple) and len(neighbours) == 3 and all(isinstance(x, np.ndarray) for x in neighbours):
        a, b, d = neighbours
        return a.astype(np.int64), b.astype(np.int64), d.astype(np.float64)
    triples = list(neighbours)
    if not triples:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    a, b, d = zip(*triples)
    return np.array(a, np.int64), np.array(b, np.int64), np.array(d, np.float64)


def _neighbour_csr(arms: np.ndarray, neighbours, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric arm-position -> neighbours for pairs within ``radius`` (closest distance wins),
    as compressed rows: the neighbours of ``arms[i]`` are ``idx[ptr[i]:ptr[i + 1]]`` (arm
    positions, ascending arm id) at distances ``dist[ptr[i]:ptr[i + 1]]``. Three flat arrays,
    12 bytes a pair, so the bandit's memory is O(clusters x neighbours per cluster)."""
    a, b, d = neighbour_arrays(neighbours)
    n = len(arms)
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float64)
    pa_, pb = np.searchsorted(arms, a), np.searchsorted(arms, b)  # arms is sorted
    known = (arms[np.minimum(pa_, n - 1)] == a) & (arms[np.minimum(pb, n - 1)] == b)
    keep = known & (a != b) & (d >= 0.0) & (d < radius)
    pa_, pb, d = pa_[keep], pb[keep], d[keep]
    # The clustering table lists both directions; accept either and keep the closest per pair.
    src, dst, dist = np.concatenate([pa_, pb]), np.concatenate([pb, pa_]), np.concatenate([d, d])
    order = np.lexsort((dist, dst, src))
    src, dst, dist = src[order], dst[order], dist[order]
    first = np.ones(len(src), bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    src, dst, dist = src[first], dst[first], dist[first]
    ptr = np.searchsorted(src, np.arange(n + 1)).astype(np.int64)
    return ptr, dst.astype(np.int32), dist.astype(np.float64)


class UCBBandit:
    """UCB over ``arms`` (integer cluster ids). Rewards passed to :meth:`update` are normalised."""

    def __init__(self, arms: Iterable[int], alpha: float = 1.0, seed: int = 0,
                 neighbours: Iterable[Sequence] = (), radius: float = 0.2, propagate: bool = False):
        self.arms = np.array(sorted({int(a) for a in arms}), dtype=np.int64)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.radius = float(radius)
        self.propagate = bool(propagate)
        n = len(self.arms)
        self._pos = {int(a): i for i, a in enumerate(self.arms)}
        self.pulls = np.zeros(n, np.int64)
        self.weight = np.zeros(n, np.float64)        # sum of weights of the rewards folded in
        self.weighted_sum = np.zeros(n, np.float64)  # sum of weight * reward
        self.active = np.ones(n, bool)
        self.total_pulls = 0
        self.priority = np.array([arm_priority(self.seed, int(a)) for a in self.arms], np.float64)
        self._nb_ptr, self._nb_idx, self._nb_dist = _neighbour_csr(self.arms, neighbours, self.radius)

    # -- queries ---------------------------------------------------------------------------
    def index(self, arm: int) -> int:
        try:
            return self._pos[int(arm)]
        except KeyError:
            raise KeyError(f"unknown arm {arm}") from None

    def neighbours(self, arm: int) -> list[tuple[int, float]]:
        """``[(neighbour, weight 1 - d/radius)]`` of ``arm``, by neighbour id."""
        i = self.index(arm)
        lo, hi = self._nb_ptr[i], self._nb_ptr[i + 1]
        return [(int(self.arms[j]), 1.0 - float(d) / self.radius)
                for j, d in zip(self._nb_idx[lo:hi], self._nb_dist[lo:hi])]

    def means(self) -> np.ndarray:
        """Mean reward per arm (0 where nothing was observed), in ``self.arms`` order."""
        return np.divide(self.weighted_sum, self.weight, out=np.zeros_like(self.weight), where=self.weight > 0)

    def scores(self) -> np.ndarray:
        """UCB score per arm in ``self.arms`` order; ``-inf`` for arms that left."""
        bonus = self.alpha * np.sqrt(2.0 * math.log(max(self.total_pulls, 1)) / (self.pulls + 1.0))
        return np.where(self.active, self.means() + bonus, -np.inf)

    def n_active(self) -> int:
        return int(self.active.sum())

    def active_arms(self) -> list[int]:
        return self.arms[self.active].tolist()

    def select(self, m: int) -> list[tuple[int, float]]:
        """The top-``m`` active arms as ``(arm, score)``, best first (ties: seeded priority)."""
        scores = self.scores()
        order = np.lexsort((self.priority, -scores))  # last key is primary: score desc, then priority
        chosen = [i for i in order[: max(m, 0)] if self.active[i]]
        return [(int(self.arms[i]), float(scores[i])) for i in chosen]

    # -- updates ---------------------------------------------------------------------------
    def update(self, arm: int, reward: float) -> list[tuple[int, float]]:
        """Record a pull of ``arm`` with normalised ``reward``; returns the ``(neighbour, weight)``
        pairs the reward was propagated to."""
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward for arm {arm} is not finite: {reward}")
        i = self.index(arm)
        if not self.active[i]:
            raise ValueError(f"arm {arm} has left the bandit (exhausted)")
        self.pulls[i] += 1
        self.total_pulls += 1
        self.weight[i] += 1.0
        self.weighted_sum[i] += reward
        spread = []
        if self.propagate:
            for b, w in self.neighbours(arm):
                j = self._pos[b]
                if self.active[j] and w > 0:
                    self.weight[j] += w
                    self.weighted_sum[j] += w * reward
                    spread.append((b, w))
        return spread

    def n_neighbour_pairs(self) -> int:
        """Directed neighbour pairs held (both directions of each pair)."""
        return int(len(self._nb_idx))

    def carry_forward(self, prior: dict[str, Any], decay: float = 1.0) -> int:
        """Initialise this (never updated) bandit from ``prior`` (a :meth:`to_dict`) for the arms
        both share; see the module docstring. Returns how many arms were carried."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if self.total_pulls or self.weight.any():
            raise ValueError("carry_forward needs a fresh bandit (no pulls or rewards yet)")
        carried = 0
        for arm, pulls, weight, wsum in zip(prior["arms"], prior["pulls"], prior["weight"], prior["weighted_sum"]):
            i = self._pos.get(int(arm))
            if i is None:
                continue  # the cluster has no documents in this run
            self.pulls[i] = int(round(decay * int(pulls)))
            self.weight[i] = decay * float(weight)
            self.weighted_sum[i] = decay * float(wsum)
            carried += 1
        self.total_pulls = int(self.pulls.sum())
        return carried

    def remove(self, arm: int) -> None:
        """``arm`` is exhausted: it leaves the bandit for good."""
        self.active[self.index(arm)] = False

    # -- state -----------------------------------------------------------------------------
    def neighbour_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The neighbour pairs held, ``(cluster, neighbour, distance)``, by cluster then neighbour."""
        counts = np.diff(self._nb_ptr)
        return (np.repeat(self.arms, counts), self.arms[self._nb_idx], self._nb_dist.copy())

    def neighbours_fingerprint(self) -> str:
        """A hash of the neighbour pairs held (a checkpoint must be restored onto the same graph)."""
        h = hashlib.sha256()
        for x in self.neighbour_arrays():
            h.update(np.ascontiguousarray(x).tobytes())
        return h.hexdigest()[:32]

    def neighbour_triples(self) -> list[list]:
        a, b, d = self.neighbour_arrays()
        return [[int(x), int(y), float(z)] for x, y, z in zip(a, b, d)]

    def to_dict(self, include_neighbours: bool = True) -> dict[str, Any]:
        """JSON-able state; floats round-trip exactly (``json`` writes shortest repr)."""
        out = {
            "version": STATE_VERSION,
            "arms": self.arms.tolist(),
            "alpha": self.alpha,
            "seed": self.seed,
            "radius": self.radius,
            "propagate": self.propagate,
            "pulls": self.pulls.tolist(),
            "weight": self.weight.tolist(),
            "weighted_sum": self.weighted_sum.tolist(),
            "active": self.active.tolist(),
            "total_pulls": int(self.total_pulls),
        }
        if include_neighbours:
            out["neighbours"] = self.neighbour_triples()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], neighbours: Iterable[Sequence] | None = None) -> "UCBBandit":
        """Restore; ``neighbours`` must be given when the state was saved without them."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported bandit state version {d.get('version')!r}")
        if neighbours is None:
            if "neighbours" not in d:
                raise ValueError("bandit state was saved without neighbours: pass them to from_dict")
            neighbours = d["neighbours"]
        b = cls(d["arms"], alpha=d["alpha"], seed=d["seed"], neighbours=neighbours, radius=d["radius"],
                propagate=d["propagate"])
        b.pulls = np.array(d["pulls"], np.int64)
        b.weight = np.array(d["weight"], np.float64)
        b.weighted_sum = np.array(d["weighted_sum"], np.float64)
        b.active = np.array(d["active"], bool)
        b.total_pulls = int(d["total_pulls"])
        return b
