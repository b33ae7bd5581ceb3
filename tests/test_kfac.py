import numpy as np
import pytest
import torch

from _influence_helpers import build_micro, load
from selector.errors import StageError
from selector.gradients.kfac import (KFACConfig, KFACFactors, accumulate_ekfac, accumulate_factors, fit_kfac)
from selector.gradients.tracked_layers import discover_blocks

CHUNK = 48


@pytest.fixture(scope="module")
def fit_texts(real_texts):
    # short real texts (a few chunks each) keep the suite fast on a shared 2-core machine
    return [t[:600] for t in real_texts[:12]]


def rel_close(x, y, tol=1e-5):
    err = float(torch.linalg.norm(x.double() - y.double()) / torch.linalg.norm(y.double()))
    assert err < tol, err


def dense_inverse_apply(H: np.ndarray, damping: float, V: np.ndarray) -> np.ndarray:
    """Solve (H + damping I) vec(X) = vec(V) with column-major vec, return X."""
    out, inn = V.shape
    x = np.linalg.solve(H + damping * np.eye(H.shape[0]), V.reshape(-1, order="F"))
    return x.reshape(out, inn, order="F")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("ekfac", [False, True])
def test_inverse_hvp_equals_dense_solve(tiny_tokenizer_dir, fit_texts, arch, ekfac):
    """6(a): H_l^-1 V from the eigenbasis equals a dense solve of (A (x) G + damping I)."""
    model, tok = build_micro(tiny_tokenizer_dir, arch)
    blocks = discover_blocks(model)
    factors = fit_kfac(model, tok, fit_texts[:6], blocks, KFACConfig(ekfac=ekfac), chunk_tokens=CHUNK)
    rng = np.random.default_rng(0)
    for b in blocks:
        A, G = factors.A[b.name].numpy(), factors.G[b.name].numpy()
        if ekfac:
            K = np.kron(factors.QA[b.name].numpy(), factors.QG[b.name].numpy())
            lam = factors.ekfac[b.name].numpy().reshape(-1, order="F")
            H = (K * lam) @ K.T
        else:
            H = np.kron(A, G)  # (A (x) G) vec(V) = vec(G V A) for column-major vec
        V = rng.standard_normal((b.out_features, b.in_aug))
        want = dense_inverse_apply(H, factors.damping_for(b.name), V)
        got = factors.precondition(b.name, torch.from_numpy(V)).numpy()
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-5, (b.name, rel)


def test_default_damping_is_tenth_of_mean_eigenvalue_product(tiny_llama_dir, fit_texts):
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)[:2]
    f = fit_kfac(model, tok, fit_texts[:4], blocks, chunk_tokens=CHUNK)
    for b in blocks:
        lam = torch.outer(f.lG[b.name], f.lA[b.name])
        assert f.damping_for(b.name) == pytest.approx(0.1 * float(lam.mean()), rel=1e-12)
        assert f.QA[b.name].dtype == torch.float64
    absolute = KFACFactors.from_sums(accumulate_factors(model, tok, fit_texts[:4], blocks, chunk_tokens=CHUNK),
                                     damping=0.5, damping_mode="absolute")
    assert absolute.damping_for(blocks[0].name) == 0.5


def test_padding_is_excluded(tiny_gpt2_dir, fit_texts):
    """Batched (padded) accumulation equals one-chunk-at-a-time accumulation."""
    model, tok = load(tiny_gpt2_dir)
    blocks = discover_blocks(model)
    kw = dict(chunk_tokens=CHUNK, fisher="empirical", max_chunks_per_doc=2)
    padded = accumulate_factors(model, tok, fit_texts[:6], blocks, batch_size=6, **kw)
    single = accumulate_factors(model, tok, fit_texts[:6], blocks, batch_size=1, **kw)
    assert padded.n_tokens == single.n_tokens
    lens = [min(len(tok(t)["input_ids"]), 2 * CHUNK) for t in fit_texts[:6]]
    assert padded.n_tokens <= sum(lens) and padded.A[blocks[0].name].dtype == torch.float32
    for k in padded.A:
        rel_close(padded.A[k], single.A[k])
        rel_close(padded.G[k], single.G[k])


def test_partial_factors_merge_to_the_whole(tiny_llama_dir, fit_texts):
    """Worker partial sums add up to the single-process sums (what the Ray reduce relies on)."""
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)
    kw = dict(chunk_tokens=CHUNK, fisher="empirical", max_chunks_per_doc=1, batch_size=1)
    whole = accumulate_factors(model, tok, fit_texts[:6], blocks, **kw)
    a = accumulate_factors(model, tok, fit_texts[:3], blocks, **kw)
    b = accumulate_factors(model, tok, fit_texts[3:6], blocks, **kw)
    merged = a.merge(type(a).from_numpy(b.to_numpy()))
    assert merged.n_tokens == whole.n_tokens
    for k in whole.A:
        rel_close(merged.A[k], whole.A[k])
        rel_close(merged.G[k], whole.G[k])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_load_roundtrip_safetensors(tmp_path, tiny_tokenizer_dir, fit_texts, where):
    model, tok = build_micro(tiny_tokenizer_dir, "gpt2")
    blocks = discover_blocks(model)
    f = fit_kfac(model, tok, fit_texts[:4], blocks, KFACConfig(ekfac=True, damping=0.05), chunk_tokens=CHUNK)
    uri = str(tmp_path / "state" / "kfac.safetensors") if where == "local" else "memory://thresher/kfac.safetensors"
    f.save(uri)
    if where == "local":
        assert (tmp_path / "state" / "kfac.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not pickle
    g = KFACFactors.load(uri)
    assert g.blocks == f.blocks and g.n_tokens == f.n_tokens and g.damping == 0.05
    V = torch.randn(blocks[0].out_features, blocks[0].in_aug, dtype=torch.float64)
    torch.testing.assert_close(g.precondition(blocks[0].name, V), f.precondition(blocks[0].name, V))
    assert set(g.ekfac) == set(f.ekfac)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(StageError, match="not found"):
        KFACFactors.load(str(tmp_path / "nope.safetensors"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StageError, match="not a Thresher K-FAC factor file"):
        KFACFactors.load(str(tmp_path / "other.safetensors"))


def test_singular_factors_without_damping_are_a_clear_error(tiny_llama_dir):
    """Three tokens cannot span a 64-dim input space: A is singular, so damping 0 must fail."""
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)[:1]
    sums = accumulate_factors(model, tok, ["def f(x):"], blocks, chunk_tokens=CHUNK)
    assert sums.n_tokens < 64
    with pytest.raises(StageError, match=r"singular.*damping > 0"):
        KFACFactors.from_sums(sums, damping=0.0, damping_mode="absolute")
    with pytest.raises(StageError, match="singular"):
        KFACFactors.from_sums(sums, damping=0.0)
    KFACFactors.from_sums(sums)  # default damping makes it invertible


def test_ekfac_eigenvalues_are_second_moments_in_the_kfac_basis(tiny_tokenizer_dir, fit_texts):
    """EK-FAC: Lambda_ij = E_t[((Q_G^T g_t)_i (Q_A^T a_t)_j)^2]; its sum is E_t ||g_t||^2 ||a_t||^2."""
    model, tok = build_micro(tiny_tokenizer_dir, "llama")
    blocks = discover_blocks(model)
    kw = dict(chunk_tokens=CHUNK, fisher="empirical")
    f = KFACFactors.from_sums(accumulate_factors(model, tok, fit_texts[:4], blocks, **kw))
    e = accumulate_ekfac(model, tok, fit_texts[:4], blocks, f, **kw)
    from selector.models.lm_chunks import activation_grads_only, batches, chunk_losses, pad_id_of, tokenize_chunks
    from selector.gradients.tracked_layers import capture

    want = {b.name: 0.0 for b in blocks}
    with activation_grads_only(model), capture(blocks):
        for batch in batches(tokenize_chunks(tok, fit_texts[:4], CHUNK), 8, pad_id_of(tok)):
            chunk_losses(model, batch, reduce="sum").sum().backward()
            m = batch.token_mask.bool()
            for b in blocks:
                want[b.name] += float(((b.g[m] ** 2).sum(-1) * (b.a_aug()[m] ** 2).sum(-1)).sum())
    for b in blocks:
        assert float(e.S[b.name].sum()) == pytest.approx(want[b.name], rel=1e-4)
