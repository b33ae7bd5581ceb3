"""Connecting to Ray: a running cluster when one is named, a local one otherwise."""

from __future__ import annotations

import os

import ray

from selector.config import RayConfig


def connect(config: RayConfig) -> None:
    """Join the cluster named by ``config.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``),
    else start a local Ray on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local" never attaches to a stale cluster left in the temp dir.
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False)


def gpu_available() -> bool:
    """Whether the Ray cluster has GPUs to give actors."""
    return ray.cluster_resources().get("GPU", 0) > 0
