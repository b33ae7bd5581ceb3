"""GTP trajectory features: per-document projected gradients at T >= 2 checkpoints, concatenated.

For checkpoints theta_1..theta_T (``GTPConfig.checkpoints``) and document x, the feature is

    phi(x) = [ f(x; theta_1) | f(x; theta_2) | ... | f(x; theta_T) ]        (length D = T * d)
    f(x; theta) = concat over tracked blocks l of  P_G,l (grad_{W_l} L(x; theta)) P_A,l^T

i.e. ``selector.gradients.projection.project_document_gradients`` at each checkpoint (the Kronecker
random projection of the per-document gradient of the mean next-token loss, averaged over
the document's chunks). The same maps P_A, P_G (same seed, same block names) are used at every
checkpoint, so the T segments live in one coordinate system.

Target y (``GTPConfig.target``):
  * ``reference``: mean over reference documents of phi(r). The projection is linear in the
    gradient, so this is exactly the projected mean reference gradient at each checkpoint;
  * ``corpus_mean``: mean of phi over every corpus document (:func:`corpus_mean_target`, a
    streaming sum over the feature shards — no second pass over the models).

Segments are concatenated unscaled: a checkpoint with larger gradients (typically an earlier
one) weighs more in ||Phi w - y||, as in the raw trajectory objective.

Work dir: stage ``gtp_features``, one Parquet file per corpus shard with columns ``doc_id``,
``row``, ``n_tokens``, ``features`` (fixed-size list<float32>[D]), then a done marker carrying
:func:`features_config_hash`; :func:`compute_shard_features` skips a shard already done under
the same hash, so a killed job resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from selector.errors import ModelLoadError, StageError
from selector.gtp.pursuit import GTPConfig, GTPPartition

STAGE = "gtp_features"


def features_config_hash(config: GTPConfig, layers_config=None) -> str:
    """Hash of everything that changes the feature values (not pursuit settings like k or tol)."""
    from selector.data.workdir import stable_hash

    return stable_hash({"checkpoints": list(config.checkpoints), "dim_a": config.projection_dim_a,
                        "dim_g": config.projection_dim_g, "seed": config.seed, "chunk_tokens": config.chunk_tokens,
                        "max_chunks_per_doc": config.max_chunks_per_doc,
                        "layers": None if layers_config is None else layers_config.model_dump()})


class TrajectoryFeaturizer:
    """Holds the T checkpoint models (all in memory: T is small, and each batch of documents is
    run through every checkpoint) and maps texts to (n, T * d) float32 trajectory features."""

    def __init__(self, config: GTPConfig, *, device: str = "cpu", layers_config=None,
                 storage_options: dict | None = None):
        from selector.models.loading import load_causal_lm, load_tokenizer, require_same_tokenizer
        from selector.gradients.projection import KroneckerProjector
        from selector.gradients.tracked_layers import discover_blocks

        self.config = config
        require_same_tokenizer({f"checkpoint[{i}]": p for i, p in enumerate(config.checkpoints)}, storage_options)
        self.tokenizer = load_tokenizer(config.checkpoints[0], storage_options)
        self.models, self.blocks, self.projectors = [], [], []
        for i, path in enumerate(config.checkpoints):
            model = load_causal_lm(path, device=device, storage_options=storage_options)
            blocks = discover_blocks(model, layers_config)
            if self.blocks and [b.name for b in blocks] != [b.name for b in self.blocks[0]]:
                raise ModelLoadError(f"GTP checkpoints must share one architecture: checkpoint[{i}] ({path}) "
                                     f"has tracked blocks {[b.name for b in blocks]}, checkpoint[0] has "
                                     f"{[b.name for b in self.blocks[0]]}")
            self.models.append(model)
            self.blocks.append(blocks)
            self.projectors.append(KroneckerProjector(blocks, config.projection_dim_a, config.projection_dim_g,
                                                      config.seed))
        self.dim_per_checkpoint = self.projectors[0].dim
        self.dim = self.dim_per_checkpoint * len(self.models)

    def featurize(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32: projected gradients at each checkpoint, concatenated."""
        from selector.gradients.projection import project_document_gradients

        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [project_document_gradients(m, self.tokenizer, texts, p, b, chunk_tokens=self.config.chunk_tokens,
                                            batch_size=self.config.batch_size,
                                            max_chunks_per_doc=self.config.max_chunks_per_doc)
                 for m, p, b in zip(self.models, self.projectors, self.blocks)]
        return np.concatenate(parts, axis=1)

    def reference_target(self, reference_texts: Sequence[str]) -> np.ndarray:
        """y for ``target='reference'``: the mean trajectory feature of the reference documents."""
        if len(reference_texts) == 0:
            raise StageError("GTP target 'reference' needs a non-empty reference set")
        feats = self.featurize(reference_texts).astype(np.float64)
        if not np.any(feats):
            raise StageError("GTP reference documents have all-zero gradient features "
                             "(every document shorter than 2 tokens?)")
        return feats.mean(axis=0)


# --------------------------------------------------------------------------- work-dir shards


def features_table(doc_ids: Sequence[str], rows: Sequence[int], n_tokens: Sequence[int], features: np.ndarray) -> pa.Table:
    n = len(doc_ids)
    if features.ndim != 2 or features.shape[0] != n or len(rows) != n or len(n_tokens) != n:
        raise StageError(f"feature shard: {n} ids, {len(rows)} rows, {len(n_tokens)} token counts and "
                         f"features {features.shape} must describe the same documents")
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table({"doc_id": pa.array(list(doc_ids), pa.string()), "row": pa.array(rows, pa.int64()),
                     "n_tokens": pa.array(n_tokens, pa.int64()),
                     "features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1])})


def compute_shard_features(workdir, key: str, featurizer: TrajectoryFeaturizer, doc_ids: Sequence[str],
                           rows: Sequence[int], texts: Sequence[str], n_tokens: Sequence[int],
                           config_hash: str | None = None) -> bool:
    """Featurize one corpus shard into the work dir; returns False when it was already done
    (same config hash) and skipped — the resume path."""
    config_hash = config_hash or features_config_hash(featurizer.config)
    if workdir.is_done(STAGE, key, config_hash):
        return False
    feats = featurizer.featurize(texts)
    table = features_table(doc_ids, rows, n_tokens, feats)
    workdir.write_table(STAGE, key, table, config_hash,
                        stats={"n_docs": len(doc_ids), "dim": int(featurizer.dim),
                               "zero_rows": int((~feats.any(axis=1)).sum())})
    return True


def read_feature_shard(workdir, key: str) -> GTPPartition:
    """A shard's features as a :class:`GTPPartition` (ids, (n, D) float32, n_tokens)."""
    table = workdir.read_table(STAGE, key)
    col = table.column("features").combine_chunks()
    dim = col.type.list_size
    feats = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return GTPPartition(ids=np.asarray(table.column("doc_id").to_pylist(), dtype=object), features=feats,
                        n_tokens=table.column("n_tokens").to_numpy())


@dataclass
class FeatureShardRef:
    """A picklable pointer to one feature shard; Ray workers call ``.load()`` themselves, so the
    driver never reads the features (what ``workers.gtp.distributed_pursuit`` accepts)."""

    root: str
    run_id: str
    key: str
    storage_options: dict = field(default_factory=dict)

    def load(self) -> GTPPartition:
        from selector.data.workdir import WorkDir

        return read_feature_shard(WorkDir(self.root, self.run_id, self.storage_options), self.key)


def corpus_mean_target(partitions: Sequence[GTPPartition | FeatureShardRef]) -> np.ndarray:
    """y for ``target='corpus_mean'``: mean feature over all documents, summed shard by shard."""
    total, count = None, 0
    for p in partitions:
        part = p.load() if isinstance(p, FeatureShardRef) else p
        s = part.features.astype(np.float64).sum(axis=0)
        total = s if total is None else total + s
        count += part.features.shape[0]
    if count == 0:
        raise StageError("GTP target 'corpus_mean': the corpus has no documents with features")
    return total / count
