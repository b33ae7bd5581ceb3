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
    # what is kept (quad.accept)
    "accept-documents": ["--quad-accept", "documents"],
    "accept-two-stage": ["--quad-accept", "two_stage"],
    # the threshold: the pass rate tau: auto aims at (slack x budget share), the paper's fixed top 20%
    # (now on the compared quantity), and the paper's validation procedure
    "tau-slack-1.25": ["--quad-tau-slack", "1.25"],
    "tau-slack-4": ["--quad-tau-slack", "4"],
    "tau-quantile-20%": ["--quad-tau", "quantile"],
    "tau-validate": ["--quad-tau", "validate"],
    # exploration and the reward
    "alpha-0.1": ["--quad-alpha", "0.1"],
    "alpha-2": ["--quad-alpha", "2"],
    "reward-clipped": ["--quad-reward", "clipped"],
    # clusters that follow domains (window of the encoder, more clusters)
    "embed-128": ["--embed-tokens", "128"],
    "clusters-64": ["--clusters", "64"],
}


def stem_of(name: str) -> str:
    """Result file stem of a variant (``v_`` + the name with non-alphanumerics as ``_``)."""
    return "v_" + "".join(c if c.isalnum() else "_" for c in name)


def variant_rows(result: dict) -> dict:
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    seeds = sorted({s for m, s in runs if m == "quad"})
    quad = [runs[("quad", s)] for s in seeds]
    deltas = [runs[("quad", s)]["target_loss"] - runs[("random", s)]["target_loss"] for s in seeds]
    matched = [runs[("quad", s)]["target_loss"] - runs[("random@quad", s)]["target_loss"] if ("random@quad", s) in runs
               else runs[("quad", s)]["target_loss"] - runs[("random", s)]["target_loss"] for s in seeds]
    gdeltas = [runs[("quad", s)]["general_loss"] - runs[("random", s)]["general_loss"] for s in seeds]
    bdeltas = [runs[("quad", s)]["broad_loss"] - runs[("random", s)]["broad_loss"] for s in seeds
               if runs[("quad", s)].get("broad_loss") is not None]
    target = result.get("data", {}).get("target", "docstrings")
    doc_share = [r["selected_sources"].get(target, 0) / max(1, r["documents"]) for r in quad]
    broad = [r["broad_loss"] for r in quad if r.get("broad_loss") is not None]
    return {"seeds": len(seeds), "target": float(np.mean([r["target_loss"] for r in quad])),
            "target_std": float(np.std([r["target_loss"] for r in quad], ddof=1)) if len(quad) > 1 else 0.0,
            "delta": float(np.mean(deltas)), "delta_std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else 0.0,
            "wins": sum(d < 0 for d in deltas), "matched_delta": float(np.mean(matched)),
            "matched_std": float(np.std(matched, ddof=1)) if len(matched) > 1 else 0.0,
            "matched_wins": sum(d < 0 for d in matched), "general_delta": float(np.mean(gdeltas)),
            "broad_delta": float(np.mean(bdeltas)) if bdeltas else None,
            "broad": float(np.mean(broad)) if broad else None,
            "broad_std": float(np.std(broad, ddof=1)) if len(broad) > 1 else 0.0,
            "scored_documents": float(np.mean([r.get("scored_documents") or 0 for r in quad])),
            "purity": float(np.mean([(r.get("cluster_purity") or {}).get("purity") or 0 for r in quad])),
            "selected_tokens": float(np.mean([r["selected_tokens"] for r in quad])),
            "docstring_docs": float(np.mean(doc_share)),
            "rounds": [r.get("quad", {}).get("rounds") for r in quad],
            "stop": [r.get("quad", {}).get("stop_reason") for r in quad],
            "propagations": [r.get("quad", {}).get("propagations") for r in quad]}


def with_earlier_rows(ran: dict[str, dict], parts: Path, train: dict | None = None) -> dict[str, dict]:
    """The rows of the variants just run, plus (for the others) the rows of their last run read back
    from ``parts/<stem>.json``; in ``VARIANTS`` order. Variants with neither are left out, and so is
    a result file trained with other settings than ``train`` (the runs just made), since its losses
    would not compare."""
    rows = dict(ran)
    for name in VARIANTS:
        kept = parts / f"{stem_of(name)}.json"
        if name in rows or not kept.exists():
            continue
        result = json.loads(kept.read_text())
        if train is not None and result.get("settings", {}).get("train") != train:
            print(f"variant {name}: {kept} was trained with other settings; left out of the table (rerun it)")
            continue
        rows[name] = variant_rows(result)
    return {name: rows[name] for name in VARIANTS if name in rows}


def table(rows: dict[str, dict], budget: int) -> str:
    out = ["| variant | flags | seeds | quad target loss | Δ target vs random (paired) | quad wins | "
           "Δ vs random@same tokens | wins | Δ broad vs random | budget filled | target share of docs | "
           "scored docs | cluster purity | stop reasons | reward propagations |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        flags = " ".join(VARIANTS.get(name, [])) or "—"
        out.append(f"| {name} | `{flags}` | {r['seeds']} | {r['target']:.4f} ± {r['target_std']:.4f} | "
                   f"{r['delta']:+.4f} ± {r['delta_std']:.4f} | {r['wins']}/{r['seeds']} | "
                   f"{r['matched_delta']:+.4f} ± {r['matched_std']:.4f} | {r['matched_wins']}/{r['seeds']} | "
                   + ("—" if r.get("broad_delta") is None else f"{r['broad_delta']:+.4f}") + " | "
                   f"{r['selected_tokens'] / budget:.0%} | {r['docstring_docs']:.0%} | "
                   f"{r.get('scored_documents', 0):,.0f} | {r.get('purity', 0):.2f} | "
                   f"{', '.join(str(s) for s in r['stop'])} | "
                   f"{', '.join('—' if n is None else str(n) for n in r.get('propagations', []))} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.variants", description=__doc__.split("\n")[0])
    p.add_argument("--text-dir", action="append", default=[])
    p.add_argument("--out", default="bench/.cache/quality")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--target", default="docstrings")
    p.add_argument("--name", default="quad_variants", help="results file stem (per-variant files go in <name>/)")
    p.add_argument("--only", default="", help="comma-separated variant names to run (default: all); the other "
                   "variants' rows are read back from their result files in quad_variants/, where present")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    parts = Path(args.results) / args.name
    rows, budget, train = {}, None, None
    t0 = time.time()
    for name in names:
        stem = stem_of(name)
        cmd = [sys.executable, "-m", "bench.quality", "--methods", "quad", "--no-oracle", "--matched-random",
               "--seeds", str(args.seeds),
               "--out", args.out, "--results", str(parts), "--name", stem, "--target", args.target,
               *[a for d in args.text_dir for a in ("--text-dir", d)], *VARIANTS[name]]
        print(f"[{time.strftime('%H:%M:%S')}] variant {name}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        result = json.loads((parts / f"{stem}.json").read_text())
        budget, train = result["settings"]["budget_tokens"], result["settings"]["train"]
        rows[name] = variant_rows(result)
    rows = with_earlier_rows(rows, parts, train)
    md = [f"# Quad variants vs random (quality bench, target {args.target})", "", "Reproduce:", "", "```bash",
          "python -m bench.quality.variants " + shlex.join(argv if argv is not None else sys.argv[1:]), "```", "",
          f"Each variant is one `python -m bench.quality --methods quad --no-oracle` run (per-variant files in "
          f"`{parts.name}/`); this invocation ran {', '.join(names)} in {time.time() - t0:.0f} s of wall time"
          + (" (the other rows are read back from their result files)" if set(rows) - set(names) else "")
          + ". Δ = quad − random target loss on the same seed "
          "(same init, same selection seed): negative is better. random@same tokens = random documents up to the "
          "tokens Quad selected on that seed (a prefix of the same random order); where Quad filled >= 98% of the "
          "budget it is the plain random arm.", "", table(rows, budget), ""]
    out = Path(args.results) / f"{args.name}.md"
    out.write_text("\n".join(md))
    (Path(args.results) / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
