"""GTP — Gradient Trajectory Pursuit: joint sparse, non-negative data selection by CoSaMP.

Problem
-------
Column j of Phi (D x n) is document j's projected gradient at T checkpoints, concatenated
(D = T * per-checkpoint feature size, see ``selector.gtp.features``); y (D) is the target trajectory (the
reference set's mean gradient, or the corpus mean, projected the same way). GTP solves

    min_w ||Phi w - y||_2   subject to   ||w||_0 <= k,  w >= 0

so documents are chosen *jointly*: a near-duplicate of a chosen document explains nothing new
about the residual and is not picked again, unlike top-k by score.

Algorithm (CoSaMP, Needell & Tropp 2009, Alg. 1, with NNLS in place of least squares)
----------------------------------------------------------------------------------------
    w^0 = 0,  r^0 = y
    repeat i = 1, 2, ...:
        u     = Phi^T r^{i-1}                               proxy
        Omega = the 2k largest *positive* entries of u      (u_j <= 0: adding column j at a
                                                             positive weight cannot reduce ||r||)
        T     = Omega  U  supp(w^{i-1})                     merge
        b     = argmin_{z >= 0, supp z in T} ||Phi z - y||  NNLS (scipy.optimize.nnls)
        S     = the k largest entries of b                   prune
        w^i   = argmin_{z >= 0, supp z in S} ||Phi z - y||  refit on S (``refit=True``; the
                                                             paper keeps b|S — refitting never
                                                             increases the residual)
        r^i   = y - Phi w^i                                  update
    stop when ||r^i|| / ||y|| <= tol ("tol"), supp(w^i) == supp(w^{i-1}) ("support_unchanged"),
    no proxy entry is positive ("optimal": the KKT conditions of the NNLS over *all* columns
    hold, so no sparse-constrained move helps either), or i == max_iter ("max_iter").

CoSaMP's residual is not monotone in i; the iterate with the smallest residual is returned.

Column normalisation
--------------------
With ``normalize=True`` (default) the pursuit runs on unit-norm columns phi_j / ||phi_j||.
Support size and non-negativity are invariant to positive column scaling, so this is the same
optimisation problem with w_j rescaled; it only changes which columns the proxy ranks first
(correlation with the residual instead of raw inner product, so documents with large gradient
norms — e.g. short, high-loss ones — do not win the proxy by norm alone) and conditions the
NNLS. Weights are returned on the *original* scale: ``Phi[:, support] @ weights ~= y``.
Zero-norm columns (e.g. empty documents) can never reduce the residual and are never chosen.

Token budget (``pursue_under_budget``)
-------------------------------------
The job selects under a token budget B, not a count. Rule:
  1. eligible = non-zero columns with n_tokens <= B; k = clip(floor(B / mean eligible
     n_tokens), 1, #eligible).
  2. Pursue with k.
  3. Trim: walk the support in decreasing weight (ties: lower index first) and keep a document
     when it still fits (first-fit by weight, so one long document does not block shorter,
     lighter ones).
  4. Extend: if the leftover budget could still hold an unselected eligible document, the
     support came back full (== k; a support smaller than k means the pursuit is limited by
     rank or already optimal, and a larger k cannot help) and rounds remain (``max_rounds``),
     grow k by ceil(leftover / mean tokens of the unselected) and go to 2.
  5. Refit NNLS on the kept documents so the weights match the set actually selected; drop
     any whose refit weight is 0 (they do not reduce the residual). The budget may end up
     under-filled; the result says by how much.
Note: an NNLS solution has at most rank(Phi_S) <= D positive weights (Caratheodory), so GTP
selects at most D documents per pursuit; raise the projection dimensions
when the budget calls for more documents than that.

Distributed two-level pursuit
-----------------------------
Partition the columns at random (``partition_indices``) -> each partition pursues y over its
own columns with k_local = min(n_p, ceil(oversample * k)) (``local_candidates``) -> the union
of the local supports is pursued again with k (``global_pursuit``). k_local uses the global k,
not k / P: with a random partition the optimal support lands anywhere, and a partition's best
approximation of y from its own columns spreads weight over more documents than the global
one would, so each partition must be allowed to nominate at least k (``oversample`` = 2 by
default leaves slack for the documents whose role is taken by columns elsewhere). The global
step then handles at most P * oversample * k columns. ``two_level_pursuit`` runs the scheme in
one process; ``workers.gtp.distributed_pursuit`` runs it on Ray.

Layout and precision: ``features`` is (n, D), one row per document (row j = column j of Phi),
float32 or float64. The proxy is computed in ``features``' dtype (a float64 residual against a
float32 matrix would silently copy the whole matrix to float64 every iteration); NNLS runs in
float64 on the <= 3k selected columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import Literal

import numpy as np
from pydantic import Field, field_validator
from scipy.optimize import nnls

from selector.config_base import StrictModel
from selector.errors import StageError

_FINITE_CHECK_ROWS = 8192  # rows per block when scanning for NaN/inf (bounded temporaries)


# --------------------------------------------------------------------------- config


class GTPConfig(StrictModel):
    """The ``gtp`` section of a job config.

    checkpoints: >= 2 model paths (the trajectory), each a ``save_pretrained`` folder or URI,
    all sharing one tokenizer and architecture. Features per checkpoint are
    projection_dim_g * projection_dim_a per tracked block (``selector.gradients.projection``), so
    D = T * n_blocks * dim_g * dim_a; a pursuit selects at most D documents. k: documents to select; leave None to select under the job's
    token budget (``pursue_under_budget``). oversample: a partition nominates
    ceil(oversample * k) candidates in the distributed pursuit.
    """

    checkpoints: list[str] = Field(min_length=2)
    projection_dim_a: int = Field(8, ge=1, description="per tracked block: P_A rows (input side)")
    projection_dim_g: int = Field(8, ge=1, description="per tracked block: P_G rows (output side)")
    k: int | None = Field(None, ge=1)
    oversample: float = Field(2.0, ge=1.0)
    max_iter: int = Field(30, ge=1)
    tol: float = Field(1e-6, ge=0.0)
    normalize: bool = True
    refit: bool = True
    max_rounds: int = Field(3, ge=1, description="budget rule: pursuits that may grow k to fill the budget")
    target: Literal["reference", "corpus_mean"] = "reference"
    n_partitions: int | None = Field(None, ge=1, description="distributed pursuit partitions; None: one per shard")
    chunk_tokens: int = Field(1024, ge=2)
    max_chunks_per_doc: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0

    @field_validator("checkpoints")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("checkpoint paths must be non-empty")
        if len(set(v)) != len(v):
            raise ValueError(f"checkpoints must be distinct model paths, got {v}")
        return v

    def pursuit_kwargs(self) -> dict:
        """Keyword arguments for :func:`pursue` / :func:`two_level_pursuit` taken from this config."""
        return {"max_iter": self.max_iter, "tol": self.tol, "normalize": self.normalize, "refit": self.refit}


# --------------------------------------------------------------------------- results


@dataclass
class GTPPartition:
    """One partition's columns for the distributed pursuit (usually one corpus shard).

    ids: (n_p,) document ids; features: (n_p, D) rows = documents; n_tokens: (n_p,) ints or None.
    """

    ids: np.ndarray
    features: np.ndarray
    n_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids)
        if self.features.ndim != 2 or self.ids.shape != (self.features.shape[0],):
            raise StageError(f"GTPPartition: ids {self.ids.shape} and features {self.features.shape} "
                             "must have one row per document")
        if self.n_tokens is not None:
            self.n_tokens = np.asarray(self.n_tokens, dtype=np.int64)
            if self.n_tokens.shape != self.ids.shape:
                raise StageError(f"GTPPartition: n_tokens {self.n_tokens.shape} must match ids {self.ids.shape}")



@dataclass
class PursuitResult:
    """Outcome of one pursuit.

    ``support``: row indices into ``features``, ordered by decreasing weight (ties: lower index).
    ``weights``: float64, > 0, on the original column scale (``features[support].T @ weights ~= y``).
    ``residual_history``: relative residual ||y - Phi w^i|| / ||y|| for i = 0 (w = 0, so 1.0), 1, ...
    ``rel_residual``: the returned (best) iterate's relative residual.
    """

    support: np.ndarray
    weights: np.ndarray
    residual_history: list[float]
    rel_residual: float
    n_iter: int
    stop_reason: str
    k: int


@dataclass
class BudgetResult:
    """Outcome of :func:`pursue_under_budget` (see the module docstring for the rule)."""

    support: np.ndarray
    weights: np.ndarray
    n_tokens: np.ndarray              # tokens of each selected document, aligned with support
    tokens_selected: int
    budget_tokens: int
    k: int                            # k of the last pursuit round
    rounds: int
    rel_residual: float               # after the final refit on the kept documents
    dropped_zero_weight: int          # kept by the trim, then weight 0 in the refit
    pursuit: PursuitResult            # the last round's pursuit


@dataclass
class TwoLevelResult:
    """Outcome of the two-level (distributed) pursuit, run in one process."""

    support: np.ndarray               # global row indices into the full ``features``
    weights: np.ndarray
    rel_residual: float
    n_candidates: int                 # size of the union pursued globally
    local_k: list[int]
    local_rel_residuals: list[float]
    global_result: PursuitResult | BudgetResult
    partitions: list[np.ndarray] = field(repr=False)


# --------------------------------------------------------------------------- validation


def validate_inputs(features: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and finiteness; returns ``(features, y as float64)``. Raises StageError."""
    features = np.asarray(features)
    y = np.asarray(y)
    if features.ndim != 2:
        raise StageError(f"GTP features must be 2-D (n_docs, dim), got shape {features.shape}")
    n, dim = features.shape
    if n == 0 or dim == 0:
        raise StageError(f"GTP features are empty (shape {features.shape}): nothing to select from")
    if not np.issubdtype(features.dtype, np.floating):
        raise StageError(f"GTP features must be floating point, got {features.dtype}")
    if y.ndim != 1 or y.shape[0] != dim:
        raise StageError(f"GTP target y must be a vector of length {dim} (the feature dim), got shape {y.shape}")
    y = y.astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise StageError("GTP target y contains NaN or inf")
    for start in range(0, n, _FINITE_CHECK_ROWS):
        block = features[start:start + _FINITE_CHECK_ROWS]
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            bad = start + int(np.flatnonzero(~ok)[0])
            raise StageError(f"GTP features contain NaN or inf (first at row {bad})")
    if not np.any(y):
        raise StageError("GTP target y is all zeros: the relative residual is undefined and w = 0 is optimal; "
                         "check the reference set / target gradients")
    return features, y


def _check_k(k, n: int, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise StageError(f"GTP {what} must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise StageError(f"GTP {what} must be >= 1, got {k}")
    if k > n:
        raise StageError(f"GTP {what}={k} exceeds the number of documents ({n})")
    return k


def column_norms(features: np.ndarray) -> np.ndarray:
    """||phi_j|| for each row of ``features`` (float64), computed in row blocks."""
    out = np.empty(features.shape[0], dtype=np.float64)
    for start in range(0, features.shape[0], _FINITE_CHECK_ROWS):
        block = features[start:start + _FINITE_CHECK_ROWS].astype(np.float64)
        out[start:start + block.shape[0]] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


# --------------------------------------------------------------------------- core pieces


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """NNLS with a retry at a larger iteration cap (Lawson–Hanson can need more than 3n steps)."""
    for cap in (3 * a.shape[1] + 50, 30 * a.shape[1] + 500):
        try:
            x, _ = nnls(a, y, maxiter=cap)
            return x
        except RuntimeError:
            continue
    raise StageError(f"NNLS did not converge on a {a.shape[0]}x{a.shape[1]} subproblem; "
                     "the features may be badly conditioned (duplicate or huge columns)")


def top_positive(u: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest strictly positive entries of ``u`` (fewer if fewer are > 0).

    O(n) selection via argpartition; order of the result is unspecified.
    """
    pos = np.flatnonzero(u > 0)
    if pos.size <= m:
        return pos
    part = np.argpartition(-u[pos], m - 1)[:m]
    return pos[part]


def _order_by_weight(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort (idx, w) by decreasing weight, ties by increasing index (deterministic)."""
    order = np.lexsort((idx, -w))
    return idx[order], w[order]


def pursue(features: np.ndarray, y: np.ndarray, k: int, *, max_iter: int = 30, tol: float = 1e-6,
           normalize: bool = True, refit: bool = True, eligible: np.ndarray | None = None,
           _validated: bool = False) -> PursuitResult:
    """CoSaMP with non-negative weights (see the module docstring for the equations).

    features: (n, D) rows = documents (columns of Phi); y: (D,) target; k: max support size.
    eligible: optional boolean mask (n,) of documents allowed in the support.
    Raises StageError on empty/NaN features, zero y, k < 1 or k > n.
    """
    if not _validated:
        features, y = validate_inputs(features, y)
    n = features.shape[0]
    k = _check_k(k, n)
    if max_iter < 1:
        raise StageError(f"GTP max_iter must be >= 1, got {max_iter}")
    norms = column_norms(features)
    usable = norms > 0
    if eligible is not None:
        usable &= np.asarray(eligible, dtype=bool)
    # scale[j] multiplies column j in the pursuit; 0 removes it from the proxy.
    scale = np.zeros(n)
    scale[usable] = (1.0 / norms[usable]) if normalize else 1.0
    y_norm = float(np.linalg.norm(y))

    def design(idx: np.ndarray) -> np.ndarray:  # (D, |idx|) float64 scaled columns
        return features[idx].astype(np.float64).T * scale[idx]

    support = np.zeros(0, dtype=np.int64)
    coef = np.zeros(0)                                  # pursuit-scale weights on `support`
    residual = y.copy()
    history = [1.0]
    best = (1.0, support, coef)
    stop = "max_iter"
    it = 0
    for it in range(1, max_iter + 1):
        proxy = (features @ residual.astype(features.dtype, copy=False)).astype(np.float64) * scale
        omega = top_positive(proxy, 2 * k)
        if omega.size == 0:
            stop = "optimal"
            it -= 1
            break
        merged = np.union1d(omega, support)
        b = _nnls(design(merged), y)
        keep = b > 0
        merged, b = merged[keep], b[keep]
        if merged.size > k:
            top = np.argpartition(-b, k - 1)[:k]
            merged, b = merged[top], b[top]
        new_support = np.sort(merged)
        if refit:
            a = design(new_support)
            new_coef = _nnls(a, y)
            nz = new_coef > 0
            new_support, new_coef = new_support[nz], new_coef[nz]
            a = a[:, nz]
        else:
            new_coef = b[np.argsort(merged)]
            a = design(new_support)
        residual = y - a @ new_coef
        rel = float(np.linalg.norm(residual)) / y_norm
        history.append(rel)
        if rel < best[0]:
            best = (rel, new_support, new_coef)
        unchanged = np.array_equal(new_support, support)
        support, coef = new_support, new_coef
        if rel <= tol:
            stop = "tol"
            break
        if unchanged:
            stop = "support_unchanged"
            break
    rel, sup, cf = best
    weights = cf * scale[sup]                           # back to the original column scale
    sup, weights = _order_by_weight(sup, weights)
    return PursuitResult(support=sup, weights=weights, residual_history=history, rel_residual=rel,
                         n_iter=it, stop_reason=stop, k=k)


def fit_weights(features: np.ndarray, y: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, float]:
    """NNLS weights (original column scale) for a fixed support, and the relative residual."""
    support = np.asarray(support, dtype=np.int64)
    y = np.asarray(y, dtype=np.float64)
    if support.size == 0:
        return np.zeros(0), 1.0
    a = features[support].astype(np.float64).T
    norms = np.linalg.norm(a, axis=0)
    s = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    c = _nnls(a * s, y)  # solve on unit columns for conditioning, return original scale
    w = c * s
    rel = float(np.linalg.norm(y - a @ w) / np.linalg.norm(y))
    return w, rel


def relative_residual(features: np.ndarray, y: np.ndarray, support: np.ndarray, weights: np.ndarray) -> float:
    """||Phi_S w - y|| / ||y|| for given support and weights (original scale)."""
    y = np.asarray(y, dtype=np.float64)
    approx = features[np.asarray(support, dtype=np.int64)].astype(np.float64).T @ np.asarray(weights, np.float64)
    return float(np.linalg.norm(y - approx) / np.linalg.norm(y))


def topk_cosine(features: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Baseline: the k documents with the largest cosine(phi_j, y), best first."""
    features, y = validate_inputs(features, y)
    k = _check_k(k, features.shape[0])
    norms = column_norms(features)
    cos = (features @ y.astype(features.dtype)).astype(np.float64) / np.where(norms > 0, norms, np.inf)
    idx = np.argpartition(-cos, k - 1)[:k]
    return idx[np.lexsort((idx, -cos[idx]))]


# --------------------------------------------------------------------------- token budget


def _budget_k(budget: int, tokens: np.ndarray, cap: int) -> int:
    return int(min(cap, max(1, math.floor(budget / float(tokens.mean())))))


def pursue_under_budget(features: np.ndarray, y: np.ndarray, n_tokens: np.ndarray, budget_tokens: int, *,
                        max_rounds: int = 3, max_iter: int = 30, tol: float = 1e-6, normalize: bool = True,
                        refit: bool = True) -> BudgetResult:
    """GTP under a token budget: sum of n_tokens over the selection <= budget_tokens.

    The rule (choose k from the budget and mean tokens, pursue, trim first-fit by weight, grow k
    while budget is left and the support was full, refit) is in the module docstring.
    """
    features, y = validate_inputs(features, y)
    n = features.shape[0]
    n_tokens = np.asarray(n_tokens)
    if n_tokens.shape != (n,):
        raise StageError(f"n_tokens must have one entry per document ({n}), got shape {n_tokens.shape}")
    if not np.issubdtype(n_tokens.dtype, np.integer):
        raise StageError(f"n_tokens must be integers, got {n_tokens.dtype}")
    if np.any(n_tokens < 0):
        raise StageError(f"n_tokens must be >= 0 (first negative at row {int(np.flatnonzero(n_tokens < 0)[0])})")
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, (int, np.integer)) or budget_tokens < 1:
        raise StageError(f"budget_tokens must be a positive integer, got {budget_tokens!r}")
    if max_rounds < 1:
        raise StageError(f"max_rounds must be >= 1, got {max_rounds}")
    budget = int(budget_tokens)
    n_tokens = n_tokens.astype(np.int64)
    eligible = (column_norms(features) > 0) & (n_tokens <= budget)
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        raise StageError(f"no document fits the token budget {budget} with a non-zero gradient feature "
                         f"(shortest document: {int(n_tokens.min())} tokens)")
    k = _budget_k(budget, n_tokens[eligible], n_eligible)
    rounds = 0
    while True:
        rounds += 1
        res = pursue(features, y, k, max_iter=max_iter, tol=tol, normalize=normalize, refit=refit,
                     eligible=eligible, _validated=True)
        kept, used = [], 0
        for j in res.support:                       # already ordered by decreasing weight
            t = int(n_tokens[j])
            if used + t <= budget:
                kept.append(int(j))
                used += t
        left = budget - used
        rest = eligible.copy()
        rest[kept] = False
        can_grow = (rounds < max_rounds and res.support.size == k and k < n_eligible and rest.any()
                    and left >= int(n_tokens[rest].min()))
        if not can_grow:
            break
        k = min(n_eligible, k + max(1, math.ceil(left / float(n_tokens[rest].mean()))))
    kept_idx = np.asarray(kept, dtype=np.int64)
    w, rel = fit_weights(features, y, kept_idx)
    nz = w > 0
    dropped = int((~nz).sum())
    sup, w = _order_by_weight(kept_idx[nz], w[nz])
    return BudgetResult(support=sup, weights=w, n_tokens=n_tokens[sup], tokens_selected=int(n_tokens[sup].sum()),
                        budget_tokens=budget, k=k, rounds=rounds, rel_residual=rel, dropped_zero_weight=dropped,
                        pursuit=res)


# --------------------------------------------------------------------------- two-level (distributed)


def partition_indices(n: int, n_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded random split of range(n) into ``n_partitions`` near-equal, sorted, non-empty parts."""
    if n_partitions < 1:
        raise StageError(f"n_partitions must be >= 1, got {n_partitions}")
    if n_partitions > n:
        raise StageError(f"n_partitions={n_partitions} exceeds the number of documents ({n})")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, n_partitions)]


def local_k(k: int, n_partition: int, oversample: float) -> int:
    """Candidates a partition nominates: min(n_p, ceil(oversample * k)) (see module docstring)."""
    if oversample < 1:
        raise StageError(f"GTP oversample must be >= 1, got {oversample}")
    return int(min(n_partition, math.ceil(oversample * k)))


def budget_local_k(budget_tokens: int, n_tokens: np.ndarray, oversample: float) -> int:
    """Under a token budget: the k this partition's token mean implies, times ``oversample``."""
    n_tokens = np.asarray(n_tokens)
    fits = n_tokens[(n_tokens <= budget_tokens)]
    if fits.size == 0:
        return 0
    return local_k(_budget_k(int(budget_tokens), fits, fits.size), n_tokens.size, oversample)


def local_candidates(features: np.ndarray, y: np.ndarray, k_local: int, *, n_tokens: np.ndarray | None = None,
                     budget_tokens: int | None = None, **pursuit_kw) -> tuple[np.ndarray, float]:
    """Level 1: pursue y over one partition's columns; returns (local row indices, rel. residual).

    Under a budget, documents longer than the whole budget are excluded (they could never be
    selected) and k_local must already account for it (``budget_local_k``).
    """
    features, y = validate_inputs(features, y)
    eligible = None
    if budget_tokens is not None:
        if n_tokens is None:
            raise StageError("local_candidates: budget_tokens needs n_tokens")
        eligible = np.asarray(n_tokens) <= budget_tokens
        if not eligible.any():
            return np.zeros(0, dtype=np.int64), 1.0
    if k_local < 1:
        return np.zeros(0, dtype=np.int64), 1.0
    res = pursue(features, y, k_local, eligible=eligible, _validated=True, **pursuit_kw)
    return np.sort(res.support), res.rel_residual


def global_pursuit(features: np.ndarray, y: np.ndarray, k: int | None = None, *, n_tokens: np.ndarray | None = None,
                   budget_tokens: int | None = None, **pursuit_kw) -> PursuitResult | BudgetResult:
    """Level 2: pursue y over the union of candidates, with k or under a token budget (exactly one)."""
    if (k is None) == (budget_tokens is None):
        raise StageError("give exactly one of k and budget_tokens")
    if features.shape[0] == 0:
        raise StageError("GTP global pursuit: no partition nominated any candidate "
                         "(all documents are zero-gradient or longer than the budget)")
    if budget_tokens is not None:
        if n_tokens is None:
            raise StageError("global_pursuit: budget_tokens needs n_tokens")
        return pursue_under_budget(features, y, n_tokens, budget_tokens, **pursuit_kw)
    return pursue(features, y, min(k, features.shape[0]), **pursuit_kw)


def two_level_pursuit(features: np.ndarray, y: np.ndarray, k: int | None = None, *, n_partitions: int,
                      oversample: float = 2.0, seed: int = 0, n_tokens: np.ndarray | None = None,
                      budget_tokens: int | None = None, max_rounds: int = 3, **pursuit_kw) -> TwoLevelResult:
    """The distributed algorithm in one process: partition -> local pursuit -> union -> global pursuit.

    ``workers.gtp.distributed_pursuit`` does the same across Ray workers; this is its reference
    and what the residual-gap measurement compares against single-machine :func:`pursue`.
    """
    features, y = validate_inputs(features, y)
    if (k is None) == (budget_tokens is None):
        raise StageError("give exactly one of k and budget_tokens")
    n = features.shape[0]
    if k is not None:
        k = _check_k(k, n)
    parts = partition_indices(n, n_partitions, seed)
    cands, lks, lres = [], [], []
    for p in parts:
        if budget_tokens is not None:
            kl = budget_local_k(budget_tokens, n_tokens[p], oversample)
        else:
            kl = local_k(k, p.size, oversample)
        loc, rel = local_candidates(features[p], y, kl, n_tokens=None if n_tokens is None else n_tokens[p],
                                    budget_tokens=budget_tokens, **pursuit_kw)
        cands.append(p[loc])
        lks.append(kl)
        lres.append(rel)
    union = np.sort(np.concatenate(cands)) if cands else np.zeros(0, dtype=np.int64)
    extra = {"max_rounds": max_rounds} if budget_tokens is not None else {}
    g = global_pursuit(features[union], y, k, n_tokens=None if n_tokens is None else n_tokens[union],
                       budget_tokens=budget_tokens, **extra, **pursuit_kw)
    return TwoLevelResult(support=union[g.support], weights=g.weights, rel_residual=g.rel_residual,
                          n_candidates=int(union.size), local_k=lks, local_rel_residuals=lres,
                          global_result=g, partitions=parts)
