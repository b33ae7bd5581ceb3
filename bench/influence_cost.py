"""Influence benchmark: scoring cost vs a plain forward+backward, and agreement with kronfluence.

Reproduce:  python bench/influence_cost.py            (writes bench/results/influence.md)
            python bench/influence_cost.py --quick    (fewer repeats)

Part 1 (cost): on the same padded batches (8 x 128 tokens of real text), median seconds per
batch of (a) the baseline forward+backward (HF loss, all parameter grads), (b) hook-based
influence scoring sum_t g_t^T M a_t, (c) scoring + cosine norms, (d) projected gradient
features at the default 64 x 64 per block. Ratios are against (a), measured interleaved in
the same run.

Part 2 (kronfluence 1.0.1, installed with --no-deps): same tiny Llama, same fitting and
query data, same scored documents (each exactly one 64-token chunk, no padding), both with
K-FAC, the empirical Fisher and damping 0.1 x mean eigenvalue product. kronfluence tracks
q/k/v as separate modules, so ours is run both with per-module blocks (like for like) and
with the joint QKV block. Reports wall time (fit + score) and Spearman/Pearson.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selector.gradients.influence import InfluenceConfig, compute_query, score_batch, score_documents  # noqa: E402
from selector.gradients.kfac import KFACConfig, fit_kfac  # noqa: E402
from selector.models.lm_chunks import Chunk, activation_grads_only, batches, pad_id_of, tokenize_chunks  # noqa: E402
from selector.gradients.projection import KroneckerProjector  # noqa: E402
from selector.gradients.tracked_layers import TrackedLayersConfig, capture, discover_blocks  # noqa: E402


def corpus() -> list[str]:
    from selector.demo.textsources import docstrings, pydoc_topics

    return [d.text for d in pydoc_topics()] + [d.text for d, _ in zip(docstrings(), range(400))]


def build(tmp: Path, texts: list[str]):
    from selector.demo.proxy_models import build_causal_lm, train_bpe_tokenizer

    train_bpe_tokenizer(texts[:300], tmp / "tok", vocab_size=512)
    out = {}
    for name, arch, hidden, layers in (("llama-h64-l2", "llama", 64, 2), ("gpt2-h64-l2", "gpt2", 64, 2),
                                       ("llama-h256-l4", "llama", 256, 4)):
        build_causal_lm(tmp / "tok", tmp / name, arch=arch, hidden_size=hidden, num_layers=layers,
                        num_heads=4, max_positions=256, seed=0)
        out[name] = tmp / name
    return out


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def cost(name, path, texts, n_batches, repeats):
    model, tok = load(path)
    blocks = discover_blocks(model)
    cfg = InfluenceConfig(chunk_tokens=128, max_chunks_per_doc=1)
    factors = fit_kfac(model, tok, texts[:16], blocks, cfg.kfac, chunk_tokens=128, max_chunks_per_doc=1)
    query = compute_query(model, tok, texts[16:24], factors, blocks, cfg)
    M = {b.name: query.precond[b.name].float() for b in blocks}
    chunks = [c for c in tokenize_chunks(tok, texts[24:], 128, 1) if len(c.ids) == 128][: 8 * n_batches]
    bl = list(batches(chunks, 8, pad_id_of(tok)))
    proj = KroneckerProjector(blocks)

    def fb():
        for b in bl:
            model.zero_grad(set_to_none=True)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.input_ids).loss.backward()

    def scoring(normalise):
        with activation_grads_only(model), capture(blocks):
            for b in bl:
                score_batch(model, b, blocks, M, normalise)

    def projecting():
        from selector.models.lm_chunks import chunk_losses

        with activation_grads_only(model), capture(blocks):
            for b in bl:
                chunk_losses(model, b).sum().backward()
                proj.project_captured(blocks, b.token_mask)

    runs = {"forward+backward": fb, "influence score": lambda: scoring(False),
            "score + cosine": lambda: scoring(True), "projected features (64x64/block)": projecting}
    times = {k: [] for k in runs}
    fb()  # warm-up
    for _ in range(repeats):  # interleaved so machine load hits every variant alike
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) / len(bl))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(b.in_aug * b.out_features for b in blocks)
    return [(name, k, med[k] * 1e3, med[k] / med["forward+backward"], len(blocks), n_params, proj.dim) for k in runs]


def kronfluence_comparison(path, texts):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    model, tok = load(path)
    L = 64
    # sequences of exactly L tokens that survive decode -> encode, so both sides see the same tokens
    ids = [c.ids for c in tokenize_chunks(tok, texts, L, 1) if len(c.ids) == L]
    ids = [tok(tok.decode(r))["input_ids"][:L] for r in ids]
    ids = [r for r in ids if len(r) == L]
    fit_ids, ref_ids, doc_ids = ids[:32], ids[32:40], ids[40:140]
    dec = lambda rows: [tok.decode(r) for r in rows]  # noqa: E731
    # names taken before prepare_model wraps the modules (after wrapping, discovery would see
    # the wrappers and name different modules)
    tracked = [n for b in discover_blocks(model, TrackedLayersConfig(joint_groups=[])) for n in b.module_names]

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
            tgt = batch["input_ids"][:, 1:]
            if sample:
                with torch.no_grad():
                    tgt = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1).reshape(tgt.shape)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    class DS(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(self.rows[i])}

    results = {}
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        task = LMTask()
        km = prepare_model(model, task)
        an = Analyzer("bench", km, task, cpu=True, disable_tqdm=True, output_dir=out)
        fa = FactorArguments(strategy="kfac", use_empirical_fisher=True)
        an.fit_all_factors("f", DS(fit_ids), per_device_batch_size=8, factor_args=fa, overwrite_output_dir=True)
        # damping_factor=None selects kronfluence's heuristic, 0.1 x mean eigenvalue product (ours);
        # its default is an absolute 1e-8, i.e. almost undamped, which is not like for like
        sa = ScoreArguments(aggregate_query_gradients=True, damping_factor=None)
        an.compute_pairwise_scores("s", "f", DS(ref_ids), DS(doc_ids), per_device_query_batch_size=8,
                                   per_device_train_batch_size=8, score_args=sa, overwrite_output_dir=True)
        kron = an.load_pairwise_scores("s")["all_modules"].sum(0).double().numpy()
        results["kronfluence"] = (time.perf_counter() - t, kron)

    # ours on exactly the same token sequences (decode/encode round-trips for byte-level BPE)
    model, tok = load(path)
    for label, joint in (("thresher (per-module q/k/v, like kronfluence)", []), ("thresher (joint QKV block)", None)):
        lcfg = TrackedLayersConfig() if joint is None else TrackedLayersConfig(joint_groups=joint, include_bias=False)
        cfg = InfluenceConfig(layers=lcfg, chunk_tokens=L, max_chunks_per_doc=1, kfac=KFACConfig(fisher="empirical"))
        t = time.perf_counter()
        blocks = discover_blocks(model, cfg.layers)
        f = fit_kfac(model, tok, dec(fit_ids), blocks, cfg.kfac, chunk_tokens=L, max_chunks_per_doc=1)
        q = compute_query(model, tok, dec(ref_ids), f, blocks, cfg)
        s = score_documents(model, tok, dec(doc_ids), q, blocks, cfg).score
        results[label] = (time.perf_counter() - t, s)
    same = all(tok(t)["input_ids"][:L] == r for t, r in zip(dec(fit_ids + ref_ids + doc_ids), fit_ids + ref_ids + doc_ids))
    return results, same, len(doc_ids)


def main():
    from scipy.stats import pearsonr, spearmanr

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    texts = corpus()
    n_batches, repeats = (4, 3) if args.quick else (8, 7)
    lines = ["# Influence benchmark", "",
             f"Command: `python bench/influence_cost.py{' --quick' if args.quick else ''}`  ",
             f"Machine: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Medians of {repeats} interleaved repeats "
             f"over {n_batches} batches of 8 x 128 tokens.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), texts)
        rows = []
        for name, path in paths.items():
            rows += cost(name, path, texts, n_batches, repeats)
        lines += ["## Cost per batch vs forward+backward (target <= 1.5x)", "",
                  "| model | variant | ms/batch | x fwd+bwd | blocks | tracked params | proj dim |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c:.1f} | {d:.2f} | {e} | {f} | {g} |" for a, b, c, d, e, f, g in rows]
        res, same, n_docs = kronfluence_comparison(paths["llama-h64-l2"], texts)
    kron_t, kron = res.pop("kronfluence")
    lines += ["", "## Against kronfluence 1.0.1 (K-FAC, empirical Fisher, damping 0.1 x mean eigenvalue product on both sides), tiny Llama h64 l2", "",
              f"{n_docs} scored documents of exactly 64 tokens, 32 fitting and 8 reference sequences. "
              f"Token sequences identical on both sides: {same}.", "",
              "| scorer | wall s (fit + query + score) | Spearman vs kronfluence | Pearson |", "|---|---:|---:|---:|",
              f"| kronfluence | {kron_t:.2f} | 1 | 1 |"]
    for label, (t, s) in res.items():
        lines.append(f"| {label} | {t:.2f} | {spearmanr(s, kron)[0]:.4f} | {pearsonr(s, kron)[0]:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / "influence.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
