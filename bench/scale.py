"""Scale benchmark: the full random and quad jobs on synthetic corpora of growing size.

    python -m bench.scale --sizes 10000,30000,100000 --methods random,quad --cache /work/scale-cache
    python -m bench.scale --merge --resume --sizes 10000000 --methods quad --cache /work/scale-cache

``--merge`` keeps the results file's rows of other sizes and methods. ``--resume`` lets a job longer
than one sitting run in pieces: a killed piece leaves its work dir and a heartbeat (log lines with
their times, peak memory so far; written every 5 s), and the next ``--resume`` invocation continues
the job from the work dir (finished shards and rounds are skipped) and adds the pieces up
(:func:`combine_pieces`; up to 5 s of each killed piece's end is not counted).

For each size the corpus is the first ``ceil(n / docs_per_shard)`` shards of one synthetic pool
(bench/synthetic_corpus.py; hard links, so sizes share their shards), the models are tiny and
built from configs (a BPE tokenizer trained on the pool, a 2-layer BERT encoder and a 2-layer
Llama proxy with seeded random weights: their cost per token is what matters here, not their
quality), and the reference set is a separate sample of the docstrings domain.

Each job runs from scratch (fresh work dir) in its own subprocess, so the driver measured is the
job's driver and nothing is cached between sizes. In that subprocess a sampler thread reads, every
0.25 s, the resident memory (psutil RSS) of the driver process and of every worker process of the
local Ray the job starts (the driver's descendants, so other Ray sessions on the machine are not
counted), grouped by the actor class Ray writes into the process title (``ray::BanditActor...``); the
driver's peak is also taken from ``getrusage`` at the end. Stage times are the gaps between the
job's own log lines (``indexed ...``, ``embed: ...``, ``cluster: ...``, ``quad: stopped ...``,
``manifest: ...``): each line closes the stage it reports.

Writes ``bench/results/scale.json``, ``scale.md`` and ``scale.png`` (log-log: stage seconds and
peak memory against documents, with the fitted slope of each line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# log-line prefix -> the stage the line closes
STAGE_LINES = [("workers:", "start-up"), ("run ", "start-up"), ("indexed ", "index"), ("embed:", "embed"),
               ("cluster:", "cluster"), ("cluster queues:", "cluster queues"),
               ("reference: fitting", "influence setup"), ("reference: query", "K-FAC factors + query"),
               ("quad: stopped", "quad rounds"), ("selected ", "selection"), ("manifest:", "manifest commit")]


# --------------------------------------------------------------------------- inputs


def build_inputs(cache: Path, sizes: list[int], docs_per_shard: int, seed: int, log=print) -> dict:
    """The shard pool, one hard-linked corpus folder per size, the reference set and the models."""
    from bench.synthetic_corpus import fit_domain_models, shard_documents, write_corpus

    models = None
    pool = cache / f"pool-{docs_per_shard}-s{seed}"
    started = time.monotonic()
    if not all((pool / f"shard-{i:06d}.parquet").exists() for i in range(-(-max(sizes) // docs_per_shard))):
        models = fit_domain_models()
    shards = write_corpus(pool, max(sizes), docs_per_shard, seed, models, log=log)
    generated = time.monotonic() - started
    corpora = {}
    for n in sizes:
        d = cache / f"corpus-{n}"
        need = shards[:-(-n // docs_per_shard)]
        if n % docs_per_shard:
            raise SystemExit(f"size {n} is not a multiple of --docs-per-shard {docs_per_shard}")
        d.mkdir(parents=True, exist_ok=True)
        for s in need:
            if not (d / s.name).exists():
                os.link(s, d / s.name)
        corpora[n] = str(d)

    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = cache / "reference" / "ref.parquet"
    tok_dir, enc_dir, proxy_dir = cache / "tokenizer", cache / "encoder", cache / "proxy"
    if not ref.exists():
        models = models or fit_domain_models()
        cols = shard_documents({k: models["docstrings"] for k in models}, 10**6, 64, seed)
        ref.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": cols["text"]}), ref)
    if not (proxy_dir / "config.json").exists():
        from selector.demo.proxy_models import build_causal_lm, build_encoder, train_bpe_tokenizer

        texts = pq.read_table(shards[0], columns=["text"])["text"].to_pylist()[:3000]
        train_bpe_tokenizer(texts, tok_dir, vocab_size=1024)
        build_encoder(tok_dir, enc_dir, hidden_size=32, num_layers=2)
        build_causal_lm(tok_dir, proxy_dir, hidden_size=64, num_layers=2, max_positions=512)
    return {"corpora": corpora, "reference": str(ref.parent), "tokenizer": str(tok_dir), "encoder": str(enc_dir),
            "proxy": str(proxy_dir), "generate_seconds": round(generated, 1)}


def job_config(method: str, n: int, inputs: dict, work: Path, seed: int) -> dict:
    cfg = {"method": method, "seed": seed, "tokenizer": inputs["tokenizer"],
           "corpus": {"uri": inputs["corpora"][n], "id_column": "id"},
           "work": {"root": str(work)}, "budget": {"fraction": 0.05}}
    if method in ("quad", "topk-influence", "exploration-only"):
        cfg["embed"] = {"model": inputs["encoder"], "max_tokens": 128}
        # ~1,000 documents per cluster, as the Quad paper's 600M documents in ~10,000 clusters is ~60,000
        cfg["cluster"] = {"k": max(16, n // 1000), "seed": seed}
    if method in ("quad", "topk-influence"):
        cfg["proxy_model"] = inputs["proxy"]
        cfg["reference"] = {"uri": inputs["reference"]}
    return cfg


# --------------------------------------------------------------------------- one job, measured


class MemorySampler(threading.Thread):
    """Peak RSS of this process and of each Ray worker process class, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.25, report_every: float = 5.0):
        import psutil  # here, not in run(): a missing psutil must fail the run, not silently empty the table

        super().__init__(daemon=True)
        self.interval, self.peaks, self.stop = interval, {}, threading.Event()
        self.process = psutil.Process()
        self.on_sample, self.report_every = None, report_every

    def run(self):
        me = self.process
        reported = time.monotonic()
        while not self.stop.is_set():
            if self.on_sample is not None and time.monotonic() - reported >= self.report_every:
                self.on_sample()
                reported = time.monotonic()
            self._note("driver", me)
            # only this job's local Ray: its raylet is the driver's child, the workers the raylet's
            for proc in me.children(recursive=True):
                try:
                    cmd = proc.cmdline()
                except Exception:  # ended meanwhile
                    continue
                if cmd and cmd[0].startswith("ray::"):
                    # "ray::<actor name>:<Class>.<method>" or "ray::<Class>" or "ray::IDLE"
                    title = cmd[0][5:].split(" ")[0]
                    self._note(title.rsplit(":", 1)[-1].split(".")[0] or "worker", proc)
            self.stop.wait(self.interval)

    def _note(self, name: str, proc) -> None:
        try:
            rss = proc.memory_info().rss
        except Exception:  # the process ended between listing and reading
            return
        self.peaks[name] = max(self.peaks.get(name, 0), rss)


def timed_log():
    """``(marks, log, started)``: ``log(message)`` prints the line and records ``(seconds since
    started, message)`` in ``marks`` (what :func:`stage_seconds` reads)."""
    marks: list[tuple[float, str]] = []
    started = time.monotonic()

    def log(message: str) -> None:
        marks.append((time.monotonic() - started, str(message)))
        print(message, flush=True)

    return marks, log, started


def stage_seconds(marks: list[tuple[float, str]], total: float, lines) -> dict[str, float]:
    """Seconds per stage from ``(time, log line)`` marks: a line starting with a prefix of ``lines``
    closes its stage (a stage of None closes nothing); ``other`` is what no line closed (start-up
    of Ray and actors, untimed tails)."""
    stages, previous = {}, 0.0
    for at, message in marks:
        for prefix, stage in lines:
            if message.startswith(prefix):
                if stage is not None:
                    stages[stage] = round(stages.get(stage, 0.0) + at - previous, 2)
                    previous = at
                break
    stages["other"] = round(total - sum(stages.values()), 2)
    return stages


def run_one(config_path: Path, metrics_path: Path) -> None:
    from ray_jobs.select import run
    from selector.config import load_config
    from selector.data.manifest import read_manifest

    config = load_config(config_path)
    marks, log, started = timed_log()
    heartbeat = metrics_path.with_suffix(".piece.json")  # what a killed piece leaves behind

    sampler = MemorySampler()
    sampler.on_sample = lambda: _write_json(heartbeat, {
        "seconds": round(time.monotonic() - started, 1), "marks": list(marks), "peak_rss_bytes": dict(sampler.peaks)})
    sampler.start()
    uri = run(config, progress=False, log=log)
    total = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    manifest = read_manifest(uri, columns=["doc_id"])
    stages = stage_seconds(marks, total, STAGE_LINES)
    peaks = dict(sampler.peaks)
    peaks["driver"] = max(peaks.get("driver", 0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    metrics_path.write_text(json.dumps({
        "seconds": round(total, 1), "stages": stages, "peak_rss_bytes": peaks, "selected": len(manifest),
        "summary_stages": manifest.summary.get("stages", {}), "log": [m for _, m in marks],
        "marks": marks}, indent=1, default=str))
    heartbeat.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


def closing_stage(message: str) -> str | None:
    """The stage a job log line closes (:data:`STAGE_LINES`), or None."""
    return next((stage for prefix, stage in STAGE_LINES if message.startswith(prefix)), None)


def combine_pieces(pieces: list[dict]) -> dict:
    """One job's stage seconds from its pieces (``--resume``; each ``{"seconds", "marks", "peak_rss_bytes"}``,
    the last one finished). A killed piece's time after its last line was spent in the stage it was in:
    it goes to the next line, in a later piece, that closes a stage after that piece's last one (the
    stages a later piece re-closes on the way, start-up and the skipped ones, are the cost of resuming
    and stay theirs). Peaks are the maximum over the pieces."""
    order = list(dict.fromkeys(stage for _, stage in STAGE_LINES))
    stages: dict[str, float] = {}
    carry, killed_after = 0.0, None
    for i, piece in enumerate(pieces):
        previous, last = 0.0, None
        for at, message in piece["marks"]:
            stage = closing_stage(message)
            if stage is None:
                continue
            seconds, previous, last = at - previous, at, stage
            if carry and (killed_after is None or order.index(stage) > order.index(killed_after)):
                seconds, carry = seconds + carry, 0.0
            stages[stage] = round(stages.get(stage, 0.0) + seconds, 2)
        tail = piece["seconds"] - previous
        if i < len(pieces) - 1:
            carry, killed_after = carry + tail, last if carry == 0 else killed_after
        else:
            stages["other"] = round(stages.get("other", 0.0) + tail + carry, 2)
    peaks: dict[str, int] = {}
    for piece in pieces:
        for proc, b in piece["peak_rss_bytes"].items():
            peaks[proc] = max(peaks.get(proc, 0), b)
    return {"seconds": round(sum(p["seconds"] for p in pieces), 1), "stages": stages, "peak_rss_bytes": peaks,
            "pieces": len(pieces)}


def measure(method: str, n: int, inputs: dict, cache: Path, seed: int, log=print, resume: bool = False) -> dict:
    """One job, from a fresh work dir in its own process. ``resume``: continue the work dir a killed
    piece of the same job left (its heartbeats in ``pieces-<method>-<n>.json``) and combine the pieces."""
    work = cache / f"work-{method}-{n}"
    cfg_path, metrics = cache / f"job-{method}-{n}.json", cache / f"metrics-{method}-{n}.json"
    pieces_path = cache / f"pieces-{method}-{n}.json"
    heartbeat = metrics.with_suffix(".piece.json")
    killed = json.loads(pieces_path.read_text()) if resume and pieces_path.exists() else []
    if resume and heartbeat.exists():  # the previous piece was killed: keep what it measured
        killed.append(json.loads(heartbeat.read_text()))
        heartbeat.unlink()
    if not killed:
        shutil.rmtree(work, ignore_errors=True)
    if resume:
        _write_json(pieces_path, killed)
    metrics.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(job_config(method, n, inputs, work, seed)))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    load_before = os.getloadavg()[0]
    with open(cache / f"log-{method}-{n}.txt", "a" if killed else "w") as out:
        done = subprocess.run([sys.executable, "-m", "bench.scale", "--run-one", str(cfg_path), str(metrics)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{method} at {n:,} documents failed (exit {done.returncode}); see "
                         f"{cache / f'log-{method}-{n}.txt'}")
    result = json.loads(metrics.read_text())
    if killed:
        result.update(combine_pieces([*killed, result]))
        log(f"{method} {n:,}: combined {len(killed) + 1} pieces")
    pieces_path.unlink(missing_ok=True)
    result = result | {"method": method, "documents": n, "commit": git_commit(),
                                                 "load_before": round(load_before, 2),
                                                 "load_after": round(os.getloadavg()[0], 2)}
    shutil.rmtree(work, ignore_errors=True)  # the work dir of a 1e7 run is large
    log(f"{method} {n:,}: {result['seconds']:.0f} s, driver {result['peak_rss_bytes']['driver'] / 2**20:.0f} MiB, "
        f"stages {result['stages']}")
    return result


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def merge_results(previous: dict, results: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """``--merge``: the previous invocation's rows for the (method, documents) not measured now, then
    this invocation's; each row keeps the commit it ran at, and the meta lists every invocation."""
    measured = {(r["method"], r["documents"]) for r in results}
    kept = [r for r in previous.get("results", []) if (r["method"], r["documents"]) not in measured]
    runs = previous.get("meta", {}).get("invocations") or ([previous["meta"]] if previous.get("meta") else [])
    meta = dict(meta, invocations=[*runs, {k: v for k, v in meta.items() if k != "invocations"}],
                notes=previous.get("meta", {}).get("notes", []))
    return kept + results, meta


# --------------------------------------------------------------------------- report


def slope(xs, ys) -> float | None:
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ok = (xs > 0) & (ys > 0)
    if ok.sum() < 2:
        return None
    return float(np.polyfit(np.log(xs[ok]), np.log(ys[ok]), 1)[0])


def mib(b) -> str:
    return f"{b / 2**20:,.0f}"


def write_report(results: list[dict], meta: dict, out_md: Path) -> None:
    methods = sorted({r["method"] for r in results}, key=["random", "quad"].index)
    runs = meta.get("invocations") or [meta]
    lines = ["# Scale benchmark", "", *(f"Command: `{m['command']}` at commit `{m['commit']}`, "
                                         f"{m['wall_minutes']:.1f} min" for m in runs), "",
             f"{meta['machine']}; each row's commit is in its table "
             f"(synthetic corpus generated in {meta['generate_seconds']} s, cached between invocations). "
             "Budget 5% of the corpus tokens; quad: k = max(16, n / 1000) clusters, encoder window 128 tokens; "
             "tiny random-weight models (bench/scale.py docstring). Each job ran from a fresh work dir in its own "
             "process; memory is the peak RSS (psutil, sampled every 0.25 s; driver also getrusage).", ""]
    for method in methods:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["documents"])
        stages = list(dict.fromkeys(s for _, s in STAGE_LINES if any(s in r["stages"] for r in rows))) + ["other"]
        procs = sorted({p for r in rows for p in r["peak_rss_bytes"]}, key=lambda p: (p != "driver", p))
        lines += [f"## {method}", "", "Seconds per stage (documents/s in brackets where the stage reads every document):",
                  "", "| documents | total s | " + " | ".join(stages) + " | load avg before/after | commit |",
                  "|---:|---:|" + "---:|" * len(stages) + "---|---|"]
        for r in rows:
            cells = []
            for s in stages:
                sec = r["stages"].get(s)
                if sec is None:
                    cells.append("")
                elif s in ("index", "embed", "cluster") and sec > 0:
                    cells.append(f"{sec:.1f} ({r['documents'] / sec:,.0f}/s)")
                else:
                    cells.append(f"{sec:.1f}")
            lines.append(f"| {r['documents']:,} | {r['seconds']:.0f} | " + " | ".join(cells) +
                         f" | {r['load_before']} / {r['load_after']} | {r.get('commit', '')}"
                         + (f" ({r['pieces']} pieces, resumed)" if r.get("pieces", 1) > 1 else "") + " |")
        lines.append("| log-log slope | " + (f"{slope([r['documents'] for r in rows], [r['seconds'] for r in rows]):.2f}"
                                             if len(rows) > 1 else "") + " | " +
                     " | ".join(f"{slope([r['documents'] for r in rows], [r['stages'].get(s, 0) for r in rows]):.2f}"
                                if len(rows) > 1 and slope([r['documents'] for r in rows],
                                                           [r['stages'].get(s, 0) for r in rows]) is not None else ""
                                for s in stages) + " | | |")
        lines += ["", "Peak resident memory, MiB (process classes as Ray names them):", "",
                  "| documents | " + " | ".join(procs) + " |", "|---:|" + "---:|" * len(procs)]
        for r in rows:
            lines.append(f"| {r['documents']:,} | " + " | ".join(mib(r['peak_rss_bytes'].get(p, 0)) if p in
                                                                r['peak_rss_bytes'] else "" for p in procs) + " |")
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            growth = {p: last["peak_rss_bytes"][p] / first["peak_rss_bytes"][p] for p in procs
                      if p in first["peak_rss_bytes"] and p in last["peak_rss_bytes"]}
            lines.append(f"| growth {first['documents']:,} -> {last['documents']:,} | " +
                         " | ".join(f"{growth[p]:.2f}x" if p in growth else "" for p in procs) + " |")
        lines.append("")
    lines += [f"![stage seconds and peak memory against documents]({out_md.stem}.png)", ""]
    out_md.write_text("\n".join(lines + meta.get("notes", [])) + "\n")


def plot(results: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in results})
    fig, axes = plt.subplots(len(methods), 2, figsize=(12, 4.5 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        rs = sorted((r for r in results if r["method"] == method), key=lambda r: r["documents"])
        n = [r["documents"] for r in rs]
        ax = axes[row][0]
        for stage in ["total"] + list(dict.fromkeys(s for _, s in STAGE_LINES)) + ["other"]:
            ys = [r["seconds"] if stage == "total" else r["stages"].get(stage, 0) for r in rs]
            if max(ys) <= 0:
                continue
            k = slope(n, ys)
            ax.loglog(n, ys, "o-", lw=2.5 if stage == "total" else 1.2,
                      label=f"{stage} (slope {k:.2f})" if k is not None else stage)
        ax.set(title=f"{method}: seconds per stage", xlabel="documents", ylabel="seconds")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        for proc in sorted({p for r in rs for p in r["peak_rss_bytes"]}):
            pts = [(r["documents"], r["peak_rss_bytes"][proc] / 2**20) for r in rs if proc in r["peak_rss_bytes"]]
            k = slope(*zip(*pts)) if len(pts) > 1 else None
            ax.loglog(*zip(*pts), "o-", lw=2.5 if proc in ("driver", "BanditActor") else 1.0,
                      label=f"{proc} (slope {k:.2f})" if k is not None else proc)
        ax.set(title=f"{method}: peak resident memory", xlabel="documents", ylabel="MiB")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-one", nargs=2, metavar=("CONFIG", "METRICS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated document counts")
    parser.add_argument("--methods", default="random,quad")
    parser.add_argument("--docs-per-shard", type=int, default=5_000)
    parser.add_argument("--cache", default=str(ROOT / ".scale-cache"), help="pool, models, per-run logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(RESULTS / "scale.md"))
    parser.add_argument("--resume", action="store_true",
                        help="continue a job whose previous piece was killed (its work dir and heartbeats are kept)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results file's rows for the sizes and methods not measured now")
    args = parser.parse_args(argv)
    if args.run_one:
        run_one(Path(args.run_one[0]), Path(args.run_one[1]))
        return 0
    started = time.monotonic()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    inputs = build_inputs(cache, sizes, args.docs_per_shard, args.seed)
    results = []
    for method in args.methods.split(","):
        for n in sizes:
            results.append(measure(method, n, inputs, cache, args.seed, resume=args.resume))
    meta = {"command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "machine": f"{platform.machine()} {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "wall_minutes": (time.monotonic() - started) / 60, "generate_seconds": inputs["generate_seconds"]}
    out_md = Path(args.results)
    if args.merge and out_md.with_suffix(".json").exists():
        results, meta = merge_results(json.loads(out_md.with_suffix(".json").read_text()), results, meta)
    out_md.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_report(results, meta, out_md)
    plot(results, out_md.with_suffix(".png"))
    print(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
