"""Ray Data against plain Ray actors as the executor of a per-shard map stage (the embed stage).

    python -m bench.map_executor --cache /work/scale-cache --shards 2,8 --repeats 3

The issue that moved the map stages to Ray Data keeps a stage on plain actors only where a
measurement shows Ray Data costs more: this is that measurement, for the embed stage. Both
executors run the same stage class (``workers.embedder.EmbedShards``: one tiny 2-layer encoder per
actor, ``selector.clusters.embedding.embed_shard`` per shard) with the same resources (``--workers`` actors of
0.5 CPU), on the first ``s`` shards of bench/scale.py's synthetic corpus (5,000 documents each), from a
fresh work dir each time (nothing skipped):

* ``ray_data``: :func:`workers.shard_stage.run_shard_stage` (what the job runs): ``map_batches`` over
  shard descriptors on an ``ActorPoolStrategy`` pool;
* ``actors``: ``ray.util.ActorPool`` over ``ray.remote(EmbedShards)`` actors, largest shard first --
  the executor the embed stage had before (workers/embedder.py up to 8633308), as the baseline.

Seconds are wall time from the call to the last shard's stats, actors started and stopped inside
(both pay their model loading). One Ray session for all runs; the two executors alternate, so a
load change on the machine hits both. Median over ``--repeats``; the ratio is ray_data / actors.
A small and a larger shard count separate the fixed cost (start-up) from the per-shard cost.
Writes ``bench/results/map_executor.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS_PER_SHARD = 5000


def embed_with_actors(kwargs: dict, shards: list, hashes: dict, n_workers: int, num_cpus: float) -> list[dict]:
    """The baseline: a plain Ray actor pool, one EmbedShards per actor."""
    import ray

    from workers.embedder import EmbedShards
    from workers.runtime import job_env

    remote = ray.remote(EmbedShards)
    actors = [remote.options(**job_env(num_cpus=num_cpus)).remote(**kwargs) for _ in range(n_workers)]
    try:
        pool = ray.util.ActorPool(actors)
        ordered = sorted(shards, key=lambda s: (-s.size, s.relpath))
        return list(pool.map_unordered(lambda a, s: a.process.remote(s, hashes[s.relpath]), ordered))
    finally:
        for actor in actors:
            ray.kill(actor)


def run_once(executor: str, n_shards: int, inputs: dict, n_workers: int, num_cpus: float, scratch: Path) -> dict:
    from selector.data.corpus import Corpus, CorpusConfig
    from selector.clusters.embedding import EmbedConfig, encoder_identity, shard_config_hash
    from selector.data.workdir import WorkDir
    from workers.embedder import EmbedShards
    from workers.shard_stage import run_shard_stage

    corpus_cfg = CorpusConfig(uri=inputs["corpora"][n_shards * DOCS_PER_SHARD], id_column="id")
    shards = Corpus(corpus_cfg).list_shards()
    embed_cfg = EmbedConfig(model=inputs["encoder"], max_tokens=128, device="cpu", num_threads=1)
    work = scratch / f"{executor}-{n_shards}-{time.monotonic_ns()}"
    workdir = WorkDir(str(work), "bench")
    identity = encoder_identity(embed_cfg, "cpu")
    hashes = {s.relpath: shard_config_hash(identity, corpus_cfg, s) for s in shards}
    kwargs = {"corpus_config": corpus_cfg.model_dump(mode="json"), "embed_config": embed_cfg.model_dump(mode="json"),
              "work_root": workdir.root, "run_id": workdir.run_id, "work_storage_options": workdir.storage_options}
    start = time.perf_counter()
    if executor == "ray_data":
        stats = run_shard_stage("embed", EmbedShards, kwargs, shards, hashes, concurrency=n_workers,
                                num_cpus=num_cpus, progress=False)
    else:
        stats = embed_with_actors(kwargs, shards, hashes, n_workers, num_cpus)
    seconds = time.perf_counter() - start
    docs = sum(r["n_docs"] for r in stats)
    shutil.rmtree(work, ignore_errors=True)
    if len(stats) != len(shards) or docs != n_shards * DOCS_PER_SHARD:
        raise SystemExit(f"{executor}: {len(stats)} shards / {docs} documents embedded, expected {len(shards)} / "
                         f"{n_shards * DOCS_PER_SHARD}")
    return {"executor": executor, "shards": n_shards, "documents": docs, "seconds": round(seconds, 2),
            "stage_seconds": round(sum(r.get("seconds", 0.0) for r in stats), 2)}


def write_report(runs: list[dict], meta: dict, out_md: Path) -> dict:
    table = []
    for n in sorted({r["shards"] for r in runs}):
        row = {"shards": n, "documents": n * DOCS_PER_SHARD}
        for ex in ("actors", "ray_data"):
            secs = [r["seconds"] for r in runs if r["shards"] == n and r["executor"] == ex]
            row[ex] = {"median": statistics.median(secs), "min": min(secs), "max": max(secs), "all": secs}
        row["ratio"] = round(row["ray_data"]["median"] / row["actors"]["median"], 3)
        table.append(row)
    lines = ["# Map-stage executor: Ray Data against plain actors (embed stage)", "",
             f"Command: `{meta['command']}`", "",
             f"Commit `{meta['commit']}`; {meta['machine']}; {meta['workers']} actors x {meta['num_cpus']} CPU, "
             f"tiny 2-layer encoder, 128-token window, {DOCS_PER_SHARD:,} documents per shard; median of "
             f"{meta['repeats']} repeats, executors alternating in one Ray session; load average "
             f"{meta['load_before']} before, {meta['load_after']} after.", "",
             "| shards | documents | plain actors s (min-max) | Ray Data s (min-max) | Ray Data / actors | "
             "Ray Data docs/s |", "|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        a, d = row["actors"], row["ray_data"]
        lines.append(f"| {row['shards']} | {row['documents']:,} | {a['median']:.1f} ({a['min']:.1f}-{a['max']:.1f}) | "
                     f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | **{row['ratio']:.2f}** | "
                     f"{row['documents'] / d['median']:,.0f} |")
    if len(table) >= 2:
        lo, hi = table[0], table[-1]
        per = {ex: (hi[ex]["median"] - lo[ex]["median"]) / (hi["shards"] - lo["shards"]) for ex in ("actors", "ray_data")}
        fixed = {ex: lo[ex]["median"] - per[ex] * lo["shards"] for ex in per}
        lines += ["", "From the two sizes (median seconds = fixed + per shard x shards): "
                  f"plain actors {fixed['actors']:.1f} s + {per['actors']:.2f} s/shard; "
                  f"Ray Data {fixed['ray_data']:.1f} s + {per['ray_data']:.2f} s/shard."]
        meta["fit"] = {"fixed_seconds": fixed, "seconds_per_shard": per}
    out_md.write_text("\n".join(lines) + "\n")
    return {"meta": meta, "table": table, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/scale-cache"))
    ap.add_argument("--shards", default="2,8", help="shard counts (5,000 documents each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-cpus", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS / "map_executor.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from bench.scale import build_inputs

    counts = [int(x) for x in args.shards.split(",")]
    inputs = build_inputs(args.cache, [n * DOCS_PER_SHARD for n in counts], DOCS_PER_SHARD, args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    load_before = round(os.getloadavg()[0], 2)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    runs = []
    with tempfile.TemporaryDirectory(prefix="map-executor-") as scratch:
        for rep in range(args.repeats):
            for n in counts:
                order = ("actors", "ray_data") if rep % 2 == 0 else ("ray_data", "actors")
                for ex in order:
                    r = run_once(ex, n, inputs, args.workers, args.num_cpus, Path(scratch))
                    print(f"repeat {rep}: {ex} {n} shards: {r['seconds']:.1f} s", flush=True)
                    runs.append(r)
    ray.shutdown()
    meta = {"command": "python -m bench.map_executor " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit, "machine": f"{platform.machine()} {os.cpu_count()} cores", "repeats": args.repeats,
            "workers": args.workers, "num_cpus": args.num_cpus, "load_before": load_before,
            "load_after": round(os.getloadavg()[0], 2)}
    out = write_report(runs, meta, args.results)
    args.results.with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
