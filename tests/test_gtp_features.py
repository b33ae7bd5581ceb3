"""GTP trajectory features on two real tiny Llama checkpoints (selector.gtp.features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selector.errors import ModelLoadError
from selector.gtp.pursuit import GTPConfig, pursue
from selector.gtp.features import (FeatureShardRef, TrajectoryFeaturizer, compute_shard_features,
                                   corpus_mean_target, features_config_hash, read_feature_shard)
from selector.data.workdir import WorkDir


@pytest.fixture(scope="module")
def texts(real_texts):
    return [t[:160] for t in real_texts[:8]]


@pytest.fixture(scope="module")
def featurizer(tiny_llama_dir, tiny_llama_dir_2):
    cfg = GTPConfig(checkpoints=[str(tiny_llama_dir), str(tiny_llama_dir_2)], projection_dim_a=4,
                    projection_dim_g=4, chunk_tokens=64, max_chunks_per_doc=2, batch_size=4)
    return TrajectoryFeaturizer(cfg)


def test_features_concatenate_projected_gradients_per_checkpoint(featurizer, texts):
    from selector.gradients.projection import project_document_gradients

    feats = featurizer.featurize(texts)
    d = featurizer.dim_per_checkpoint
    assert feats.shape == (len(texts), 2 * d) and feats.dtype == np.float32
    for t, (m, p, b) in enumerate(zip(featurizer.models, featurizer.projectors, featurizer.blocks)):
        alone = project_document_gradients(m, featurizer.tokenizer, texts, p, b, chunk_tokens=64, batch_size=4,
                                           max_chunks_per_doc=2)
        np.testing.assert_allclose(feats[:, t * d:(t + 1) * d], alone, rtol=1e-5, atol=1e-7)
    # different checkpoints give different gradients (a real trajectory, not a copy)
    assert not np.allclose(feats[:, :d], feats[:, d:], atol=1e-4)
    y = featurizer.reference_target(texts[:3])
    np.testing.assert_allclose(y, feats[:3].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-8)


def test_identity_projection_segment_is_the_true_document_gradient(tiny_llama_dir, tiny_llama_dir_2):
    # With projection dims >= every block's size the map is the identity, so each checkpoint's
    # segment must equal the autograd gradient of the document's mean next-token loss.
    cfg = GTPConfig(checkpoints=[str(tiny_llama_dir), str(tiny_llama_dir_2)], projection_dim_a=128,
                    projection_dim_g=192, chunk_tokens=256)
    fz = TrajectoryFeaturizer(cfg)
    text = "def add(a, b):\n    return a + b  # the sum of two numbers"
    feats = fz.featurize([text])[0]
    ids = torch.tensor([fz.tokenizer(text)["input_ids"]])
    for t, (model, blocks) in enumerate(zip(fz.models, fz.blocks)):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        expect = torch.cat([blk.grad_matrix().flatten() for blk in blocks]).numpy()
        seg = feats[t * fz.dim_per_checkpoint:(t + 1) * fz.dim_per_checkpoint]
        np.testing.assert_allclose(seg, expect, rtol=2e-3, atol=2e-6)
        model.zero_grad()


def test_shards_written_resumable_and_read_back(featurizer, texts, tmp_path):
    wd = WorkDir(str(tmp_path), "run1")
    halves = [(0, 4), (4, 8)]
    keys = []
    for s, e in halves:
        key = f"shard-{s}"
        keys.append(key)
        ids = [f"doc{i}" for i in range(s, e)]
        assert compute_shard_features(wd, key, featurizer, ids, list(range(e - s)), texts[s:e],
                                      [len(t) for t in texts[s:e]])
    # resume: same config hash -> skipped; a changed config recomputes
    assert not compute_shard_features(wd, keys[0], featurizer, ["x"], [0], ["never featurized"], [1])
    other = featurizer.config.model_copy(update={"seed": 1})
    assert features_config_hash(other) != features_config_hash(featurizer.config)
    part = read_feature_shard(wd, keys[0])
    np.testing.assert_allclose(part.features, featurizer.featurize(texts[:4]), rtol=1e-5, atol=1e-7)
    assert list(part.ids) == [f"doc{i}" for i in range(4)]
    np.testing.assert_array_equal(part.n_tokens, [len(t) for t in texts[:4]])
    refs = [FeatureShardRef(str(tmp_path), "run1", k) for k in keys]
    np.testing.assert_array_equal(refs[1].load().features, read_feature_shard(wd, keys[1]).features)
    all_feats = np.concatenate([r.load().features for r in refs]).astype(np.float64)
    np.testing.assert_allclose(corpus_mean_target(refs), all_feats.mean(axis=0), rtol=1e-10)


def test_pursuit_on_real_trajectory_features(featurizer, real_texts):
    docs = [t[:120] for t in real_texts[20:44]]
    phi = featurizer.featurize(docs)
    y = featurizer.reference_target([t[:120] for t in real_texts[:3]])
    res = pursue(phi, y, k=8)
    assert 0 < res.support.size <= 8 and np.all(res.weights > 0)
    assert res.rel_residual < res.residual_history[0]


def test_checkpoints_must_share_architecture(tiny_llama_dir, tiny_gpt2_dir):
    cfg = GTPConfig(checkpoints=[str(tiny_llama_dir), str(tiny_gpt2_dir)])
    with pytest.raises(ModelLoadError):
        TrajectoryFeaturizer(cfg)
