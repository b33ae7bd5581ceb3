"""Per-shard map stages on Ray Data: the executor, apart from the stages it runs.

A stage is a :class:`ShardStage`, constructed once per actor (it loads its model there) and called once
per shard: ``process(shard, config_hash) -> dict`` writes that shard's outputs to the work dir (whole, then its done
marker, so resume stays shard-granular) and returns the shard's stats (a small JSON-able dict).
:func:`run_shard_stage` feeds the unfinished shards to a Ray Data actor pool -- ``map_batches`` over
a dataset of shard descriptors, one shard per batch, ``concurrency`` actors, one GPU each on a GPU
cluster -- and streams the stats back to the driver (O(shards)). Ray Data does the scheduling,
the placement, the backpressure and the retries: an actor that dies (process killed, node lost) is
restarted and its in-flight shard redone, up to ``RESTARTS`` times.

A stage without a model (the index: a tokenizer) runs as Ray Data *tasks* instead (``actors=False``):
no actor pool to start (Ray Data waits ~3 s for one; a task stage starts in ~0.5 s), each worker
process builds the stage once and keeps it (:data:`_RESIDENT`) for the next shards it is given, and
a task whose process dies is retried, up to ``RESTARTS`` times.

Why shard descriptors rather than ``read_parquet`` blocks: a stage's outputs and done markers are per
shard (resume skips finished shards, a refresh redoes changed ones), and the readers of
``selector.data.corpus`` validate records and apply the corpus's quarantine rule; a descriptor keeps both.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict
from typing import Iterable

import numpy as np
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from tqdm import tqdm

from selector.data.corpus import ShardInfo
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
            info = ShardInfo(**json.loads(shard))
            try:
                stats = self.process(info, str(config_hash))
            except Exception as exc:
                # Ray Data passes a stage's error on as text only (its type is lost on the way), so an
                # unreachable store, say, is named here, where the exception is still at hand.
                error = _storage_error(exc, info)
                if error is None:
                    raise
                raise error from exc
            out.append(json.dumps(stats))
        return {"stats": np.array(out, dtype=object)}


def _storage_error(exc: BaseException, shard: ShardInfo):
    from selector.errors import ThresherError
    from selector.data.storage import request_uri, storage_error

    if isinstance(exc, ThresherError):
        return None
    uri = request_uri(exc)
    return storage_error(exc, uri or shard.uri, what="the object" if uri else f"shard {shard.relpath}")


_RESIDENT: dict[tuple, ShardStage] = {}  # per worker process: the stages built by task-mode runs


def resident_stage(stage: type[ShardStage], kwargs: dict) -> ShardStage:
    """The ``stage(**kwargs)`` this process built before, or a new one (the last 4 are kept)."""
    key = (stage.__module__, stage.__qualname__, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _RESIDENT:
        while len(_RESIDENT) >= 4:
            _RESIDENT.pop(next(iter(_RESIDENT)))
        _RESIDENT[key] = stage(**kwargs)
    return _RESIDENT[key]


class _TaskStage:
    """The task-mode UDF: a picklable callable that runs the process's resident stage."""

    def __init__(self, stage: type[ShardStage], kwargs: dict):
        self.stage, self.kwargs = stage, kwargs

    def __call__(self, batch: dict) -> dict:
        return resident_stage(self.stage, self.kwargs)(batch)


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
                    progress: bool = True, count_key: str | None = None, actors: bool = True) -> list[dict]:
    """Run ``stage(**kwargs).process(shard, hashes[shard.relpath])`` on every shard in ``shards`` on a Ray Data
    actor pool of ``concurrency`` actors (each ``num_cpus`` / ``num_gpus``), or with ``actors=False`` as
    Ray Data tasks, at most ``concurrency`` at once; returns the stats of every shard, in completion
    order. Largest shards go first, so the last to finish is a small one.

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
        # ... and the same of the task retries (max_retries, a Ray remote argument)
        warnings.filterwarnings("ignore", message=".*`ray_remote_args` is deprecated")
        size = max(1, min(concurrency, len(items)))
        common = {"batch_size": 1, "num_cpus": num_cpus, "num_gpus": num_gpus or None,
                  "runtime_env": job_env()["runtime_env"]}
        source = ray.data.from_items(items, override_num_blocks=len(items))
        if actors:
            dataset = source.map_batches(stage, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=size),
                                         ray_remote_args_fn=restart_limits, **common)
        else:
            dataset = source.map_batches(_TaskStage(stage, kwargs), compute=TaskPoolStrategy(size=size),
                                         max_retries=RESTARTS, **common)
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


__all__ = ["RESTARTS", "ShardStage", "no_ray_data_progress_bars", "resident_stage", "run_shard_stage"]
