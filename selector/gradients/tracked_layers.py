"""Which linear layers influence tracks, and how each one's a_t / g_t are captured.

K-FAC treats a linear map y = W a (+ b) as one block with Kronecker-factored curvature
H ~ A (x) G, A = E[a a^T] over layer inputs, G = E[g g^T] over output gradients g = dL/dy.
A *tracked block* is the unit that gets its own factors:

* every ``nn.Linear`` / GPT-2 ``Conv1D`` inside attention or MLP blocks (``lm_head`` and
  embeddings are excluded by default);
* attention Q, K, V form **one joint block**: they read the same input, so they share A,
  and G spans their concatenated outputs [g_q; g_k; g_v]. GPT-2's fused ``c_attn`` already
  is such a block (one Conv1D with output 3*d); Llama's separate ``q_proj/k_proj/v_proj``
  are grouped here.

A block's weight is seen as one (out x in_aug) matrix W_block = [W | b], where in_aug =
in + 1 when the layer has a bias (the input gets a homogeneous 1 appended). GPT-2's Conv1D
stores its weight as (in, out) and computes y = x W + b; we transpose it so every block is
out x in.

Capturing: a forward hook stores the block input a (B, T, in) and registers a tensor hook on
each member's output, which stores g (B, T, out_member) during backward. Consumers
(factor fitting, query, scoring, projection) read ``block.a`` / ``block.g`` after backward.
Hooks are removed by :func:`capture` on exit, because torch.func transforms and hooks do
not mix.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from selector.config_base import StrictModel
from selector.errors import StageError

try:  # transformers' GPT-2 style linear layer: weight (in, out), y = x W + b
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


class TrackedLayersConfig(StrictModel):
    """Which linear layers get K-FAC blocks.

    ``include``/``exclude`` are regular expressions matched (``re.search``) against the
    module's dotted name. ``joint_groups`` lists sibling leaf names that share an input and
    become one block (default: attention Q/K/V in Llama/BERT naming).
    """

    include: list[str] = [r"(^|\.)(self_attn|attn|attention|mlp|feed_forward|ffn)\."]
    exclude: list[str] = [r"(^|\.)lm_head$", r"embed", r"(^|\.)wte$", r"(^|\.)wpe$"]
    joint_groups: list[list[str]] = [["q_proj", "k_proj", "v_proj"], ["query", "key", "value"]]
    include_bias: bool = True


def _is_trackable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: (in, out)
    return int(w.shape[0]), int(w.shape[1])


@dataclass(eq=False)
class TrackedBlock:
    """One K-FAC block: one linear layer, or a joint group (e.g. Q/K/V) sharing its input."""

    name: str
    module_names: list[str]
    modules: list[nn.Module]
    in_features: int
    out_splits: list[int]
    has_bias: bool
    kind: str  # "linear" or "conv1d"
    a: torch.Tensor | None = field(default=None, repr=False)
    g_parts: list[torch.Tensor | None] = field(default_factory=list, repr=False)

    @property
    def out_features(self) -> int:
        return sum(self.out_splits)

    @property
    def in_aug(self) -> int:
        """Input size including the homogeneous 1 for the bias."""
        return self.in_features + (1 if self.has_bias else 0)

    @property
    def g(self) -> torch.Tensor:
        if any(p is None for p in self.g_parts):
            raise StageError(f"block {self.name}: output gradient not captured (did backward run?)")
        return self.g_parts[0] if len(self.g_parts) == 1 else torch.cat(self.g_parts, dim=-1)  # type: ignore[arg-type]

    def a_aug(self) -> torch.Tensor:
        """The captured input with a trailing 1 when the block has a bias: (B, T, in_aug)."""
        if self.a is None:
            raise StageError(f"block {self.name}: input not captured (did forward run?)")
        if not self.has_bias:
            return self.a
        ones = torch.ones(*self.a.shape[:-1], 1, dtype=self.a.dtype, device=self.a.device)
        return torch.cat([self.a, ones], dim=-1)

    def weight_matrix(self) -> torch.Tensor:
        """The block's parameters as one (out x in_aug) matrix [W | b] (a detached copy)."""
        rows = []
        for m in self.modules:
            w = m.weight.detach()
            w = w if isinstance(m, nn.Linear) else w.t()
            if self.has_bias:
                w = torch.cat([w, m.bias.detach().unsqueeze(1)], dim=1)
            rows.append(w)
        return torch.cat(rows, dim=0)

    def grad_matrix(self) -> torch.Tensor:
        """The accumulated ``.grad`` of the block's parameters as (out x in_aug)."""
        rows = []
        for m in self.modules:
            w = m.weight.grad
            w = w if isinstance(m, nn.Linear) else w.t()
            if self.has_bias:
                w = torch.cat([w, m.bias.grad.unsqueeze(1)], dim=1)
            rows.append(w)
        return torch.cat(rows, dim=0)

    @torch.no_grad()
    def add_to_weights(self, delta: torch.Tensor) -> None:
        """theta <- theta + delta for an (out x in_aug) update (used by the step test)."""
        start = 0
        for m, n_out in zip(self.modules, self.out_splits):
            d = delta[start:start + n_out]
            start += n_out
            dw = d[:, : self.in_features]
            m.weight.add_(dw.to(m.weight.dtype) if isinstance(m, nn.Linear) else dw.t().to(m.weight.dtype))
            if self.has_bias:
                m.bias.add_(d[:, self.in_features].to(m.bias.dtype))

    def clear(self) -> None:
        self.a = None
        self.g_parts = [None] * len(self.modules)


def discover_blocks(model: nn.Module, config: TrackedLayersConfig | None = None) -> list[TrackedBlock]:
    """Find the tracked blocks of ``model`` in module order. Raises if there are none."""
    config = config or TrackedLayersConfig()
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not _is_trackable(module):
            continue
        if include and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        chosen.append((name, module))
    if not chosen:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if _is_trackable(m)})
        raise StageError(
            f"model {type(model).__name__} has no trackable layers: influence needs nn.Linear or "
            f"Conv1D layers whose names match influence.layers.include={config.include} and not "
            f"exclude={config.exclude} (linear-like layers present: {kinds or 'none'})")

    by_name = dict(chosen)
    grouped: set[str] = set()
    blocks: list[TrackedBlock] = []
    for name, module in chosen:
        if name in grouped:
            continue
        parent, _, leaf = name.rpartition(".")
        members = [(name, module)]
        for group in config.joint_groups:
            if leaf in group:
                sibs = [f"{parent}.{g}" if parent else g for g in group]
                if all(s in by_name for s in sibs):
                    members = [(s, by_name[s]) for s in sibs]
                break
        ins = {_in_out(m)[0] for _, m in members}
        biases = {getattr(m, "bias", None) is not None for _, m in members}
        if len(ins) != 1 or len(biases) != 1:  # not a shared-input group after all
            members = [(name, module)]
        for n, _ in members:
            grouped.add(n)
        mods = [m for _, m in members]
        has_bias = config.include_bias and getattr(mods[0], "bias", None) is not None
        block_name = members[0][0] if len(members) == 1 else f"{parent}.[{'+'.join(n.rpartition('.')[2] for n, _ in members)}]"
        blocks.append(TrackedBlock(
            name=block_name, module_names=[n for n, _ in members], modules=mods,
            in_features=_in_out(mods[0])[0], out_splits=[_in_out(m)[1] for m in mods], has_bias=has_bias,
            kind="linear" if isinstance(mods[0], nn.Linear) else "conv1d",
            g_parts=[None] * len(mods)))
    return blocks


def report(blocks: list[TrackedBlock]) -> list[dict]:
    """What is tracked, for logs and the manifest: name, members, shape, parameter count."""
    return [{"block": b.name, "modules": list(b.module_names), "kind": b.kind,
             "in": b.in_aug, "out": b.out_features, "bias": b.has_bias,
             "params": b.in_aug * b.out_features} for b in blocks]


@contextmanager
def capture(blocks: list[TrackedBlock], grads: bool = True) -> Iterator[list[TrackedBlock]]:
    """Install hooks that store each block's input a and (if ``grads``) output gradients g.

    The input is taken from the first member (all members of a joint block read the same
    tensor). Captured tensors are detached; every hook is removed on exit.
    """
    handles = []

    def make_fwd(block: TrackedBlock, idx: int):
        def hook(module, inputs, output):
            if idx == 0:
                block.a = inputs[0].detach()
            if grads and output.requires_grad:
                def store(grad, block=block, idx=idx):
                    block.g_parts[idx] = grad.detach()
                output.register_hook(store)
        return hook

    try:
        for b in blocks:
            b.clear()
            for i, m in enumerate(b.modules):
                handles.append(m.register_forward_hook(make_fwd(b, i)))
        yield blocks
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            b.clear()
