"""Shared by the Quad tests: the cluster stage's outputs written as selector.clusters.kmeans writes them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from selector.data.workdir import WorkDir


def write_cluster_stage(workdir: WorkDir, ids, clusters, tokens, n_shards=2, radius=0.2):
    """The cluster stage's outputs as selector.clusters.kmeans writes them (per-shard assignments and
    the neighbour table of unit centroids), for documents already assigned."""
    from selector.clusters.kmeans import ASSIGN_STAGE, SUMMARY_STAGE, centroid_neighbours

    k = int(max(clusters)) + 1
    angles = 0.5 * np.arange(k)  # unit centroids on a circle: consecutive ones are 1 - cos(0.5) apart
    centroids = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    keys = []
    for s in range(n_shards):
        part = np.arange(s, len(ids), n_shards)
        key = f"shard-{s}"
        workdir.write_table(ASSIGN_STAGE, key, pa.table({
            "doc_id": [ids[i] for i in part], "row": pa.array(part, pa.int64()),
            "cluster": pa.array(np.asarray(clusters)[part], pa.int32()),
            "distance": pa.array(np.zeros(len(part)), pa.float32()),
            "n_tokens": pa.array(np.asarray(tokens)[part], pa.int64())}), "h")
        keys.append(key)
    workdir.write_table(SUMMARY_STAGE, "neighbours", centroid_neighbours(centroids, radius), "h")
    return keys

