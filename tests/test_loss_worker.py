"""Loss workers on a real local Ray: scores equal in-process scoring, masks in every mode,
tokenizer mismatch and missing paths refused with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import pyarrow as pa
import pyarrow.parquet as pq

from selector.data.corpus import Corpus, CorpusConfig, DocumentBatch
from selector.errors import ModelLoadError
from selector.rho.excess_loss import RhoConfig, RhoScorer, attach_token_masks, excess_losses, mean_scores, topk_masks_exact, unpack_mask
from workers.loss_scorer import compute_token_masks, score_documents, start_workers, work_items


def _batches(texts, size=8, shard="s0.parquet"):
    out = []
    for start in range(0, len(texts), size):
        b = DocumentBatch(shard)
        for row in range(start, min(start + size, len(texts))):
            b.append(row, f"{shard}:{row}", texts[row])
        out.append(b)
    return out


@pytest.fixture(scope="module")
def setup(ray_local, tiny_llama_dir, tiny_llama_dir_2, real_texts, tmp_path_factory):
    # An empty and a 1-token document test the counted skips.
    texts = [t[:700] for t in real_texts[:30]] + ["a", ""]
    cfg = RhoConfig(reference_model=str(tiny_llama_dir), training_model=str(tiny_llama_dir_2), max_length=128,
                    overlap=16, batch_tokens=2048, keep_ratio=0.6, num_workers=2, worker_num_cpus=0.5,
                    sketch_bins=20_000)
    corpus_dir = tmp_path_factory.mktemp("rho_corpus")
    pq.write_table(pa.table({"text": texts[:30]}), corpus_dir / "s0.parquet")
    corpus_cfg = CorpusConfig(uri=str(corpus_dir))
    actors = start_workers(cfg, corpus_config=corpus_cfg)
    yield cfg, texts, actors, corpus_cfg
    import ray

    for a in actors:
        ray.kill(a)


def test_scores_match_in_process_scorer(setup):
    cfg, texts, actors, _ = setup
    table, stats = score_documents(_batches(texts), cfg, actors=actors)
    assert table.num_rows == len(texts) and stats["skipped"] == {"empty": 1, "too_short": 1}
    ref, train = RhoScorer(cfg).score(texts)
    np.testing.assert_allclose(table["ref_mean"].to_numpy(), mean_scores(ref.losses), atol=1e-6)
    np.testing.assert_allclose(table["excess_mean"].to_numpy(),
                               mean_scores(excess_losses(train.losses, ref.losses)), atol=1e-6)
    assert table["doc_id"].to_pylist() == [f"s0.parquet:{i}" for i in range(len(texts))]
    assert np.isnan(table["excess_mean"].to_numpy()[-2:]).all()
    assert stats["tokens_scored"] == sum(len(x) for x in ref.losses if x is not None)


@pytest.mark.parametrize("mode", ["exact", "sketch", "per_batch"])
def test_masks_across_workers(setup, mode):
    cfg, texts, actors, _ = setup
    cfg = cfg.model_copy(update={"mask_mode": "per_batch" if mode == "per_batch" else "global",
                                 "global_method": "exact" if mode == "exact" else "sketch",
                                 "per_batch_tokens": 1500})
    result = compute_token_masks(_batches(texts), cfg, actors=actors)
    t = result.table
    assert t.num_rows == len(texts) - 2 and result.summary["skipped_ids"] == ["s0.parquet:30", "s0.parquet:31"]
    masks = [unpack_mask(p, n) for p, n in zip(t["token_mask"].to_pylist(), t["n_tokens"].to_pylist())]
    assert all(not m[0] for m in masks)
    assert [int(m.sum()) for m in masks] == t["n_kept"].to_pylist()
    total = sum(len(m) - 1 for m in masks)
    kept = sum(int(m.sum()) for m in masks)
    # Compare with the exact global masks computed in-process.
    ref, train = RhoScorer(cfg).score(texts[:-2])
    excess = excess_losses(train.losses, ref.losses)
    by_id = dict(zip(t["doc_id"].to_pylist(), masks))
    exact = topk_masks_exact(excess, 0.6)
    if mode == "exact":
        assert kept == round(0.6 * total)
        for i, m in enumerate(exact):
            np.testing.assert_array_equal(by_id[f"s0.parquet:{i}"], m)
    elif mode == "sketch":
        s = result.summary
        assert s["target"] == round(0.6 * total) and s["kept"] == kept
        assert s["target"] <= kept <= s["target"] + s["bin_mass"]
        agree = np.mean(np.concatenate([by_id[f"s0.parquet:{i}"] == m for i, m in enumerate(exact)]))
        assert agree > 0.99
    else:
        assert abs(kept / total - 0.6) < 0.01  # exact per batch, so about k overall
    assert result.summary["tokenizer_fingerprint"] and result.summary["bit_order"] == "little"


def test_mismatched_tokenizers_refused(ray_local, tiny_llama_dir, real_texts, tmp_path):
    from selector.demo.proxy_models import build_causal_lm, train_bpe_tokenizer

    train_bpe_tokenizer(real_texts[:100], tmp_path / "tok300", vocab_size=300)
    build_causal_lm(tmp_path / "tok300", tmp_path / "other", arch="llama", seed=3)
    cfg = RhoConfig(reference_model=str(tiny_llama_dir), training_model=str(tmp_path / "other"), max_length=64,
                    overlap=8, batch_tokens=256, num_workers=1, worker_num_cpus=0.5)
    with pytest.raises(ModelLoadError, match="different tokenizers"):
        start_workers(cfg)
    with pytest.raises(ModelLoadError, match="different tokenizers"):
        RhoScorer(cfg)


def test_missing_model_path_refused(ray_local, tiny_llama_dir, tmp_path):
    cfg = RhoConfig(reference_model=str(tiny_llama_dir), training_model=str(tmp_path / "nope"), max_length=64,
                    overlap=8, batch_tokens=256, num_workers=1, worker_num_cpus=0.5)
    with pytest.raises(ModelLoadError, match="does not exist"):
        start_workers(cfg)


def test_shard_work_items_read_by_workers_and_masks_attach(setup):
    cfg, texts, actors, corpus_cfg = setup
    shard = Corpus(corpus_cfg).list_shards()[0]
    whole, _ = score_documents([(shard, None)], cfg, actors=actors)
    by_batch, _ = score_documents(_batches(texts[:30]), cfg, actors=actors)
    assert whole["doc_id"].to_pylist() == by_batch["doc_id"].to_pylist()
    np.testing.assert_allclose(whole["excess_mean"].to_numpy(), by_batch["excess_mean"].to_numpy(), atol=1e-6)

    # The mask stage over another method's selection (rows 3, 5, 7), read by the workers.
    cfg = cfg.model_copy(update={"global_method": "exact"})
    items = work_items(pa.table({"shard": [shard.uri, shard.relpath, shard.uri], "row": [3, 5, 7]}), [shard],
                       docs_per_item=2)
    assert items == [(shard, [3, 5]), (shard, [7])]
    masks = compute_token_masks(items, cfg, actors=actors)
    assert masks.table["doc_id"].to_pylist() == ["s0.parquet:3", "s0.parquet:5", "s0.parquet:7"]
    selection = pa.table({"doc_id": ["s0.parquet:7", "s0.parquet:3", "s0.parquet:9"],
                          "n_tokens": whole["n_tokens"].to_numpy()[[7, 3, 9]]})
    attached = attach_token_masks(selection, masks.table)
    got = attached["token_mask"].to_pylist()
    assert got[0] == masks.table["token_mask"][2].as_py() and got[1] == masks.table["token_mask"][0].as_py()
    assert got[2] is None
    bad = pa.table({"doc_id": ["s0.parquet:3"], "n_tokens": [1]})
    with pytest.raises(Exception, match="tokenized differently|differs"):
        attach_token_masks(bad, masks.table)
