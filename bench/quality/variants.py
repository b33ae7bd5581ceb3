"""Quad variants against their own random baseline: ``python -m bench.quality.variants``.

Runs ``python -m bench.quality --methods quad --no-oracle`` once per variant (each with the
given extra flags; corpus, models and the random arm come from the shared cache), then writes
one table: per variant, Quad's target/general loss, its paired difference to random on the same
seeds, how much of the budget it filled and the docstring share of its selected documents.

    python -m bench.quality.variants --text-dir /usr/share/doc
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "default": [],
    "clusters-64": ["--clusters", "64"],
    "sample-all": ["--quad-sample-ratio", "1.0"],
    "blocks-of-2": ["--quad-block-size", "2", "--quad-sample-ratio", "0.5"],
    "tau-top-50%": ["--quad-tau-top-fraction", "0.5"],
    "fill-rejected": ["--quad-fill-rejected"],
    "k64+blocks-of-2+fill": ["--clusters", "64", "--quad-block-size", "2", "--quad-sample-ratio", "0.5",
                             "--quad-fill-rejected"],
}


def variant_rows(result: dict) -> dict:
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    seeds = sorted({s for m, s in runs if m == "quad"})
    quad = [runs[("quad", s)] for s in seeds]
    deltas = [runs[("quad", s)]["target_loss"] - runs[("random", s)]["target_loss"] for s in seeds]
    matched = [runs[("quad", s)]["target_loss"] - runs[("random@quad", s)]["target_loss"] if ("random@quad", s) in runs
               else runs[("quad", s)]["target_loss"] - runs[("random", s)]["target_loss"] for s in seeds]
    gdeltas = [runs[("quad", s)]["general_loss"] - runs[("random", s)]["general_loss"] for s in seeds]
    doc_share = [r["selected_sources"].get("docstrings", 0) / max(1, r["documents"]) for r in quad]
    return {"seeds": len(seeds), "target": float(np.mean([r["target_loss"] for r in quad])),
            "target_std": float(np.std([r["target_loss"] for r in quad], ddof=1)) if len(quad) > 1 else 0.0,
            "delta": float(np.mean(deltas)), "delta_std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0,
            "wins": sum(d < 0 for d in deltas), "matched_delta": float(np.mean(matched)),
            "matched_std": float(np.std(matched, ddof=1)) if len(matched) > 1 else 0.0,
            "matched_wins": sum(d < 0 for d in matched), "general_delta": float(np.mean(gdeltas)),
            "selected_tokens": float(np.mean([r["selected_tokens"] for r in quad])),
            "docstring_docs": float(np.mean(doc_share)),
            "rounds": [r.get("quad", {}).get("rounds") for r in quad],
            "stop": [r.get("quad", {}).get("stop_reason") for r in quad]}


def table(rows: dict[str, dict], budget: int) -> str:
    out = ["| variant | flags | seeds | quad target loss | Δ target vs random (paired) | quad wins | "
           "Δ vs random@same tokens | wins | Δ general vs random | budget filled | docstring share of docs | "
           "stop reasons |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        flags = " ".join(VARIANTS.get(name, [])) or "—"
        out.append(f"| {name} | `{flags}` | {r['seeds']} | {r['target']:.4f} ± {r['target_std']:.4f} | "
                   f"{r['delta']:+.4f} ± {r['delta_std']:.4f} | {r['wins']}/{r['seeds']} | "
                   f"{r['matched_delta']:+.4f} ± {r['matched_std']:.4f} | {r['matched_wins']}/{r['seeds']} | "
                   f"{r['general_delta']:+.4f} | "
                   f"{r['selected_tokens'] / budget:.0%} | {r['docstring_docs']:.0%} | "
                   f"{', '.join(str(s) for s in r['stop'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.variants", description=__doc__.split("\n")[0])
    p.add_argument("--text-dir", action="append", default=[])
    p.add_argument("--out", default="bench/.cache/quality")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    parts = Path(args.results) / "quad_variants"
    rows, budget = {}, None
    t0 = time.time()
    for name in names:
        stem = "v_" + "".join(c if c.isalnum() else "_" for c in name)
        cmd = [sys.executable, "-m", "bench.quality", "--methods", "quad", "--no-oracle", "--matched-random",
               "--seeds", str(args.seeds),
               "--out", args.out, "--results", str(parts), "--name", stem,
               *[a for d in args.text_dir for a in ("--text-dir", d)], *VARIANTS[name]]
        print(f"[{time.strftime('%H:%M:%S')}] variant {name}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        result = json.loads((parts / f"{stem}.json").read_text())
        budget = result["settings"]["budget_tokens"]
        rows[name] = variant_rows(result)
    md = ["# Quad variants vs random (quality bench)", "", "Reproduce:", "", "```bash",
          "python -m bench.quality.variants " + shlex.join(argv if argv is not None else sys.argv[1:]), "```", "",
          f"Each variant is one `python -m bench.quality --methods quad --no-oracle` run (per-variant files in "
          f"`{parts.name}/`); {time.time() - t0:.0f} s of wall time. Δ = quad − random target loss on the same seed "
          "(same init, same selection seed): negative is better. random@same tokens = random documents up to the "
          "tokens Quad selected on that seed (a prefix of the same random order); where Quad filled >= 98% of the "
          "budget it is the plain random arm.", "", table(rows, budget), ""]
    out = Path(args.results) / "quad_variants.md"
    out.write_text("\n".join(md))
    (Path(args.results) / "quad_variants.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
