"""Worker-pool sizes: `auto` resolves from the real local Ray's GPUs / CPU cores and a memory estimate."""

import os

import pytest

from selector.config import parse_config
from workers.runtime import (GIB, auto_worker_count, fit_num_cpus, machine_resources, resolve_workers,
                             worker_memory_estimate)


def job(tmp_path, tokenizer, **over):
    cfg = {"tokenizer": str(tokenizer), "corpus": {"uri": str(tmp_path / "c")}, "work": {"root": str(tmp_path / "w")},
           "budget": {"fraction": 0.5}}
    cfg.update(over)
    return parse_config(cfg)


def test_auto_count_is_gpus_else_cores_within_memory():
    assert auto_worker_count("loss", [], {"gpus": 4, "cores": 16, "memory": 64 * GIB})[0] == 4
    n, why = auto_worker_count("loss", [], {"gpus": 0, "cores": 16, "memory": 64 * GIB})
    assert n == 16 and "16 CPU cores" in why
    # 0.8 GiB per actor: 2 GiB of memory holds two of them, not sixteen
    assert auto_worker_count("embed", [], {"gpus": 0, "cores": 16, "memory": 2 * GIB})[0] == 2
    assert auto_worker_count("embed", [], {"gpus": 0, "cores": 16, "memory": 0.1 * GIB})[0] == 1  # at least one


def test_memory_estimate_grows_with_the_weights(tiny_llama_dir):
    base = worker_memory_estimate("loss", [])
    weights = sum(f.stat().st_size for f in tiny_llama_dir.glob("*.safetensors"))
    assert worker_memory_estimate("loss", [str(tiny_llama_dir)] * 2) == pytest.approx(base + 2 * 2 * weights)
    assert worker_memory_estimate("loss", ["s3://bucket/model"]) == base  # remote: unknown size


def test_resolve_workers_uses_the_cores_and_prints_the_choice(ray_local, tmp_path, tiny_tokenizer_dir,
                                                             tiny_llama_dir, tiny_llama_dir_2):
    machine = machine_resources()
    cores = min(int(ray_local.cluster_resources()["CPU"]), len(os.sched_getaffinity(0)))
    assert machine["cores"] == cores  # a local Ray on 4 logical CPUs counts this machine's cores
    rho = {"reference_model": str(tiny_llama_dir_2), "training_model": str(tiny_llama_dir)}
    cfg = job(tmp_path, tiny_tokenizer_dir, method="perplexity", rho=rho)
    assert cfg.ray.loss_workers == "auto"
    lines = []
    resolved = resolve_workers(cfg, lines.append)
    assert resolved.ray.loss_workers == min(cores, auto_worker_count("loss", [], machine)[0]) >= 1
    assert lines == [f"workers: loss-scoring actors {resolved.ray.loss_workers} (auto: {cores} CPU cores, no GPU; "
                     f"~{worker_memory_estimate('loss', [rho['reference_model'], rho['training_model']]) / GIB:.1f} "
                     f"GiB each, memory for {int(machine['memory'] // worker_memory_estimate('loss', list(rho.values())))})"]
    assert resolved.config_hash() == cfg.config_hash()  # the ray section is not part of a run's identity

    # explicit counts are kept; rho.num_workers wins over ray.loss_workers
    fixed = resolve_workers(job(tmp_path, tiny_tokenizer_dir, method="perplexity", rho=rho | {"num_workers": 3},
                                ray={"loss_workers": 1}), lines.append)
    assert fixed.ray.loss_workers == 3 and lines[-1] == "workers: loss-scoring actors 3 (set)"
    # a method that starts no model pool prints nothing
    lines.clear()
    resolve_workers(job(tmp_path, tiny_tokenizer_dir, method="random"), lines.append)
    assert lines == []


def test_fit_num_cpus_never_asks_for_more_than_is_free(ray_local):
    free = ray_local.available_resources().get("CPU", 0)
    assert fit_num_cpus(0.25, 1) == 0.25
    each = fit_num_cpus(1.0, int(free) + 2)
    assert each * (int(free) + 2) <= free and each >= 0.05
