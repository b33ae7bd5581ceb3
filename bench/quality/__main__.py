"""python -m bench.quality — select with every method at one budget, train a tiny LM on each, compare.

Writes bench/results/quality.{md,json,png}. Intermediate artefacts (corpus, models, work dirs,
per-run results) are cached under --out, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from bench.quality.corpus import TARGETS
from bench.quality.run import METHODS, BenchSettings, run_bench


def _tau(value: str):
    try:
        return float(value)
    except ValueError:
        return value
from bench.quality.train import TrainSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/.cache/quality", help="cache folder (corpus, models, work dirs)")
    p.add_argument("--results", default="bench/results", help="where quality.md/.json/.png go")
    p.add_argument("--name", default="quality", help="results file stem")
    p.add_argument("--target", default="docstrings", choices=TARGETS, help="the target domain (reference, "
                   "test and oracle sets come from it)")
    p.add_argument("--text-dir", action="append", default=[], help="extra text folder (repeatable), "
                   "e.g. /usr/share/doc: README/NEWS/FAQ/*.txt/*.md, .gz decompressed")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (selection seed = training seed)")
    p.add_argument("--budget-tokens", type=int, default=90_000)
    p.add_argument("--steps", type=int, default=100, help="training steps of every arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-windows", choices=("epochs", "random"), default="epochs",
                   help="epochs: every window of the selection once per epoch (default); random: windows at "
                        "random positions, the first protocol (order-sensitive, see bench/quality/train.py)")
    p.add_argument("--proxy-steps", type=int, default=150)
    p.add_argument("--max-docs-per-source", type=int, default=400)
    p.add_argument("--max-text-dir-docs", type=int, default=300)
    p.add_argument("--low-quality", type=int, default=240, help="synthetic low-quality documents")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--embed-tokens", type=int, default=256, help="MiniLM window (tokens) for quad/exploration-only")
    p.add_argument("--quad-accept", choices=("block", "documents", "two_stage"), default=None,
                   help="quad: what is kept (default: the job default)")
    p.add_argument("--quad-tau", default=None, help="quad: auto | quantile | validate | a number (default: job default)")
    p.add_argument("--quad-tau-slack", type=float, default=None)
    p.add_argument("--quad-alpha", type=float, default=None)
    p.add_argument("--quad-reward", choices=("pass_fraction", "clipped"), default=None)
    p.add_argument("--quad-warmup", type=int, default=64)
    p.add_argument("--quad-arms-per-round", type=int, default=2)
    p.add_argument("--quad-tau-top-fraction", type=float, default=0.2)
    p.add_argument("--quad-sample-ratio", type=float, default=0.25)
    p.add_argument("--quad-block-size", type=int, default=8)
    p.add_argument("--quad-fill-rejected", action="store_true",
                   help="quad: fill the budget from rejected blocks when every arm is exhausted (not in the paper)")
    p.add_argument("--quad-neighbour-radius", type=float, default=None,
                   help="quad: spread rewards to clusters whose centroid cosine distance is below this "
                        "(default: the job default, 0.2); also widens the clustering stage's neighbour list")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--matched-random", action="store_true",
                   help="also train random@<method> on random documents up to the tokens an under-filling method selected")
    p.add_argument("--notes", default="", help="Markdown file appended to the results (findings)")
    args = p.parse_args(argv)

    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    s = BenchSettings(out=str(Path(args.out).resolve()), text_dirs=args.text_dir, methods=methods, seeds=tuple(range(args.seeds)),
                      budget_tokens=args.budget_tokens, max_docs_per_source=args.max_docs_per_source,
                      max_text_dir_docs=args.max_text_dir_docs, n_low_quality=args.low_quality,
                      proxy_steps=args.proxy_steps, clusters=args.clusters, oracle=not args.no_oracle,
                      matched_random=args.matched_random,
                      train=TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                          lr=args.lr, windows=args.train_windows),
                      target=args.target, embed_tokens=args.embed_tokens,
                      quad={"block_size": args.quad_block_size, "warmup_size": args.quad_warmup,
                            "arms_per_round": args.quad_arms_per_round,
                            "sample_ratio": args.quad_sample_ratio, "tau_top_fraction": args.quad_tau_top_fraction,
                            **{k: v for k, v in (("accept", args.quad_accept), ("tau_slack", args.quad_tau_slack),
                                                 ("alpha", args.quad_alpha), ("reward", args.quad_reward))
                               if v is not None},
                            **({"tau": _tau(args.quad_tau)} if args.quad_tau is not None else {}),
                            **({"fill_rejected": True} if args.quad_fill_rejected else {}),
                            **({"neighbour_radius": args.quad_neighbour_radius}
                               if args.quad_neighbour_radius is not None else {})})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    # One local Ray for every selection run (oversubscribed logical CPUs: see docs on actor pools).
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        result = run_bench(s)
    finally:
        ray.shutdown()
    from bench.quality.report import table_markdown, write_results

    notes = Path(args.notes).read_text() if args.notes else ""
    command = "python -m bench.quality " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    path = write_results(result, args.results, command, name=args.name, notes=notes)
    print(table_markdown(result["summary"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
