"""A self-contained HTML report of a selection manifest (figures inline, no external assets).

    write_report("<root>/manifests/<run_id>", "report.html")

Sections (each an ``<h2>`` with one figure, a PNG embedded as a ``data:`` URI):

1. Arm pulls per round — which clusters the bandit pulled each round, selected or not;
2. Reward per round — the bounded reward of every pull (pass fraction, or clipped normalised mean) and the round mean;
3. Influence of accepted vs rejected samples — histograms of the sampled documents'
   influence for selected and rejected blocks, with tau;
4. Selected tokens per cluster — from the manifest's rows (the truth for every method);
5. Budget over rounds — selected tokens after each round against the budget (a final
   ``fill`` record, see ``QuadConfig.fill_rejected``, is the last step).

The Quad round log comes from ``manifest.json["quad"]["history"]`` (what
:meth:`selector.quad.loop.QuadSelector.summary` returns, stored by the job under ``"quad"``) or
the ``history`` argument. A manifest without one (e.g. ``random``) still gets every heading:
per-cluster tokens come from the rows, and the round-log figures say why they are absent.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from selector.data.manifest import read_manifest
from selector.data.workdir import atomic_write_bytes, open_fs

SECTIONS = (
    ("pulls", "Arm pulls per round"),
    ("reward", "Reward per round"),
    ("influence", "Influence of accepted vs rejected samples"),
    ("clusters", "Selected tokens per cluster"),
    ("budget", "Budget over rounds"),
)
TOP_CLUSTERS = 40  # bars shown in the per-cluster figure (the rest are summed into "other")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 8.0, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def _bandit_rounds(history: Sequence[dict]) -> list[dict]:
    return [h for h in history if h.get("kind") in ("bandit", "expand")]


def _fig_pulls(rounds: list[dict]) -> str:
    fig, ax = _figure()
    for selected, colour, label in ((True, "tab:green", "selected block"), (False, "tab:gray", "rejected block")):
        xs = [h["round"] for h in rounds for a, s in zip(h["arms"], h["selected"]) if s == selected]
        ys = [a for h in rounds for a, s in zip(h["arms"], h["selected"]) if s == selected]
        ax.scatter(xs, ys, s=10, c=colour, label=f"{label} ({len(xs)})", alpha=0.8, linewidths=0)
    ax.set_xlabel("round")
    ax.set_ylabel("cluster (arm)")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def _fig_reward(rounds: list[dict]) -> str:
    fig, ax = _figure()
    xs = [h["round"] for h in rounds for _ in h["reward"]]
    ys = [r for h in rounds for r in h["reward"]]
    ax.scatter(xs, ys, s=8, c="tab:blue", alpha=0.5, linewidths=0, label="pull")
    means = [(h["round"], float(np.mean(h["reward"]))) for h in rounds if h["reward"]]
    if means:
        ax.plot(*zip(*means), c="tab:red", lw=1.2, label="round mean")
    ax.axhline(0.0, c="k", lw=0.8, ls="--", label="tau")
    ax.set_xlabel("round")
    ax.set_ylabel("reward (pass fraction, or clipped (mean - tau) / scale)")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def _fig_influence(rounds: list[dict], tau: float | None, warmup: list[float]) -> str:
    fig, ax = _figure()
    acc = np.array([x for h in rounds for x in h.get("sample_scores_accepted", [])], np.float64)
    rej = np.array([x for h in rounds for x in h.get("sample_scores_rejected", [])], np.float64)
    both = np.concatenate([acc, rej, np.asarray(warmup, np.float64)])
    bins = np.histogram_bin_edges(both, bins=40) if both.size else 10
    if len(warmup):
        ax.hist(warmup, bins=bins, histtype="step", color="k", lw=1, label=f"warm-up ({len(warmup)})")
    ax.hist(rej, bins=bins, alpha=0.6, color="tab:gray", label=f"scored, not kept ({rej.size})")
    ax.hist(acc, bins=bins, alpha=0.6, color="tab:green", label=f"scored and kept ({acc.size})")
    if tau is not None:
        ax.axvline(tau, c="tab:red", lw=1, ls="--", label=f"tau = {tau:.3g}")
    ax.set_xlabel("influence on the reference set")
    ax.set_ylabel("documents")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def _fig_clusters(tokens_by_cluster: dict[int, int]) -> str:
    fig, ax = _figure()
    ranked = sorted(tokens_by_cluster.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked[:TOP_CLUSTERS]
    labels = [str(c) for c, _ in shown]
    values = [v for _, v in shown]
    rest = sum(v for _, v in ranked[TOP_CLUSTERS:])
    if rest:
        labels.append(f"other {len(ranked) - TOP_CLUSTERS}")
        values.append(rest)
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
    ax.set_xlabel("cluster")
    ax.set_ylabel("selected tokens")
    return _png(fig)


def _fig_budget(rounds: list[dict], budget: int | None) -> str:
    fig, ax = _figure()
    xs = [h["round"] for h in rounds]
    ys = [h["budget_used"] for h in rounds]
    ax.step([0] + xs, [0] + ys, where="post", c="tab:blue", label="selected tokens")
    if budget:
        ax.axhline(budget, c="tab:red", lw=1, ls="--", label=f"budget {budget:,}")
    ax.set_xlabel("round")
    ax.set_ylabel("tokens")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _tokens_by_cluster(table, rounds: list[dict]) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    if table.num_rows and table["cluster"].null_count < table.num_rows:
        for c, n in zip(table["cluster"].to_pylist(), table["n_tokens"].to_pylist()):
            if c is not None:
                out[int(c)] += int(n)
        return dict(out)
    for h in rounds:  # no cluster column in the rows: fall back to the round log
        for a, n in zip(h["arms"], h["accepted_tokens"]):
            if n:
                out[int(a)] += int(n)
    return dict(out)


def build_report_html(summary: dict[str, Any], table, history: Sequence[dict] | None = None) -> str:
    """The report page for a manifest's ``summary`` (manifest.json) and rows ``table``."""
    quad = summary.get("quad") or {}
    history = list(history if history is not None else quad.get("history") or [])
    rounds = _bandit_rounds(history)
    warmup = [x for h in history if h.get("kind") == "warmup" for x in h.get("scores", [])]
    tau = quad.get("tau")
    if tau is None:
        tau = next((h.get("tau") for h in history if h.get("kind") == "warmup"), None)
    budget = (summary.get("budget") or {}).get("tokens") or quad.get("budget_tokens")
    method = summary.get("method", "?")
    why = f"No Quad round log in this manifest (method {method})."

    budget_log = [h for h in history if h.get("kind") in ("warmup", "bandit", "expand", "fill") and "budget_used" in h]
    figures: dict[str, str | None] = {
        "pulls": _fig_pulls(rounds) if rounds else None,
        "reward": _fig_reward(rounds) if rounds else None,
        "influence": _fig_influence(rounds, tau, warmup) if rounds or warmup else None,
        "budget": _fig_budget(budget_log, budget) if rounds else None,
    }
    per_cluster = _tokens_by_cluster(table, rounds)
    figures["clusters"] = _fig_clusters(per_cluster) if per_cluster else None
    absent = {k: why for k in ("pulls", "reward", "influence", "budget")}
    absent["clusters"] = "No cluster assignments in this manifest's rows or round log."

    n_tokens = int(sum(table["n_tokens"].to_pylist())) if table.num_rows else 0
    facts = [
        ("run", summary.get("run_id")), ("method", method), ("created", summary.get("created_at")),
        ("documents selected", f"{table.num_rows:,}"), ("tokens selected", f"{n_tokens:,}"),
        ("token budget", f"{budget:,}" if budget else None),
        ("clusters represented", f"{len(per_cluster):,}" if per_cluster else None),
    ]
    if quad:
        facts += [("bandit rounds", quad.get("rounds")), ("stop reason", quad.get("stop_reason")),
                  ("tau", f"{tau:.6g}" if tau is not None else None),
                  ("reward scale", f"{quad['reward_scale']:.6g}" if quad.get("reward_scale") is not None else None),
                  ("documents scored", f"{quad['scored_documents']:,}" if "scored_documents" in quad else None)]
    title = f"Thresher selection report: {summary.get('run_id', '')}"
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td{padding:2px 10px;border-bottom:1px solid #ddd}"
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>", "<table>"]
    for key, value in facts:
        if value is not None:
            parts.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>")
    parts.append("</table>")
    for key, heading in SECTIONS:
        parts.append(f"<h2 id=\"{key}\">{html.escape(heading)}</h2>")
        if figures[key]:
            parts.append(f"<img alt=\"{html.escape(heading)}\" src=\"{figures[key]}\">")
        else:
            parts.append(f"<p><em>{html.escape(absent[key])}</em></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(manifest_uri: str, out_path: str, storage_options: dict | None = None,
                 history: Sequence[dict] | None = None) -> str:
    """Read the committed manifest at ``manifest_uri``, write the HTML report to ``out_path``
    (a path or URI; ``storage_options`` apply to both) and return ``out_path``."""
    manifest = read_manifest(manifest_uri, storage_options, columns=["n_tokens", "cluster"])
    page = build_report_html(manifest.summary, manifest.table, history)
    fs, path = open_fs(out_path, storage_options)
    atomic_write_bytes(fs, path, page.encode("utf-8"))
    return out_path


def report_command(manifest: str, out: str, storage_options: str | dict | None = None) -> str:
    """Body of ``thresher report MANIFEST --out OUT [--storage-options JSON]``; returns the line to print."""
    options = json.loads(storage_options) if isinstance(storage_options, str) else storage_options
    path = write_report(manifest, out, options)
    return f"report: {path}"
