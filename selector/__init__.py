"""Thresher's selection library: data contracts and the math of each method.

Nothing in this package imports Ray; every function is deterministic given a seed. Where a change
belongs:

- ``config``, ``config_base``, ``errors``: the job config and the errors every part raises;
- ``data``: corpus, index, work dir, leases, manifests, runs, refresh lineage, storage;
- ``models``: loading models by path, LM chunks and losses, training proxy/reference models;
- ``gradients``: tracked layers, K-FAC, influence, random projection of gradients;
- ``clusters``: embeddings, k-means and neighbours, cluster queues;
- ``quad``, ``gtp``, ``rho``: each method's own math;
- ``selection``: ranked selection under a budget and the baselines;
- ``demo``: demo corpus, real and synthetic text, tiny models for tests and benches.
"""

__version__ = "0.1.0"
