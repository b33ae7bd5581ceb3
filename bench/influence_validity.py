"""How right is the influence engine? Acceptance figures 6(c), 6(d), 6(e) at bench scale.

Reproduce:  python bench/influence_validity.py   (writes bench/results/influence_validity.md)

6(c) Spearman of Kronecker-projected vs exact influence, over projection sizes and seeds.
6(d) Spearman of K-FAC (and EK-FAC) influence vs influence with the exact Gauss-Newton matrix
     (every tracked block of a 1-layer hidden-8 Llama, P = 448 parameters, same damping rule).
6(e) Pearson of predicted (-lr * score) vs actual change of the reference loss after a
     preconditioned step theta <- theta - lr H^-1 grad L(z) on each document (float64).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _influence_helpers import build_micro, load  # noqa: E402
from selector.gradients.influence import InfluenceConfig, compute_query, reference_gradient, score_documents  # noqa: E402
from selector.gradients.kfac import KFACConfig, fit_kfac  # noqa: E402
from selector.models.lm_chunks import batches, chunk_losses, pad_id_of, tokenize_chunks  # noqa: E402
from selector.gradients.projection import KroneckerProjector, project_document_gradients  # noqa: E402
from selector.gradients.tracked_layers import discover_blocks  # noqa: E402


def texts_():
    from selector.demo.textsources import docstrings, pydoc_topics

    return [d.text[:500] for d in pydoc_topics()][:40] + [d.text[:500] for d, _ in zip(docstrings(), range(160))]


def sweep_6c(model, tok, texts, lines):
    blocks = discover_blocks(model)
    cfg = InfluenceConfig(chunk_tokens=32, max_chunks_per_doc=2)
    f = fit_kfac(model, tok, texts[:16], blocks, cfg.kfac, chunk_tokens=32, max_chunks_per_doc=2)
    q = compute_query(model, tok, texts[16:24], f, blocks, cfg)
    docs = texts[24:124]
    exact = score_documents(model, tok, docs, q, blocks, cfg).score
    lines += ["## 6(c) projected vs exact influence (tiny Llama h64 l2, 100 docs)", "",
              "Plain: the same random maps on gradients and queries. Balanced (default when factors are given): "
              "maps rotated into the K-FAC eigenbasis and rescaled by (l + 0.1 mean l)^(-1/2) on the gradient side, "
              "^(+1/2) on the query side; still unbiased (selector/gradients/projection.py).", "",
              "| k_a x k_g per block | total dim | maps | Spearman mean | min | max (5 seeds) |",
              "|---|---:|---|---:|---:|---:|"]
    for k in (8, 16, 32, 48, 64):
        for balanced in (False, True):
            rhos = []
            for seed in range(5):
                p = KroneckerProjector(blocks, k, k, seed=seed, factors=f if balanced else None)
                feats = project_document_gradients(model, tok, docs, p, blocks, chunk_tokens=32, max_chunks_per_doc=2)
                rhos.append(spearmanr(feats.astype(np.float64) @ p.project_queries(q.precond).numpy(), exact)[0])
            default = " (default)" if k == 64 and balanced else ""
            lines.append(f"| {k} x {k}{default} | {p.dim} | {'balanced' if balanced else 'plain'} | "
                         f"{np.mean(rhos):.3f} | {min(rhos):.3f} | {max(rhos):.3f} |")
            print(lines[-1], flush=True)


def exact_6d(tok_dir, texts, lines):
    from torch.func import functional_call, jvp, vjp, vmap

    from _influence_helpers import explicit_chunk_grads

    model, tok = build_micro(tok_dir, "llama", hidden=8, attn="eager")
    model = model.double()
    blocks = discover_blocks(model)
    chunk = 24
    fit_texts, ref, docs = texts[:10], texts[10:14], texts[14:74]
    fit_batch = next(batches(tokenize_chunks(tok, fit_texts, chunk, 2), 1000, pad_id_of(tok)))
    pnames = [f"{n}.weight" for b in blocks for n in b.module_names]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in pnames]
    sizes = [s.numel() for s in shapes]
    P = sum(sizes)

    def logits_of(flat):
        p = dict(params)
        for n, piece, s in zip(pnames, flat.split(sizes), shapes):
            p[n] = piece.reshape(s)
        return functional_call(model, p, args=(), kwargs=dict(input_ids=fit_batch.input_ids,
                                                              attention_mask=fit_batch.attention_mask)).logits

    theta = torch.cat([params[n].detach().reshape(-1) for n in pnames])
    with torch.no_grad():
        probs = torch.softmax(logits_of(theta), -1)
    am = fit_batch.attention_mask
    mask = (am.bool() & torch.cat([am[:, 1:], torch.zeros_like(am[:, :1])], 1).bool())
    N = int(mask.sum())
    _, pull = vjp(logits_of, theta)

    def col(v):
        _, Jv = jvp(logits_of, (theta,), (v,))
        return pull((probs * Jv - probs * (probs * Jv).sum(-1, keepdim=True)) * mask.unsqueeze(-1))[0] / N

    GGN = vmap(col, chunk_size=32)(torch.eye(P, dtype=torch.float64)).detach()
    GGN = 0.5 * (GGN + GGN.T)

    def flat(g):
        parts = []
        for b in blocks:
            s = 0
            for o in b.out_splits:
                parts.append(g[b.name][s:s + o].reshape(-1))
                s += o
        return torch.cat(parts)

    grads, doc_of = explicit_chunk_grads(model, tok, docs, blocks, chunk, max_chunks_per_doc=2)
    doc_of = np.array(doc_of)
    lines += ["", f"## 6(d) K-FAC vs exact Gauss-Newton influence (1-layer h8 Llama, all blocks, P = {P}, "
              f"{N} fitting tokens, {len(docs)} docs)", "",
              "| curvature | Spearman vs exact GGN | Pearson |", "|---|---:|---:|"]
    for ekfac in (False, True):
        cfg = InfluenceConfig(chunk_tokens=chunk, max_chunks_per_doc=2, kfac=KFACConfig(fisher="true", ekfac=ekfac))
        f = fit_kfac(model, tok, fit_texts, blocks, cfg.kfac, chunk_tokens=chunk, max_chunks_per_doc=2)
        q = compute_query(model, tok, ref, f, blocks, cfg)
        ours = score_documents(model, tok, docs, q, blocks, cfg).score
        ihvp = torch.linalg.solve(GGN + 0.1 * float(torch.trace(GGN)) / P * torch.eye(P, dtype=torch.float64),
                                  flat(q.grad))
        ce = np.array([float(flat(g) @ ihvp) for g in grads])
        exact = np.array([ce[doc_of == d].mean() for d in range(len(docs))])
        lines.append(f"| {'EK-FAC' if ekfac else 'K-FAC'} | {spearmanr(ours, exact)[0]:.3f} | {pearsonr(ours, exact)[0]:.3f} |")
        print(lines[-1], flush=True)
    # identity curvature as a floor: how much of the ranking is curvature-independent
    plain = np.array([float(flat(g) @ flat(q.grad)) for g in grads])
    plain = np.array([plain[doc_of == d].mean() for d in range(len(docs))])
    lines.append(f"| none (plain gradient dot product) | {spearmanr(plain, exact)[0]:.3f} | {pearsonr(plain, exact)[0]:.3f} |")


def step_6e(path, texts, lines):
    model, tok = load(path, torch.float64)
    blocks = discover_blocks(model)
    lines += ["", "## 6(e) predicted vs actual reference-loss change after a preconditioned step "
              "(tiny Llama h64 l2, float64, 60 docs)", "",
              "| curvature | lr | Pearson(pred, actual) | median abs rel. error |", "|---|---:|---:|---:|"]
    ref, docs = texts[16:20], texts[40:100]
    ref_chunks = tokenize_chunks(tok, ref, 32, 3)

    def ref_loss():
        with torch.no_grad():
            return sum(float(chunk_losses(model, b).sum()) for b in batches(ref_chunks, 64, pad_id_of(tok))) / len(ref_chunks)

    for ekfac in (False, True):
        cfg = InfluenceConfig(chunk_tokens=32, max_chunks_per_doc=3, kfac=KFACConfig(ekfac=ekfac))
        f = fit_kfac(model, tok, texts[:16], blocks, cfg.kfac, chunk_tokens=32, max_chunks_per_doc=3)
        q = compute_query(model, tok, ref, f, blocks, cfg)
        pred = -score_documents(model, tok, docs, q, blocks, cfg).score
        for lr in (1e-5, 1e-3):
            base, actual = ref_loss(), []
            for d in docs:
                gz, _, _ = reference_gradient(model, tok, [d], blocks, chunk_tokens=32, max_chunks_per_doc=3)
                steps = {b.name: -lr * f.precondition(b.name, gz[b.name]) for b in blocks}
                for b in blocks:
                    b.add_to_weights(steps[b.name])
                actual.append((ref_loss() - base) / lr)
                for b in blocks:
                    b.add_to_weights(-steps[b.name])
            actual = np.array(actual)
            rel = np.median(np.abs(actual - pred) / np.abs(pred))
            lines.append(f"| {'EK-FAC' if ekfac else 'K-FAC'} | {lr:g} | {pearsonr(pred, actual)[0]:.5f} | {rel:.2e} |")
            print(lines[-1], flush=True)


def main():
    from selector.demo.proxy_models import build_causal_lm, train_bpe_tokenizer

    torch.manual_seed(0)
    texts = texts_()
    lines = ["# Influence validity (acceptance 6c, 6d, 6e)", "", "Command: `python bench/influence_validity.py`  ",
             f"CPU, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_bpe_tokenizer(texts, tmp / "tok", vocab_size=512)
        build_causal_lm(tmp / "tok", tmp / "llama", arch="llama", seed=0)
        model, tok = load(tmp / "llama")
        sweep_6c(model, tok, texts, lines)
        exact_6d(tmp / "tok", texts, lines)
        step_6e(tmp / "llama", texts, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / "influence_validity.md").write_text(text)


if __name__ == "__main__":
    main()
