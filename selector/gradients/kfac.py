"""K-FAC / EK-FAC curvature for influence (Martens & Grosse 2015; George et al. 2018;
Grosse et al. 2023, "Studying LLM generalization with influence functions").

For each tracked block l with (augmented) inputs a_t and output gradients g_t over the
non-pad tokens t of the fitting set:

    A_l = (1/N) sum_t a_t a_t^T            G_l = (1/N) sum_t g_t g_t^T
    H_l ~ A_l (x) G_l   (acting on vec(W_l), W_l out x in, column-major vec)

g_t is the gradient of the *token* loss CE_t (the batch is backpropagated through the sum
of token losses), so H_l approximates the curvature of the mean token loss. With
eigendecompositions A = Q_A diag(lambda_A) Q_A^T and G = Q_G diag(lambda_G) Q_G^T (fp64),

    H_l^-1 V = Q_G [ (Q_G^T V Q_A) / (Lambda + damping) ] Q_A^T,
    Lambda = lambda_G lambda_A^T                      (K-FAC)
    Lambda_ij = (1/N) sum_t ((Q_G^T g_t)_i)^2 ((Q_A^T a_t)_j)^2   (EK-FAC, per-token)

The EK-FAC correction replaces the Kronecker eigenvalues with the second moments of the
per-token gradients g_t a_t^T in the Kronecker eigenbasis (needs a second pass).

Damping default: 0.1 x mean(Lambda) (the mean of the eigenvalue products), per block.
Damping 0 with a singular Lambda is an error, not a silent inf.

Factors are accumulated in fp32 as *sums* with a token count, so partial factors from Ray
workers are merged by adding them (:meth:`FactorSums.merge`). They are stored with
safetensors (never pickle) at a local path or any fsspec URI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from selector.config_base import StrictModel
from selector.errors import StageError
from selector.models.lm_chunks import activation_grads_only, batches, chunk_losses, pad_id_of, tokenize_chunks
from selector.gradients.tracked_layers import TrackedBlock, capture


class KFACConfig(StrictModel):
    """How the curvature is fitted.

    Which documents the factors are fitted on is the job's ``factors`` section
    (``selector.config.FactorFitConfig``: a candidate-corpus sample by default, or the reference set).

    fisher: "true" samples targets from the model (the Fisher / GGN); "empirical" uses the
        data's next tokens.
    damping, damping_mode: "relative" means damping x mean(Lambda) per block (default 0.1);
        "absolute" adds ``damping`` as is.
    ekfac: apply the EK-FAC eigenvalue correction (a second pass over the fitting set).
    """

    fisher: Literal["true", "empirical"] = "true"
    damping: float = 0.1
    damping_mode: Literal["relative", "absolute"] = "relative"
    ekfac: bool = False
    seed: int = 0


def _to_np(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in d.items()}


@dataclass
class FactorSums:
    """Unnormalised A/G sums and the token count: a worker's partial result, mergeable."""

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    n_tokens: int = 0

    def merge(self, other: "FactorSums") -> "FactorSums":
        if set(self.A) != set(other.A):
            raise StageError(f"cannot merge K-FAC factors over different blocks: {sorted(self.A)} vs {sorted(other.A)}")
        return FactorSums({k: self.A[k] + other.A[k] for k in self.A}, {k: self.G[k] + other.G[k] for k in self.G},
                          self.n_tokens + other.n_tokens)

    def to_numpy(self) -> dict:
        """A plain dict of arrays for shipping between Ray processes."""
        return {"A": _to_np(self.A), "G": _to_np(self.G), "n_tokens": int(self.n_tokens)}

    @classmethod
    def from_numpy(cls, d: dict) -> "FactorSums":
        return cls({k: torch.from_numpy(np.array(v)) for k, v in d["A"].items()},
                   {k: torch.from_numpy(np.array(v)) for k, v in d["G"].items()}, int(d["n_tokens"]))


@dataclass
class EKFACSums:
    """Unnormalised sums of squared rotated per-token gradients (EK-FAC), mergeable."""

    S: dict[str, torch.Tensor]
    n_tokens: int = 0

    def merge(self, other: "EKFACSums") -> "EKFACSums":
        return EKFACSums({k: self.S[k] + other.S[k] for k in self.S}, self.n_tokens + other.n_tokens)

    def to_numpy(self) -> dict:
        return {"S": _to_np(self.S), "n_tokens": int(self.n_tokens)}

    @classmethod
    def from_numpy(cls, d: dict) -> "EKFACSums":
        return cls({k: torch.from_numpy(np.array(v)) for k, v in d["S"].items()}, int(d["n_tokens"]))


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _fitting_tokens(model, tokenizer, texts, blocks, chunk_tokens, batch_size, fisher, seed, max_chunks_per_doc):
    """Per fitting batch: (non-pad token count, [(block name, a_t rows, g_t rows)]) in fp32.

    Both factor passes (K-FAC, then EK-FAC) walk the same batches with the same sampled labels
    (seeded generator), so their statistics describe the same Fisher.
    """
    model.eval()
    device = _model_device(model)
    chunks = tokenize_chunks(tokenizer, texts, chunk_tokens, max_chunks_per_doc)
    gen = torch.Generator(device=device).manual_seed(seed)
    with activation_grads_only(model), capture(blocks):
        for batch in batches(chunks, batch_size, pad_id_of(tokenizer), device):
            loss = chunk_losses(model, batch, sample_labels=(fisher == "true"), generator=gen, reduce="sum").sum()
            loss.backward()
            mask = batch.token_mask.bool()
            yield int(mask.sum()), [(b.name, b.a_aug()[mask].float(), b.g[mask].float()) for b in blocks]


def accumulate_factors(model, tokenizer, texts: Sequence[str], blocks: list[TrackedBlock], *,
                       chunk_tokens: int, batch_size: int = 8, fisher: str = "true", seed: int = 0,
                       max_chunks_per_doc: int | None = None) -> FactorSums:
    """One pass over ``texts``: sums of a a^T and g g^T (fp32) over non-pad tokens."""
    device = _model_device(model)
    A = {b.name: torch.zeros(b.in_aug, b.in_aug, dtype=torch.float32, device=device) for b in blocks}
    G = {b.name: torch.zeros(b.out_features, b.out_features, dtype=torch.float32, device=device) for b in blocks}
    n = 0
    for n_batch, per_block in _fitting_tokens(model, tokenizer, texts, blocks, chunk_tokens, batch_size, fisher,
                                              seed, max_chunks_per_doc):
        for name, a, g in per_block:
            A[name] += a.T @ a
            G[name] += g.T @ g
        n += n_batch
    return FactorSums({k: v.cpu() for k, v in A.items()}, {k: v.cpu() for k, v in G.items()}, n)


@dataclass
class KFACFactors:
    """Normalised factors, their fp64 eigendecompositions and the damping per block."""

    blocks: list[str]
    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    n_tokens: int
    damping: float = 0.1
    damping_mode: str = "relative"
    QA: dict[str, torch.Tensor] = field(default_factory=dict)
    lA: dict[str, torch.Tensor] = field(default_factory=dict)
    QG: dict[str, torch.Tensor] = field(default_factory=dict)
    lG: dict[str, torch.Tensor] = field(default_factory=dict)
    ekfac: dict[str, torch.Tensor] = field(default_factory=dict)  # corrected Lambda (out x in)

    @classmethod
    def from_sums(cls, sums: FactorSums, damping: float = 0.1, damping_mode: str = "relative") -> "KFACFactors":
        if sums.n_tokens <= 0:
            raise StageError("K-FAC fitting set has no tokens: every fitting document was empty or shorter than 2 tokens")
        f = cls(blocks=list(sums.A), A={k: (v.double() / sums.n_tokens) for k, v in sums.A.items()},
                G={k: (v.double() / sums.n_tokens) for k, v in sums.G.items()}, n_tokens=sums.n_tokens,
                damping=damping, damping_mode=damping_mode)
        f.eigendecompose()
        return f

    def eigendecompose(self) -> None:
        for k in self.blocks:
            for M, Q, L in ((self.A, self.QA, self.lA), (self.G, self.QG, self.lG)):
                S = M[k].double()
                S = 0.5 * (S + S.T)  # fp32 accumulation leaves tiny asymmetries
                lam, vec = torch.linalg.eigh(S)
                Q[k], L[k] = vec, lam.clamp(min=0.0)  # PSD by construction; clip round-off negatives
        self.check_damping()

    def eigenvalues(self, name: str) -> torch.Tensor:
        """Lambda (out x in): EK-FAC's corrected eigenvalues if fitted, else lambda_G lambda_A^T."""
        if name in self.ekfac:
            return self.ekfac[name]
        return torch.outer(self.lG[name], self.lA[name])

    def damping_for(self, name: str) -> float:
        if self.damping_mode == "absolute":
            return float(self.damping)
        return float(self.damping) * float(self.eigenvalues(name).mean())

    def check_damping(self) -> None:
        """Damping must make every block invertible; name the offending block otherwise."""
        if self.damping < 0:
            raise StageError(f"influence.kfac.damping must be >= 0 (got {self.damping})")
        for k in self.blocks:
            lam = self.eigenvalues(k)
            smallest = float(lam.min()) + self.damping_for(k)
            if smallest <= 1e-12 * max(float(lam.max()), 1e-300):
                raise StageError(
                    f"K-FAC block {k}: factors are singular (smallest eigenvalue product {float(lam.min()):.3g}, "
                    f"largest {float(lam.max()):.3g}) and damping is {self.damping} ({self.damping_mode}); "
                    f"set influence.kfac.damping > 0")

    def set_ekfac(self, sums: EKFACSums) -> None:
        if sums.n_tokens <= 0:
            raise StageError("EK-FAC pass saw no tokens")
        self.ekfac = {k: v.double() / sums.n_tokens for k, v in sums.S.items()}
        self.check_damping()

    def precondition(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """H_l^-1 V for an (out x in_aug) matrix (or a stack (..., out, in)), in fp64."""
        QA, QG = self.QA[name], self.QG[name]
        V = V.to(dtype=torch.float64, device=QA.device)
        R = QG.T @ V @ QA
        R = R / (self.eigenvalues(name) + self.damping_for(name))
        return QG @ R @ QA.T

    # ----------------------------------------------------------------- persistence

    def save(self, uri: str, storage_options: dict | None = None) -> None:
        """Write all factors (and eigendecompositions) as one safetensors file at ``uri``."""
        from safetensors.torch import save as st_save

        tensors: dict[str, torch.Tensor] = {}
        for i, k in enumerate(self.blocks):
            for tag, d in (("A", self.A), ("G", self.G), ("QA", self.QA), ("lA", self.lA), ("QG", self.QG),
                           ("lG", self.lG), ("ekfac", self.ekfac)):
                if k in d:
                    tensors[f"{i}.{tag}"] = d[k].detach().cpu().contiguous()
        meta = {"format": "thresher-kfac-v1", "blocks": json.dumps(self.blocks), "n_tokens": str(self.n_tokens),
                "damping": repr(float(self.damping)), "damping_mode": self.damping_mode}
        _write_bytes(uri, st_save(tensors, metadata=meta), storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None) -> "KFACFactors":
        from safetensors.torch import load as st_load

        data = _read_bytes(uri, storage_options)
        meta = _safetensors_metadata(data)
        if meta.get("format") != "thresher-kfac-v1":
            raise StageError(f"{uri} is not a Thresher K-FAC factor file (format={meta.get('format')!r})")
        tensors = st_load(data)
        blocks = json.loads(meta["blocks"])
        f = cls(blocks=blocks, A={}, G={}, n_tokens=int(meta["n_tokens"]), damping=float(meta["damping"]),
                damping_mode=meta["damping_mode"])
        for i, k in enumerate(blocks):
            for tag, d in (("A", f.A), ("G", f.G), ("QA", f.QA), ("lA", f.lA), ("QG", f.QG), ("lG", f.lG),
                           ("ekfac", f.ekfac)):
                if f"{i}.{tag}" in tensors:
                    d[k] = tensors[f"{i}.{tag}"]
        f.check_damping()
        return f

    def to(self, device) -> "KFACFactors":
        for d in (self.QA, self.lA, self.QG, self.lG, self.ekfac):
            for k in d:
                d[k] = d[k].to(device)
        return self


def accumulate_ekfac(model, tokenizer, texts: Sequence[str], blocks: list[TrackedBlock], factors: KFACFactors, *,
                     chunk_tokens: int, batch_size: int = 8, fisher: str = "true", seed: int = 0,
                     max_chunks_per_doc: int | None = None) -> EKFACSums:
    """Second pass: sums of ((Q_G^T g_t)^2)((Q_A^T a_t)^2)^T over non-pad tokens."""
    device = _model_device(model)
    S = {b.name: torch.zeros(b.out_features, b.in_aug, dtype=torch.float64, device=device) for b in blocks}
    QA = {b.name: factors.QA[b.name].to(device=device, dtype=torch.float32) for b in blocks}
    QG = {b.name: factors.QG[b.name].to(device=device, dtype=torch.float32) for b in blocks}
    n = 0
    for n_batch, per_block in _fitting_tokens(model, tokenizer, texts, blocks, chunk_tokens, batch_size, fisher,
                                              seed, max_chunks_per_doc):
        for name, a, g in per_block:
            S[name] += (((g @ QG[name]) ** 2).T @ ((a @ QA[name]) ** 2)).double()
        n += n_batch
    return EKFACSums({k: v.cpu() for k, v in S.items()}, n)


def fit_kfac(model, tokenizer, texts: Sequence[str], blocks: list[TrackedBlock], config: KFACConfig | None = None, *,
             chunk_tokens: int = 1024, batch_size: int = 8, max_chunks_per_doc: int | None = None) -> KFACFactors:
    """Single-process fit: accumulate, normalise, eigendecompose, optionally EK-FAC-correct."""
    config = config or KFACConfig()
    kw = dict(chunk_tokens=chunk_tokens, batch_size=batch_size, fisher=config.fisher, seed=config.seed,
              max_chunks_per_doc=max_chunks_per_doc)
    sums = accumulate_factors(model, tokenizer, texts, blocks, **kw)
    factors = KFACFactors.from_sums(sums, damping=config.damping, damping_mode=config.damping_mode)
    if config.ekfac:
        factors.set_ekfac(accumulate_ekfac(model, tokenizer, texts, blocks, factors, **kw))
    return factors


# --------------------------------------------------------------------------- IO helpers


def _write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    if not fs.exists(path):
        raise StageError(f"influence state file not found: {uri}")
    with fs.open(path, "rb") as f:
        return f.read()


def _safetensors_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}
