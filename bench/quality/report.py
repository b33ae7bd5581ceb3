"""The results table (Markdown), its JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path


def _pm(mean, std, digits=4):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_markdown(summary: list[dict]) -> str:
    lines = ["| method | seeds | target test loss | Δ target vs random (paired) | Δ vs random@same tokens "
             "| general held-out loss | share of gain | selected tokens | loss tokens | select s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(["oracle", "random"])}
    for r in sorted(summary, key=lambda r: (order.get(r["method"], 2), r["target_mean"])):
        share = "—" if r["share_of_gain"] is None else (
            f"{r['share_of_gain']:+.2f}" + (f" ± {r['share_std']:.2f}" if r.get("share_std") is not None else ""))
        sel = "—" if r["selected_tokens"] is None else f"{r['selected_tokens']:,.0f}"
        delta = "—" if r.get("delta_vs_random") is None or r["method"] == "random" else (
            f"{r['delta_vs_random']:+.4f}" + (f" ± {r['delta_std']:.4f}" if r.get("delta_std") is not None else ""))
        matched = "—" if r.get("delta_vs_matched") is None else (
            f"{r['delta_vs_matched']:+.4f}" + (f" ± {r['matched_std']:.4f}" if r.get("matched_std") is not None else ""))
        lines.append(f"| {r['method']} | {r['seeds']} | {_pm(r['target_mean'], r['target_std'])} | {delta} | {matched} | "
                     f"{_pm(r['general_mean'], r['general_std'])} | {share} | {sel} | {r['kept_tokens']:,.0f} | "
                     f"{r['select_s']:.0f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary, key=lambda r: r["target_mean"])
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "target", "target test loss (docstrings)"),
                           (axes[1], "general", "general held-out loss")):
        means = [r[f"{key}_mean"] for r in rows]
        stds = [r[f"{key}_std"] for r in rows]
        colors = ["#2a9d8f" if n == "oracle" else "#999999" if n == "random" else "#e76f51" if "quad" in n
                  else "#457b9d" for n in names]
        ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=3)
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        ax.set_xlim(lo - 0.15 * (hi - lo) - 1e-3, hi + 0.15 * (hi - lo) + 1e-3)
        rnd = [r[f"{key}_mean"] for r in rows if r["method"] == "random"]
        if rnd:
            ax.axvline(rnd[0], color="#555555", ls="--", lw=1)
        ax.set_xlabel(f"{label} (mean ± std; lower is better)")
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
    plot(result["summary"], out / f"{name}.png",
         f"{s['budget_tokens']:,} budget tokens, {s['train']['steps']} steps, seeds {s['seeds']}")
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
          f"* Target domain: CPython docstrings. Reference set {d['reference_docs']} docs (seen by the selectors), "
          f"test set {d['test_docs']} docs ({d['target_eval_tokens']:,} tokens), oracle pool {d['oracle_pool_docs']} "
          f"docs, general held-out {d['general_docs']} docs ({d['general_eval_tokens']:,} tokens) drawn from the "
          "non-target real sources.",
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
