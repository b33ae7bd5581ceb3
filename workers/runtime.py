"""Connecting to Ray: a running cluster when one is named, a local one otherwise."""

from __future__ import annotations

import os
from typing import Iterable

import ray

from selector.config import RayConfig
from selector.data.storage import ENV_RETRY_SECONDS, retry_seconds


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


def job_env(**options) -> dict:
    """``options`` for ``.options(...)`` of a task or actor that touches storage, with this job's
    environment: its storage retry budget (``storage.retry_seconds``). A worker process does not
    inherit the driver's environment on a cluster, nor on a Ray started before the job (a
    notebook, the tests), so the budget travels with each task and actor (Ray merges it with the
    job's own runtime_env)."""
    return {**options, "runtime_env": {"env_vars": {ENV_RETRY_SECONDS: repr(retry_seconds())}}}


def gpu_available() -> bool:
    """Whether the Ray cluster has GPUs to give actors."""
    return ray.cluster_resources().get("GPU", 0) > 0


# --------------------------------------------------------------------------- worker counts

GIB = 1024 ** 3
# A model actor's memory, estimated: the process (torch + transformers, ~0.8 GiB resident) plus its
# models' weights times a factor for what each role keeps beside them (activations of a batch; for
# gradients the weights' gradients, K-FAC factors and the query).
_BASE_BYTES = 0.8 * GIB
_WEIGHT_FACTOR = {"embed": 2.0, "influence": 5.0, "loss": 2.0}
_WHAT = {"embed": "encoder actors", "influence": "influence actors", "loss": "loss-scoring actors"}


def _weights_bytes(path: str | None) -> int | None:
    """Bytes of a local save_pretrained folder's weight files (None: remote or unknown)."""
    from pathlib import Path

    if not path or ("://" in path and not path.startswith("file://")):
        return None
    folder = Path(path.removeprefix("file://"))
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def worker_memory_estimate(role: str, model_paths: list[str | None]) -> float:
    """Estimated bytes one ``role`` actor (embed / influence / loss) needs for ``model_paths``."""
    weights = sum(_weights_bytes(p) or 0 for p in model_paths)
    return _BASE_BYTES + _WEIGHT_FACTOR[role] * weights


def machine_resources() -> dict:
    """GPUs, CPU cores and memory of the Ray cluster this driver is connected to.

    ``cores`` is the cluster's CPU resource, except on a one-node cluster on this machine (a local
    Ray, whose logical CPUs may be oversubscribed, e.g. ``ray.num_cpus: 4`` on 2 cores), where it is
    at most this machine's usable cores. ``memory`` is Ray's ``memory`` resource (what is left for
    tasks and actors beside the object store)."""
    resources = ray.cluster_resources()
    cores = int(resources.get("CPU", 1))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id():
        try:
            local = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            local = os.cpu_count() or 1
        cores = min(cores, local)
    return {"gpus": int(resources.get("GPU", 0)), "cores": max(1, cores), "memory": float(resources.get("memory", 0)),
            "cpus": float(resources.get("CPU", 1))}


def auto_worker_count(role: str, model_paths: list[str | None], machine: dict) -> tuple[int, str]:
    """``(count, why)`` for an ``auto`` pool: one actor per GPU, else one per CPU core, at most as
    many as the memory estimate allows (at least one)."""
    if machine["gpus"]:
        return machine["gpus"], f"one per GPU ({machine['gpus']})"
    each = worker_memory_estimate(role, model_paths)
    by_memory = int(machine["memory"] // each) if machine["memory"] > 0 else machine["cores"]
    n = max(1, min(machine["cores"], by_memory))
    why = f"{machine['cores']} CPU cores, no GPU; ~{each / GIB:.1f} GiB each, memory for {by_memory}"
    return n, why


def _roles(config) -> dict[str, list[str | None]]:
    """The model pools ``config``'s method starts, with the models each actor holds."""
    roles: dict[str, list[str | None]] = {}
    if config.method in ("quad", "exploration-only"):
        from selector.clusters.embedding import PACKAGED_MINILM, packaged_minilm_path

        model = config.embed.model
        roles["embed"] = [packaged_minilm_path() if model == PACKAGED_MINILM else model]
    if config.method in ("quad", "topk-influence"):
        roles["influence"] = [config.proxy_model]
    if config.method == "gtp" and config.gtp is not None:
        roles["influence"] = [config.gtp.checkpoints[0]]  # one checkpoint in memory at a time
    if config.rho is not None and (config.method in ("perplexity", "rho") or config.mask_tokens):
        roles["loss"] = [config.rho.reference_model, config.rho.training_model]
    return roles


def resolve_workers(config, log=print):
    """``config`` with every ``auto`` worker count of its ``ray:`` section made an integer (from the
    cluster's GPUs, else its CPU cores within the memory estimate), and the choice logged.

    Resolved once per job, after :func:`connect`. The ``ray`` section is not part of the config hash,
    so the resolved counts never change a run's identity. An explicit integer is kept;
    ``rho.num_workers``, when set, wins over ``ray.loss_workers``."""
    ray_cfg = config.ray
    fields = {"embed": "embed_workers", "influence": "influence_workers", "loss": "loss_workers"}
    machine = None
    update: dict[str, int] = {}
    chosen: list[str] = []
    roles = _roles(config)
    for role, name in fields.items():
        value = getattr(ray_cfg, name)
        if role == "loss" and config.rho is not None and config.rho.num_workers:
            value = config.rho.num_workers
        if value != "auto":
            update[name] = int(value)
            if role in roles:
                chosen.append(f"{_WHAT[role]} {int(value)} (set)")
            continue
        if role not in roles:
            update[name] = 1  # this method starts no such pool
            continue
        machine = machine or machine_resources()
        n, why = auto_worker_count(role, roles[role], machine)
        update[name] = n
        chosen.append(f"{_WHAT[role]} {n} (auto: {why})")
    if chosen:
        log("workers: " + "; ".join(chosen))
    return config.model_copy(update={"ray": ray_cfg.model_copy(update=update)})


def fit_num_cpus(requested: float, n: int) -> float:
    """CPUs each of ``n`` new actors reserves: ``requested``, less where the cluster's free CPUs
    cannot hold ``n`` of them (an actor that never fits would wait forever)."""
    free = ray.available_resources().get("CPU", 0.0)
    if free <= 0 or free >= requested * n:
        return requested
    return max(0.05, round(free / n - 0.005, 2))


def round_robin(actors: list, method: str, items: Iterable, extra: tuple = (), progress=None) -> list:
    """``actor.<method>(item, *extra)`` for every item, round-robin over ``actors`` with at most two
    calls in flight per actor; results in item order. ``progress(n)`` gets the count finished."""
    pending: dict = {}
    results: dict[int, dict] = {}
    free = [a for a in actors for _ in range(2)]
    for i, item in enumerate(items):
        if not free:
            done, _ = ray.wait(list(pending), num_returns=1)
            j, actor = pending.pop(done[0])
            results[j] = ray.get(done[0])
            free.append(actor)
            if progress:
                progress(len(results))
        actor = free.pop(0)
        pending[getattr(actor, method).remote(item, *extra)] = (i, actor)
    for ref, (j, _) in pending.items():
        results[j] = ray.get(ref)
    if progress:
        progress(len(results))
    return [results[i] for i in sorted(results)]


def pending_shards(workdir, stage: str, shards: list, job_hash: str) -> tuple[dict[str, str], list, list[dict]]:
    """Per-shard resume of a scoring stage: ``(hashes, todo, done_stats)`` -- each shard's hash (the
    job's stage hash with the shard's size and version, so a re-written shard is redone), the shards
    not done under theirs, and the done markers' stats of the others (O(shards), never O(documents))."""
    from selector.clusters.embedding import shard_config_hash
    from selector.data.workdir import shard_key, stable_hash

    hashes = {s.relpath: stable_hash({"job": job_hash, "shard": shard_config_hash({}, None, s)}) for s in shards}
    todo = [s for s in shards if not workdir.is_done(stage, shard_key(s.relpath), hashes[s.relpath])]
    pending = {s.relpath for s in todo}
    done = [(workdir.read_marker(stage, shard_key(s.relpath)) or {}).get("stats", {})
            for s in shards if s.relpath not in pending]
    return hashes, todo, done
