"""The results table (Markdown), its JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path


def _pm(mean, std, digits=4):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_markdown(summary: list[dict]) -> str:
    lines = ["| method | seeds | target test loss | Δ target vs random (paired) | Δ vs random@same tokens "
             "| broad held-out loss | general (pooled) | share of gain | selected tokens | loss tokens | scored docs "
             "| cluster purity | select s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(["oracle", "random"])}
    for r in sorted(summary, key=lambda r: (order.get(r["method"], 2), r["target_mean"])):
        share = "—" if r["share_of_gain"] is None else (
            f"{r['share_of_gain']:+.2f}" + (f" ± {r['share_std']:.2f}" if r.get("share_std") is not None else ""))
        sel = "—" if r["selected_tokens"] is None else f"{r['selected_tokens']:,.0f}"
        delta = "—" if r.get("delta_vs_random") is None or r["method"] == "random" else (
            f"{r['delta_vs_random']:+.4f}" + (f" ± {r['delta_std']:.4f}" if r.get("delta_std") is not None else ""))
        matched = "—" if r.get("delta_vs_matched") is None else (
            f"{r['delta_vs_matched']:+.4f}" + (f" ± {r['matched_std']:.4f}" if r.get("matched_std") is not None else ""))
        broad = "—" if r.get("broad_mean") is None else _pm(r["broad_mean"], r["broad_std"])
        scored = "—" if r.get("scored_documents") is None else f"{r['scored_documents']:,.0f}"
        purity = "—" if r.get("cluster_purity") is None else f"{r['cluster_purity']:.2f}"
        lines.append(f"| {r['method']} | {r['seeds']} | {_pm(r['target_mean'], r['target_std'])} | {delta} | {matched} | "
                     f"{broad} | {_pm(r['general_mean'], r['general_std'])} | {share} | {sel} | "
                     f"{r['kept_tokens']:,.0f} | {scored} | {purity} | {r['select_s']:.0f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def _color(name: str) -> str:
    return ("#2a9d8f" if name == "oracle" else "#999999" if name.startswith("random") else "#e76f51" if "quad" in name
            else "#457b9d")


def plot(summary: list[dict], path: str | Path, title: str, target: str = "docstrings",
         tradeoff: list[dict] | None = None) -> None:
    """Left: every method as a point on the (target loss, broad loss) plane, ± seed std, with Quad's
    trade-off curve over its variants (``tradeoff``: summary rows of Quad variants) when given.
    Right: target test loss per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary, key=lambda r: r["target_mean"])
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    ax = axes[0]
    ykey = "broad" if all(r.get("broad_mean") is not None for r in rows) else "general"
    for r in rows:
        ax.errorbar(r["target_mean"], r[f"{ykey}_mean"], xerr=r["target_std"], yerr=r[f"{ykey}_std"], fmt="o",
                    color=_color(r["method"]), capsize=3, ms=6)
        ax.annotate(r["method"], (r["target_mean"], r[f"{ykey}_mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if tradeoff:
        pts = sorted((t["target_mean"], t[f"{ykey}_mean"], t["method"]) for t in tradeoff
                     if t.get(f"{ykey}_mean") is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="#e76f51", lw=1, marker="x",
                label="Quad variants (tau slack / alpha / accept rule)")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"target test loss ({target}; lower is better)")
    ax.set_ylabel(f"{ykey} held-out loss (mean over non-target domains; lower is better)")
    ax.set_title("quality (target) and breadth (broad): lower-left is better", fontsize=10)
    ax = axes[1]
    means = [r["target_mean"] for r in rows]
    stds = [r["target_std"] for r in rows]
    ax.barh(range(len(rows)), means, xerr=stds, color=[_color(n) for n in names], capsize=3)
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    ax.set_xlim(lo - 0.15 * (hi - lo) - 1e-3, hi + 0.15 * (hi - lo) + 1e-3)
    rnd = [r["target_mean"] for r in rows if r["method"] == "random"]
    if rnd:
        ax.axvline(rnd[0], color="#555555", ls="--", lw=1)
    ax.set_xlabel("target test loss (mean ± std over seeds; lower is better)")
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out_dir: str | Path, command: str, name: str = "quality", notes: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(dict(result, command=command), indent=1))
    s, d = result["settings"], result["data"]
    target = d.get("target", "docstrings")
    plot(result["summary"], out / f"{name}.png",
         f"target {target}: {s['budget_tokens']:,} budget tokens, {s['train']['steps']} steps, seeds {s['seeds']}",
         target=target, tradeoff=result.get("tradeoff"))
    code = result.get("code") or {}
    version = (f"commit `{code['commit'][:10]}`" + (" plus uncommitted changes" if code.get("dirty") else "")
               if code.get("commit") else "an unknown commit")
    load = result.get("load_avg_end")
    md = [f"# Quality benchmark: do the selections make a better model?", "",
          "Reproduce:", "", "```bash", command, "```", "",
          f"Ran on {version}; " + (f"{result['runs_from_cache']} of {len(result['runs'])} (method, seed) runs were "
          "read back from the cache of an earlier invocation (their files record its commit), the wall time is this "
          "invocation's." if result.get("runs_from_cache") else "one invocation, every run computed in it.")
          + " Machine: "
          f"shared 2-core CPU; total wall time {result['wall_s'] / 60:.1f} min"
          + (f" (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})." if load else "."), "",
          table_markdown(result["summary"]), "",
          "Share of gain = (random − method) / (random − oracle) on mean target test loss (± its std over "
          "seeds, paired per seed). Δ vs random = method − random target loss on the same seed (same init, "
          "same selection seed), mean ± std over seeds: negative is better. random@<method> (with "
          "--matched-random) trains on random documents up to the tokens <method> selected when it under-filled "
          "the budget: every arm trains for the same steps, so fewer tokens means more repetition, and "
          "Δ vs random@same tokens compares at equal repetition. Loss tokens = tokens whose loss was trained on (token masks drop "
          "the rest; EOS separators included).", "",
          f"![plot]({name}.png)", "",
          "## Setup", "",
          f"* Candidate corpus: {sum(d['sources'].values())} documents: {d['sources']}.",
          f"* Target domain: {target}. Reference set {d['reference_docs']} docs (seen by the selectors), "
          f"test set {d['test_docs']} docs ({d['target_eval_tokens']:,} tokens), oracle pool {d['oracle_pool_docs']} "
          f"docs. Broad held-out: {d.get('broad_domains')} documents per non-target real domain; the broad loss is the "
          f"mean of the per-domain losses; general (pooled) = their union ({d['general_eval_tokens']:,} tokens).",
          "* Scored docs: documents a method ran a model over (influence, losses or gradient features); "
          "cluster purity: token share of each cluster's majority source (quad / exploration-only runs).",
          f"* Budget {s['budget_tokens']:,} tokens. Each arm trains a fresh tiny Llama (hidden {s['hidden_size']}, "
          f"{s['num_layers']} layers; init seeded by the training seed) for {s['train']['steps']} steps × "
          f"{s['train']['batch_size']} × {s['train']['seq_len']} tokens, lr {s['train']['lr']}; "
          + ("its selection is packed in a canonical (seeded hash) order and read in epochs, every window once "
             "per epoch (protocol: bench/quality/train.py)." if s["train"].get("windows", "random") == "epochs"
             else "windows are drawn at random positions of the selection (the first protocol, "
                  "see bench/results/protocol1/README.md)."),
          notes]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return out / f"{name}.md"
