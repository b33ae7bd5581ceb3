import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from _influence_helpers import build_micro, explicit_chunk_grads, load
from selector.errors import StageError
from selector.gradients.influence import InfluenceConfig, InfluenceQuery, compute_query, reference_gradient, score_documents
from selector.gradients.kfac import KFACConfig, fit_kfac
from selector.models.lm_chunks import chunk_losses, tokenize_chunks, batches, pad_id_of
from selector.gradients.tracked_layers import TrackedLayersConfig, discover_blocks

CHUNK = 32
LR_6E = 1e-5
# the exact-GGN test tracks the MLP blocks of a 1-layer, hidden-8 model (P = 192) to stay fast;
# bench/influence_validity.py runs it over every block (P = 448) and more documents
EXACT_LAYERS = [r"\.mlp\."]


@pytest.fixture(scope="module")
def texts(real_texts):
    return [t[:500] for t in real_texts[:40]]


_CACHE: dict = {}


def _setup(path, texts, dtype=torch.float32, ekfac=False):
    """Model, blocks, config, factors and query; cached per module (tests restore any weight change)."""
    key = (str(path), dtype, ekfac)
    if key not in _CACHE:
        _CACHE[key] = _build(path, texts, dtype, ekfac)
    return _CACHE[key]


def _build(path, texts, dtype, ekfac):
    model, tok = load(path, dtype)
    blocks = discover_blocks(model)
    cfg = InfluenceConfig(chunk_tokens=CHUNK, max_chunks_per_doc=3, kfac=KFACConfig(ekfac=ekfac))
    factors = fit_kfac(model, tok, texts[:8], blocks, cfg.kfac, chunk_tokens=CHUNK, max_chunks_per_doc=3)
    query = compute_query(model, tok, texts[8:12], factors, blocks, cfg)
    return model, tok, blocks, cfg, factors, query


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hook_influence_equals_explicit_per_sample_gradients(arch, tiny_llama_dir, tiny_gpt2_dir, texts):
    """6(b): sum_t g_t^T M a_t from hooks == <per-chunk gradient (torch.func), M>, doc = mean of chunks."""
    path = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    model, tok, blocks, cfg, factors, query = _setup(path, texts)
    docs = texts[12:18]
    got = score_documents(model, tok, docs, query, blocks, cfg, normalise=True)
    assert got.n_chunks.max() > 1  # chunking is exercised
    grads, doc_of = explicit_chunk_grads(model, tok, docs, blocks, CHUNK, max_chunks_per_doc=3)
    chunk_score = np.array([sum(float((g[k] * query.precond[k]).sum()) for k in g) for g in grads])
    chunk_norm = np.array([sum(float((g[k] ** 2).sum()) for k in g) ** 0.5 for g in grads])
    doc_of = np.array(doc_of)
    want = np.array([chunk_score[doc_of == d].mean() for d in range(len(docs))])
    want_cos = np.array([(chunk_score[doc_of == d] / chunk_norm[doc_of == d]).mean() for d in range(len(docs))])
    want_cos /= query.precond_norm
    np.testing.assert_allclose(got.score, want, rtol=1e-4)
    np.testing.assert_allclose(got.cosine, want_cos, rtol=1e-4)
    assert np.all(np.abs(got.cosine) <= 1.0)


def test_query_is_mean_reference_gradient(tiny_gpt2_dir, texts):
    """V from hooks equals autograd's .grad of the mean reference-chunk loss."""
    model, tok = load(tiny_gpt2_dir)
    blocks = discover_blocks(model)
    V, n_chunks, _ = reference_gradient(model, tok, texts[:4], blocks, chunk_tokens=CHUNK, max_chunks_per_doc=2)
    model.zero_grad()
    chunks = tokenize_chunks(tok, texts[:4], CHUNK, 2)
    assert n_chunks == len(chunks)
    for batch in batches(chunks, 3, pad_id_of(tok)):
        (chunk_losses(model, batch).sum() / len(chunks)).backward()
    for b in blocks:
        torch.testing.assert_close(V[b.name].float(), b.grad_matrix(), rtol=1e-4, atol=1e-7)


def test_query_is_preconditioned_and_roundtrips(tmp_path, tiny_llama_dir, texts):
    model, tok, blocks, cfg, factors, query = _setup(tiny_llama_dir, texts)
    for b in blocks:
        torch.testing.assert_close(query.precond[b.name], factors.precondition(b.name, query.grad[b.name]))
    query.save(str(tmp_path / "q.safetensors"))
    q2 = InfluenceQuery.load(str(tmp_path / "q.safetensors"))
    assert q2.blocks == query.blocks and q2.n_chunks == query.n_chunks
    a = score_documents(model, tok, texts[20:24], query, blocks, cfg).score
    b = score_documents(model, tok, texts[20:24], q2, blocks, cfg).score
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_scores_do_not_depend_on_batching_and_empty_docs_score_zero(tiny_llama_dir, texts):
    model, tok, blocks, cfg, factors, query = _setup(tiny_llama_dir, texts)
    docs = texts[20:26] + ["x"]
    s1 = score_documents(model, tok, docs, query, blocks, cfg.model_copy(update={"batch_size": 1})).score
    s8 = score_documents(model, tok, docs, query, blocks, cfg.model_copy(update={"batch_size": 8})).score
    np.testing.assert_allclose(s8, s1, rtol=1e-4, atol=1e-6)
    assert s8[-1] == 0.0  # one token: no predicted token, zero gradient


def test_preconditioned_step_changes_reference_loss_as_predicted(tiny_llama_dir, texts):
    """6(e): theta <- theta - lr H^-1 grad L(z) changes L_ref by about -lr * score(z)."""
    model, tok, blocks, cfg, factors, query = _setup(tiny_llama_dir, texts, dtype=torch.float64)
    ref = texts[8:12]
    ref_chunks = tokenize_chunks(tok, ref, CHUNK, 3)

    def ref_loss():
        with torch.no_grad():
            return sum(float(chunk_losses(model, b).sum()) for b in batches(ref_chunks, 16, pad_id_of(tok))) / len(ref_chunks)

    docs = texts[14:28]
    pred = -score_documents(model, tok, docs, query, blocks, cfg).score
    base = ref_loss()
    lr = LR_6E
    actual = []
    for d in range(len(docs)):
        # the document's gradient (mean over its chunks; pinned against torch.func by 6(b))
        gz, _, _ = reference_gradient(model, tok, [docs[d]], blocks, chunk_tokens=CHUNK, max_chunks_per_doc=3)
        steps = {b.name: -lr * factors.precondition(b.name, gz[b.name]) for b in blocks}
        for b in blocks:
            b.add_to_weights(steps[b.name])
        actual.append(ref_loss() - base)
        for b in blocks:
            b.add_to_weights(-steps[b.name])
    actual = np.array(actual) / lr
    r = pearsonr(pred, actual)[0]
    print(f"6e pearson(predicted, actual reference-loss change) = {r:.4f} over {len(docs)} docs, lr={lr}")
    assert r > 0.99, r
    np.testing.assert_allclose(actual, pred, rtol=0.05, atol=0.05 * np.abs(pred).max())


def test_kfac_influence_ranks_like_exact_gauss_newton_influence(tiny_tokenizer_dir, real_texts):
    """6(d): on a model small enough for the exact GGN, K-FAC influence ranks documents alike."""
    from torch.func import functional_call, jvp, vjp, vmap

    model, tok = build_micro(tiny_tokenizer_dir, "llama", hidden=8, attn="eager")
    model = model.double()
    blocks = discover_blocks(model, TrackedLayersConfig(include=EXACT_LAYERS))
    texts = [t[:300] for t in real_texts[:40]]
    chunk = 24
    cfg = InfluenceConfig(chunk_tokens=chunk, max_chunks_per_doc=2, kfac=KFACConfig(damping=0.1))
    factors = fit_kfac(model, tok, texts[:6], blocks, cfg.kfac, chunk_tokens=chunk, max_chunks_per_doc=1)
    query = compute_query(model, tok, texts[10:14], factors, blocks, cfg)
    docs = texts[14:40]
    kfac_scores = score_documents(model, tok, docs, query, blocks, cfg).score

    # exact GGN of the mean token loss over the same fitting tokens: sum_t J_t^T (diag p - p p^T) J_t / N
    names = [n for b in blocks for n in b.module_names]
    pnames = [f"{n}.weight" for n in names]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in pnames]
    sizes = [s.numel() for s in shapes]
    P = sum(sizes)
    fit_batch = next(batches(tokenize_chunks(tok, texts[:6], chunk, 1), 100, pad_id_of(tok)))

    def logits_of(flat):
        p = dict(params)
        for n, piece, s in zip(pnames, flat.split(sizes), shapes):
            p[n] = piece.reshape(s)
        out = functional_call(model, p, args=(), kwargs=dict(input_ids=fit_batch.input_ids,
                                                                attention_mask=fit_batch.attention_mask))
        return out.logits

    theta = torch.cat([params[n].detach().reshape(-1) for n in pnames])
    with torch.no_grad():
        probs = torch.softmax(logits_of(theta), -1)
    mask = fit_batch.attention_mask.bool().clone()
    mask[:, -1] = False
    mask &= torch.cat([fit_batch.attention_mask[:, 1:], torch.zeros_like(fit_batch.attention_mask[:, :1])], 1).bool()
    N = int(mask.sum())
    _, pull = vjp(logits_of, theta)

    def ggn_column(v):
        _, Jv = jvp(logits_of, (theta,), (v,))
        HJv = (probs * Jv - probs * (probs * Jv).sum(-1, keepdim=True)) * mask.unsqueeze(-1)
        return pull(HJv)[0] / N

    # all P Jacobian-vector products in a few vectorised passes
    GGN = vmap(ggn_column, chunk_size=64)(torch.eye(P, dtype=torch.float64)).detach()
    GGN = 0.5 * (GGN + GGN.T)

    def flat_block_grads(gdict):  # block matrices -> flat param order
        parts = []
        for b in blocks:
            start = 0
            for n, o in zip(b.module_names, b.out_splits):
                parts.append(gdict[b.name][start:start + o].reshape(-1))
                start += o
        return torch.cat(parts)

    v_ref = flat_block_grads(query.grad)
    damp = 0.1 * float(torch.trace(GGN)) / P  # same rule as K-FAC: 0.1 x mean eigenvalue
    ihvp = torch.linalg.solve(GGN + damp * torch.eye(P, dtype=torch.float64), v_ref)
    grads, doc_of = explicit_chunk_grads(model, tok, docs, blocks, chunk, max_chunks_per_doc=2)
    chunk_exact = np.array([float(flat_block_grads(g) @ ihvp) for g in grads])
    doc_of = np.array(doc_of)
    exact = np.array([chunk_exact[doc_of == d].mean() for d in range(len(docs))])
    rho = spearmanr(kfac_scores, exact)[0]
    print(f"6d spearman(K-FAC, exact GGN influence) = {rho:.3f} over {len(docs)} docs")
    assert rho > 0.5, rho


def test_reference_shorter_than_one_chunk_is_a_clear_error(tiny_llama_dir, texts):
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)
    with pytest.raises(StageError, match=r"reference set is too short.*chunk_tokens=1024"):
        reference_gradient(model, tok, ["A short reference."], blocks, chunk_tokens=1024)
    with pytest.raises(StageError, match="too short"):
        reference_gradient(model, tok, [], blocks, chunk_tokens=64)


def test_query_from_other_blocks_is_rejected(tiny_llama_dir, texts):
    model, tok, blocks, cfg, factors, query = _setup(tiny_llama_dir, texts)
    from selector.gradients.tracked_layers import TrackedLayersConfig

    mlp_only = discover_blocks(model, TrackedLayersConfig(include=[r"\.mlp\."]))
    score_documents(model, tok, texts[:2], query, mlp_only, cfg)  # a subset is fine
    q = InfluenceQuery(query.blocks[:1], {k: query.grad[k] for k in query.blocks[:1]},
                       {k: query.precond[k] for k in query.blocks[:1]}, 1, 1)
    with pytest.raises(StageError, match="no entry for tracked block"):
        score_documents(model, tok, texts[:2], q, blocks, cfg)
