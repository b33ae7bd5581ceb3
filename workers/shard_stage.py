"""Per-shard map stages on Ray Data: the executor, apart from the stages it runs.

A stage is a :class:`ShardStage`, constructed once per actor (it loads its model there) and called once
per shard: ``process(shard, config_hash) -> dict`` writes that shard's outputs to the work dir (whole, then its done
marker, so resume stays shard-granular) and returns the shard's stats (a small JSON-able dict).
:func:`run_shard_stage` feeds the unfinished shards to a Ray Data actor pool -- ``map_batches`` over
a dataset of shard descriptors, one shard per batch, ``concurrency`` actors, one GPU each on a GPU
cluster -- and streams the stats back to the driver (O(shards)). Ray Data does the scheduling,
the placement, the backpressure and the retries: an actor that dies (process killed, node lost) is
restarted and its in-flight shard redone, up to ``RESTARTS`` times.

Why shard descriptors rather than ``read_parquet`` blocks: a stage's outputs and done markers are per
shard (resume skips finished shards, a refresh redoes changed ones), and the readers of
``selector.corpus`` validate records and apply the corpus's quarantine rule; a descriptor keeps both.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict
from typing import Iterable

import numpy as np
import ray
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from selector.corpus import ShardInfo
from workers.runtime import job_env

RESTARTS = 3  # restarts of a dead stage actor (and retries of its in-flight shard)


class ShardStage:
    """A per-shard stage, as the Ray Data UDF: subclasses load their model in ``__init__`` and implement
    :meth:`process`; ``__call__`` runs it on each shard of a batch. Ray names the actor processes after
    the subclass (``ray::MapWorker(MapBatches(<subclass>))``)."""

    def process(self, shard: ShardInfo, config_hash: str) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        out = []
        for shard, config_hash in zip(batch["shard"], batch["config_hash"]):
            out.append(json.dumps(self.process(ShardInfo(**json.loads(shard)), str(config_hash))))
        return {"stats": np.array(out, dtype=object)}


def restart_limits() -> dict:
    """Bounded fault tolerance for the stage actors (Ray Data's default restarts forever, so a shard
    that kills its actor every time, e.g. out of memory, would never fail the job)."""
    return {"max_restarts": RESTARTS, "max_task_retries": RESTARTS}


def no_ray_data_progress_bars() -> None:
    """The job prints one progress bar per stage of its own (Ray Data's would interleave with it)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def run_shard_stage(name: str, stage: type[ShardStage], kwargs: dict, shards: Iterable[ShardInfo],
                    hashes: dict[str, str], concurrency: int, num_cpus: float = 0.5, num_gpus: float = 0,
                    progress: bool = True, count_key: str | None = None) -> list[dict]:
    """Run ``stage(**kwargs).process(shard, hashes[shard.relpath])`` on every shard in ``shards`` on a Ray Data
    actor pool of ``concurrency`` actors (each ``num_cpus`` / ``num_gpus``); returns the stats of every
    shard, in completion order. Largest shards go first, so the last to finish is a small one.

    ``count_key``: a stats field to add up in the progress bar (e.g. documents). A stage's exception
    (a bad record, a wrong model) is raised here as the stage raised it, wrapped by Ray."""
    ordered = sorted(shards, key=lambda s: (-s.size, s.relpath))
    if not ordered:
        return []
    no_ray_data_progress_bars()
    items = [{"shard": json.dumps(asdict(s)), "config_hash": hashes[s.relpath]} for s in ordered]
    with warnings.catch_warnings():
        # Ray 2.60 says ray_remote_args_fn goes in 2.64 and names no other way to bound the restarts.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            stage, fn_constructor_kwargs=kwargs, batch_size=1,
            compute=ActorPoolStrategy(size=max(1, min(concurrency, len(items)))), num_cpus=num_cpus,
            num_gpus=num_gpus or None, runtime_env=job_env()["runtime_env"], ray_remote_args_fn=restart_limits)
    results: list[dict] = []
    total = 0
    with tqdm(total=len(ordered), desc=name, unit="shard", disable=not progress, file=sys.stderr,
              mininterval=0.5, dynamic_ncols=True) as bar:
        for row in dataset.iter_rows():
            stats = json.loads(row["stats"])
            results.append(stats)
            if count_key:
                total += int(stats.get(count_key, 0))
                bar.set_postfix_str(f"{total:,} {count_key.removeprefix('n_')}", refresh=False)
            bar.update(1)
    return results


__all__ = ["RESTARTS", "ShardStage", "no_ray_data_progress_bars", "run_shard_stage"]
