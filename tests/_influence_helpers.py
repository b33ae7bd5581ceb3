"""Naive reference computations for the influence tests (explicit gradients, no hooks)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad

from selector.models.lm_chunks import Batch, chunk_losses, tokenize_chunks


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def build_micro(tokenizer_dir, arch: str, hidden: int = 16, seed: int = 0, attn: str = "sdpa"):
    """A 1-layer model much smaller than the fixtures (dense Kronecker solves stay small)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=hidden, n_layer=1, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
        model = GPT2LMHeadModel(cfg)
    if attn != "sdpa":  # forward-mode AD (exact GGN) needs eager attention on CPU
        model.set_attn_implementation(attn)
    return model.eval(), tok


def block_matrix_from_param_grads(block, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Assemble the (out x in_aug) block gradient [W | b] from per-parameter gradients."""
    rows = []
    for name, m in zip(block.module_names, block.modules):
        w = grads[f"{name}.weight"]
        w = w if isinstance(m, nn.Linear) else w.t()
        if block.has_bias:
            w = torch.cat([w, grads[f"{name}.bias"].unsqueeze(1)], dim=1)
        rows.append(w)
    return torch.cat(rows, dim=0)


def tracked_param_names(blocks) -> list[str]:
    names = []
    for b in blocks:
        for n in b.module_names:
            names.append(f"{n}.weight")
            if b.has_bias:
                names.append(f"{n}.bias")
    return names


def explicit_chunk_grads(model, tokenizer, texts, blocks, chunk_tokens, max_chunks_per_doc=None):
    """Per-chunk gradients via torch.func.grad, each chunk run alone (no padding at all).

    Returns (list of {block: (out x in_aug)}, list of doc index per chunk)."""
    chunks = tokenize_chunks(tokenizer, texts, chunk_tokens, max_chunks_per_doc)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = tracked_param_names(blocks)

    def loss_fn(tracked, ids):
        p = dict(params)
        p.update(tracked)
        batch = Batch([0], ids, torch.ones_like(ids))

        class _Wrap:  # functional_call as a model for chunk_losses
            def __call__(self, **kw):
                return functional_call(model, p, args=(), kwargs=kw)

        return chunk_losses(_Wrap(), batch).sum()

    g = grad(loss_fn)
    out = []
    for c in chunks:
        ids = torch.tensor([c.ids])
        gr = g({n: params[n] for n in names}, ids)
        out.append({b.name: block_matrix_from_param_grads(b, gr).double() for b in blocks})
    return out, [c.doc for c in chunks]
