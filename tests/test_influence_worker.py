import numpy as np
import pytest

from selector.gradients.influence import InfluenceConfig, compute_query, score_documents
from selector.gradients.kfac import KFACConfig, KFACFactors, fit_kfac
from selector.gradients.tracked_layers import discover_blocks
from _influence_helpers import load

CHUNK = 32


@pytest.fixture(scope="module")
def texts(real_texts):
    return [t[:400] for t in real_texts[:30]]


@pytest.mark.parametrize("ekfac", [False, True])
def test_parallel_fit_and_scoring_match_single_process(ray_local, tmp_path, tiny_llama_dir, texts, ekfac):
    """7: factors fitted by two workers and reduced on the driver equal a one-process fit, and
    workers holding model + factors + query score documents by id exactly like the library."""
    from workers.influence import fit_factors_parallel, make_workers, score_parallel

    cfg = InfluenceConfig(chunk_tokens=CHUNK, max_chunks_per_doc=2, batch_size=4,
                          kfac=KFACConfig(fisher="empirical", ekfac=ekfac))
    workers = make_workers(2, str(tiny_llama_dir), cfg, num_cpus=0.5)
    rep = ray_local.get(workers[0].tracked_layers.remote())
    assert rep[0]["modules"][0].endswith("q_proj") and len(rep) == 10

    fit, ref, docs = texts[:6], texts[6:10], texts[10:30]
    factors_uri = str(tmp_path / "state" / "kfac.safetensors")
    query_uri = str(tmp_path / "state" / "query.safetensors")
    par = fit_factors_parallel(workers, fit, cfg, factors_uri=factors_uri)
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)
    single = fit_kfac(model, tok, fit, blocks, cfg.kfac, chunk_tokens=CHUNK, batch_size=4, max_chunks_per_doc=2)
    assert par.n_tokens == single.n_tokens
    for k in single.blocks:
        for x, y in ((par.A[k], single.A[k]), (par.G[k], single.G[k])):
            assert float((x - y).norm() / y.norm()) < 1e-5
    assert bool(KFACFactors.load(factors_uri).ekfac) == ekfac

    ray_local.get([w.load_state.remote(factors_uri) for w in workers])
    info = ray_local.get(workers[0].compute_query.remote(ref, query_uri))
    assert info["n_chunks"] > 0
    ray_local.get(workers[1].load_state.remote(factors_uri, query_uri))
    ids = [f"doc-{i}" for i in range(len(docs))]
    got = score_parallel(workers, ids, docs, batch_docs=7)
    want = score_documents(model, tok, docs, compute_query(model, tok, ref, single, blocks, cfg), blocks, cfg).score
    np.testing.assert_allclose(got, want, rtol=1e-3)
    one = ray_local.get(workers[1].score.remote(ids[:3], docs[:3]))
    assert one["doc_id"] == ids[:3] and len(one["score"]) == 3
    for w in workers:
        ray_local.kill(w)


def test_normalise_makes_the_cosine_variant_the_score_selectors_rank_by(ray_local, tmp_path, tiny_llama_dir, texts):
    """influence.normalise: true reaches the selectors: score_parallel returns the cosine variant
    (what score_documents computes with normalise), not the raw influence."""
    from workers.influence import fit_factors_parallel, make_workers, score_parallel

    cfg = InfluenceConfig(chunk_tokens=CHUNK, max_chunks_per_doc=2, batch_size=4, normalise=True)
    workers = make_workers(1, str(tiny_llama_dir), cfg, num_cpus=0.5)
    fit, ref, docs = texts[:6], texts[6:10], texts[10:18]
    factors_uri = str(tmp_path / "kfac.safetensors")
    query_uri = str(tmp_path / "query.safetensors")
    single = fit_factors_parallel(workers, fit, cfg, factors_uri=factors_uri)
    ray_local.get(workers[0].load_state.remote(factors_uri))
    ray_local.get(workers[0].compute_query.remote(ref, query_uri))
    ids = [f"doc-{i}" for i in range(len(docs))]
    got = score_parallel(workers, ids, docs, batch_docs=4)
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)
    want = score_documents(model, tok, docs, compute_query(model, tok, ref, single, blocks, cfg), blocks, cfg)
    np.testing.assert_allclose(got, want.cosine, rtol=1e-3)
    assert np.abs(got).max() <= 1.0 + 1e-6 and not np.allclose(got, want.score)
    ray_local.kill(workers[0])


def test_worker_reports_bad_model_path(ray_local, tmp_path):
    from workers.influence import InfluenceWorker

    w = InfluenceWorker.options(num_cpus=0.25).remote(str(tmp_path / "missing"), {})
    with pytest.raises(Exception, match="does not exist"):
        ray_local.get(w.tracked_layers.remote())
