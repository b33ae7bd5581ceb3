"""Refresh at scale: adding 10% new shards to a corpus, timed against a full run over the result.

    python -m bench.scale_refresh --size 1000000 --methods random,quad --cache /work/scale-cache

Inputs are bench/scale.py's (the synthetic shard pool, the tiny tokenizer, encoder and proxy, the
reference set; built there and cached). For each method, three jobs, each in its own subprocess
(a fresh local Ray, as a nightly job gets):

1. *base*: the first refresh of a lineage over the corpus folder holding the first 90% of the
   size's shards (a full run: every shard indexed, embedded, clustered; Quad logs its scores);
2. *refresh*: the remaining 10% of the shards are linked into that folder and the refresh runs
   again (the measured refresh: only the new shards are indexed and embedded, the centroids are
   kept unless the drift exceeds the default threshold, the bandit is carried and Quad looks up
   the previous run's influence scores);
3. *full*: ``ray_jobs.select.run`` over all the shards in a fresh work root (the baseline).

Stage times are the gaps between the jobs' log lines (bench/scale.py ``STAGE_LINES``, plus the
refresh's own lines). Writes ``bench/results/scale_refresh.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def stage_lines():
    from bench.scale import STAGE_LINES

    return [("refresh: shards", "change detection"), ("refresh: bandit seeded", "bandit carry"),
            ("refresh: score cache", "score cache"), ("refresh: ", None)] + STAGE_LINES


def run_one(kind: str, config_path: Path, metrics_path: Path) -> None:
    from bench.scale import stage_seconds, timed_log
    from ray_jobs.refresh import refresh
    from ray_jobs.select import run
    from selector.config import load_config
    from selector.data.manifest import read_manifest
    from selector.data.refresh import RefreshConfig

    config = load_config(config_path)
    marks, log, started = timed_log()

    if kind == "full":
        uri = run(config, progress=False, log=log)
    else:
        uri = refresh(RefreshConfig(), config, progress=False, log=log)
    total = time.monotonic() - started
    manifest = read_manifest(uri, columns=["doc_id"])
    stages = stage_seconds(marks, total, stage_lines())
    summary = manifest.summary
    metrics_path.write_text(json.dumps({
        "seconds": round(total, 1), "stages": stages, "selected": len(manifest),
        "refresh": {k: (summary.get("refresh") or {}).get(k) for k in ("changes", "cluster", "bandit_carry",
                                                                        "score_cache")},
        "summary_stages": summary.get("stages", {}), "log": [m for _, m in marks]}, indent=1, default=str))


def _job(kind: str, cfg: dict, cache: Path, tag: str) -> dict:
    cfg_path, metrics = cache / f"job-{tag}.json", cache / f"metrics-{tag}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    load = os.getloadavg()[0]
    with open(cache / f"log-{tag}.txt", "w") as out:
        done = subprocess.run([sys.executable, "-m", "bench.scale_refresh", "--run-one", kind, str(cfg_path),
                               str(metrics)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {done.returncode}); see {cache / f'log-{tag}.txt'}")
    return json.loads(metrics.read_text()) | {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def measure(method: str, n: int, inputs: dict, cache: Path, seed: int, docs_per_shard: int, log=print) -> dict:
    from bench.scale import job_config

    shards = sorted(Path(inputs["corpora"][n]).glob("*.parquet"))
    n_base = len(shards) - max(1, len(shards) // 10)
    folder = cache / f"refresh-corpus-{method}-{n}"
    work_lineage, work_full = cache / f"work-refresh-{method}-{n}", cache / f"work-full-{method}-{n}"
    for d in (folder, work_lineage, work_full):
        shutil.rmtree(d, ignore_errors=True)
    folder.mkdir(parents=True)
    for s in shards[:n_base]:
        os.link(s, folder / s.name)
    cfg = job_config(method, n, inputs, work_lineage, seed)
    cfg["corpus"]["uri"] = str(folder)  # one lineage: the config (corpus uri included) stays the same
    out = {"method": method, "documents": n, "shards": len(shards), "base_shards": n_base}
    out["base"] = _job("refresh", cfg, cache, f"refresh-base-{method}-{n}")
    log(f"{method} {n:,}: base (first refresh, {n_base} shards) {out['base']['seconds']:.0f} s")
    for s in shards[n_base:]:
        os.link(s, folder / s.name)
    out["refresh"] = _job("refresh", cfg, cache, f"refresh-plus10-{method}-{n}")
    log(f"{method} {n:,}: refresh (+{len(shards) - n_base} shards) {out['refresh']['seconds']:.0f} s")
    full = job_config(method, n, inputs, work_full, seed)
    out["full"] = _job("full", full, cache, f"refresh-full-{method}-{n}")
    log(f"{method} {n:,}: full run {out['full']['seconds']:.0f} s")
    out["ratio"] = out["refresh"]["seconds"] / out["full"]["seconds"]
    for d in (work_lineage, work_full, folder):
        shutil.rmtree(d, ignore_errors=True)
    return out


def write_report(results: list[dict], meta: dict, out_md: Path) -> None:
    lines = ["# Refresh at scale: +10% shards against a full run", "", f"Command: `{meta['command']}`", "",
             f"Commit `{meta['commit']}`; {meta['machine']}; wall time {meta['wall_minutes']:.1f} min. Inputs, "
             "models and budget as bench/scale.py (5% of the tokens; quad k = max(16, n / 1000)). Each job in "
             "its own process with a fresh local Ray; default refresh settings (drift threshold 1.25, bandit "
             "decay 0.5).", "",
             "| method | documents | base (first refresh, 90%) s | refresh +10% s | full run s | refresh / full |"
             " drift | refit | arms carried | scores cached / looked up / computed |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        info = r["refresh"]["refresh"]
        cluster, carry, cache = info.get("cluster") or {}, info.get("bandit_carry") or {}, info.get("score_cache") or {}
        quad = r["refresh"]["summary_stages"].get("quad", {})
        cached = (f"{cache.get('cached_scores', 0):,} / {quad.get('cache_hits', 0):,} / {quad.get('cache_misses', 0):,}"
                  if r["method"] == "quad" else "")
        drift = cluster.get("drift")
        lines.append(f"| {r['method']} | {r['documents']:,} | {r['base']['seconds']:.0f} | {r['refresh']['seconds']:.0f}"
                     f" | {r['full']['seconds']:.0f} | **{r['ratio']:.0%}** | "
                     f"{'' if drift is None else f'{drift:.3f}'} | {cluster.get('refit', '')} | "
                     f"{carry.get('carried_arms', '')} | {cached} |")
    lines += ["", "Seconds per stage:", ""]
    for r in results:
        stages = list(dict.fromkeys(s for job in ("full", "refresh") for s in r[job]["stages"]))
        lines += [f"### {r['method']}, {r['documents']:,} documents", "",
                  "| job | total | " + " | ".join(stages) + " | load avg before/after |",
                  "|---|---:|" + "---:|" * len(stages) + "---|"]
        for job in ("full", "base", "refresh"):
            j = r[job]
            lines.append(f"| {job} | {j['seconds']:.0f} | " + " | ".join(
                f"{j['stages'][s]:.1f}" if s in j["stages"] else "" for s in stages) +
                f" | {j['load_before']} / {j['load_after']} |")
        lines.append("")
    out_md.write_text("\n".join(lines + meta.get("notes", [])) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-one", nargs=3, metavar=("KIND", "CONFIG", "METRICS"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=100_000, help="documents after the refresh")
    parser.add_argument("--methods", default="random,quad")
    parser.add_argument("--docs-per-shard", type=int, default=5_000)
    parser.add_argument("--cache", default=str(ROOT / ".scale-cache"), help="bench/scale.py's cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(RESULTS / "scale_refresh.md"))
    args = parser.parse_args(argv)
    if args.run_one:
        run_one(args.run_one[0], Path(args.run_one[1]), Path(args.run_one[2]))
        return 0
    from bench.scale import build_inputs

    started = time.monotonic()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(cache, [args.size], args.docs_per_shard, args.seed)
    results = [measure(m, args.size, inputs, cache, args.seed, args.docs_per_shard) for m in args.methods.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    meta = {"command": "python -m bench.scale_refresh " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit, "machine": f"{platform.machine()} {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "wall_minutes": (time.monotonic() - started) / 60}
    out_md = Path(args.results)
    out_md.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_report(results, meta, out_md)
    print(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
