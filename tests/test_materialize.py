"""Materialize: a real manifest with Rho-1 masks becomes Parquet shards that pyarrow and
`datasets` load, whose masked trainer loss equals the mean loss over kept tokens."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selector.errors import ManifestError
from selector.data.manifest import ManifestWriter, selection_table
from selector.data.materialize import materialize
from selector.models.loading import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from selector.rho.excess_loss import RhoConfig, RhoScorer, excess_losses, pack_mask, topk_masks_exact
from selector.rho.token_losses import token_losses, tokenize


@pytest.fixture(scope="module")
def committed(tmp_path_factory, tiny_llama_dir, tiny_llama_dir_2, real_texts):
    root = tmp_path_factory.mktemp("mat")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    texts = [t[:400] for t in real_texts[50:62]]
    pq.write_table(pa.table({"text": texts[:7]}), corpus_dir / "a.parquet")
    pq.write_table(pa.table({"text": texts[7:]}), corpus_dir / "b.parquet")
    from selector.data.corpus import Corpus, CorpusConfig

    corpus_cfg = CorpusConfig(uri=str(corpus_dir))
    shards = Corpus(corpus_cfg).list_shards()
    cfg = RhoConfig(reference_model=str(tiny_llama_dir), training_model=str(tiny_llama_dir_2), max_length=256,
                    overlap=16, keep_ratio=0.6)
    ref, train = RhoScorer(cfg).score(texts)
    masks = topk_masks_exact(excess_losses(train.losses, ref.losses), 0.6)
    # Select 8 of the 12 documents; two of them without a mask (e.g. another method's rows).
    chosen = [0, 2, 3, 6, 7, 8, 10, 11]
    rows = {"doc_id": [], "shard": [], "row": [], "n_tokens": [], "method": [], "token_mask": [], "score": []}
    for i in chosen:
        shard = shards[0] if i < 7 else shards[1]
        row = i if i < 7 else i - 7
        rows["doc_id"].append(f"{shard.relpath}:{row}")
        rows["shard"].append(shard.uri)
        rows["row"].append(row)
        rows["n_tokens"].append(ref.n_tokens[i])
        rows["method"].append("rho")
        rows["token_mask"].append(None if i in (3, 10) else pack_mask(masks[i]))
        rows["score"].append(float(np.mean(train.losses[i] - ref.losses[i])))
    writer = ManifestWriter(str(root / "work"), "run1")
    writer.write(selection_table(rows))
    tok = load_tokenizer(str(tiny_llama_dir))
    uri = writer.commit({"config": {"corpus": corpus_cfg.model_dump(mode="json")},
                         "tokenizer": {"path": str(tiny_llama_dir), "fingerprint": tokenizer_fingerprint(tok)},
                         "corpus": {"shards": [{"uri": s.uri, "version": s.version} for s in shards]},
                         "stages": {"mask": {"add_bos": False}}})
    return root, uri, texts, chosen, masks


def test_materialized_shards_load_and_masked_loss_is_mean_over_kept(committed, tiny_llama_dir, tmp_path):
    root, uri, texts, chosen, masks = committed
    out = tmp_path / "out"
    result = materialize(uri, str(out), rows_per_part=5)
    assert result["documents"] == 8 and [p["rows"] for p in result["parts"]] == [5, 3]
    assert (out / "_SUCCESS").exists() and json.loads((out / "_materialize.json").read_text())["documents"] == 8

    table = pq.read_table(out)  # pyarrow reads the directory of shards
    assert table.num_rows == 8 and table.schema.field("loss_mask").type == pa.list_(pa.bool_())
    import datasets

    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in out.glob("part-*.parquet")),
                               split="train")
    assert len(ds) == 8 and set(ds.column_names) >= {"input_ids", "loss_mask", "doc_id", "text"}

    tok = load_tokenizer(str(tiny_llama_dir))
    model = load_causal_lm(str(tiny_llama_dir))
    by_text = {t: i for i, t in enumerate(texts)}
    for rec in ds:
        i = by_text[rec["text"]]
        ids = tokenize(tok, [rec["text"]])[0]
        assert rec["input_ids"] == ids.tolist()
        expect = np.ones(len(ids), bool) if i in (3, 10) else masks[i]
        if i in (3, 10):
            expect[0] = False
        assert rec["loss_mask"] == expect.tolist() and rec["n_kept"] == int(expect.sum())

        # The trainer's view: HF labels with -100 where the mask drops the token.
        x = torch.tensor([rec["input_ids"]])
        m = torch.tensor([rec["loss_mask"]])
        with torch.no_grad():
            trainer_loss = float(model(input_ids=x, labels=torch.where(m, x, torch.full_like(x, -100))).loss)
        per_token = token_losses(model, tok, [rec["text"]], max_length=256, overlap=16).losses[0]
        assert trainer_loss == pytest.approx(float(per_token[np.array(rec["loss_mask"])[1:]].mean()), abs=1e-5)


def test_materialize_refuses_bad_inputs(committed, tmp_path, real_texts):
    root, uri, *_ = committed
    out = tmp_path / "o1"
    materialize(uri, str(out))
    with pytest.raises(ManifestError, match="already holds"):
        materialize(uri, str(out))
    with pytest.raises(ManifestError, match="not committed|no manifest"):
        materialize(str(root / "work" / "manifests" / "nope"), str(tmp_path / "o2"))
    from selector.demo.proxy_models import train_bpe_tokenizer

    train_bpe_tokenizer(real_texts[:60], tmp_path / "tok2", vocab_size=300)
    with pytest.raises(ManifestError, match="differs"):
        materialize(uri, str(tmp_path / "o3"), tokenizer_path=str(tmp_path / "tok2"))
