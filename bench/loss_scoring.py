"""Loss-scoring throughput: Thresher's per-token losses vs a bare ``model(input_ids)`` loop.

    python -m bench.loss_scoring                 # defaults; writes bench/results/loss_scoring.{md,json}
    python -m bench.loss_scoring --quick         # smaller, for a smoke run

Both sides run in the same process on the same model and the same length-bucketed,
right-padded batches of real text (CPython docstrings and sources, tokenized once).

* ``bare``   - ``model(input_ids=..., attention_mask=...)`` over the pre-collated batches;
               nothing else (the floor any scorer must pay).
* ``thresher`` - :func:`selector.rho.token_losses.token_losses` on the pre-tokenized documents:
               windowing with overlap, bucketing, collation, host->device copies, the fp32
               log-softmax on real positions and the scatter into per-document arrays.

tokens/s counts scored tokens (for bare: the same count, since it runs the same windows).
Repeats alternate bare/thresher so machine-load drift hits both; medians are reported.
Target: thresher >= 0.9x bare.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"


def build_model(workdir: Path, texts: list[str], hidden: int, layers: int, vocab: int, max_positions: int):
    from selector.demo.proxy_models import build_causal_lm, train_bpe_tokenizer

    train_bpe_tokenizer(texts, workdir / "tok", vocab_size=vocab)
    build_causal_lm(workdir / "tok", workdir / "model", arch="llama", hidden_size=hidden, num_layers=layers,
                    num_heads=max(hidden // 64, 2), max_positions=max_positions, seed=0)
    return workdir / "model"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "loss_scoring"))
    args = ap.parse_args(argv)
    if args.quick:
        args.docs, args.hidden, args.layers, args.vocab, args.repeats = 6, 128, 2, 2048, 3

    import torch

    from selector.models.loading import load_causal_lm, load_tokenizer
    from selector.demo.textsources import docstrings, source_files
    from selector.rho.token_losses import (bucket_batches, collate, default_device, default_dtype, make_windows,
                                       token_losses, tokenize)

    # The tokenizer learns from a larger sample than is scored, so the vocabulary is full-size.
    sample = [d.text for d, _ in zip(source_files(), range(200))] + [d.text for d, _ in zip(docstrings(), range(400))]
    texts = sample[:args.docs // 2] + sample[200:200 + args.docs - args.docs // 2]
    device = default_device()
    dtype = default_dtype(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), sample, args.hidden, args.layers, args.vocab, args.max_length)
        model = load_causal_lm(str(path), dtype, device)
        tok = load_tokenizer(str(path))
    ids = tokenize(tok, texts)
    windows = [w for d, x in enumerate(ids) if len(x) >= 2 for w in make_windows(d, x, args.max_length, args.overlap)]
    batches = [collate(b, tok.pad_token_id) for b in bucket_batches(windows, args.batch_tokens)]
    scored = sum(len(x) - 1 for x in ids if len(x) >= 2)
    padded = sum(b[0].size for b in batches)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run_bare():
        with torch.inference_mode():
            for input_ids, attention in batches:
                model(input_ids=torch.from_numpy(input_ids).to(device),
                      attention_mask=torch.from_numpy(attention).to(device), use_cache=False)
        sync()

    def run_thresher():
        res = token_losses(model, tok, [], max_length=args.max_length, overlap=args.overlap,
                           batch_tokens=args.batch_tokens, token_ids=ids)
        sync()
        assert res.tokens_scored == scored

    torch.set_num_threads(torch.get_num_threads())
    run_bare()
    run_thresher()  # warm-up both
    times = {"bare": [], "thresher": []}
    cpu = {"bare": [], "thresher": []}
    for r in range(args.repeats):
        for name, fn in (("bare", run_bare), ("thresher", run_thresher)) if r % 2 == 0 else \
                (("thresher", run_thresher), ("bare", run_bare)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    tps = {k: scored / v for k, v in med.items()}
    ratio = tps["thresher"] / tps["bare"]
    cpu_ratio = med_cpu["bare"] / med_cpu["thresher"]
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(0), "dtype": str(dtype),
        "torch_threads": torch.get_num_threads(), "model": f"llama hidden={args.hidden} layers={args.layers} "
        f"vocab={len(tok)} params={n_params/1e6:.2f}M", "documents": len(texts), "windows": len(windows),
        "batches": len(batches), "scored_tokens": scored, "padded_tokens": padded,
        "max_length": args.max_length, "overlap": args.overlap, "batch_tokens": args.batch_tokens,
        "repeats": args.repeats, "seconds": times, "median_s": med, "cpu_seconds": cpu,
        "median_cpu_s": med_cpu, "cpu_ratio": cpu_ratio, "tokens_per_s": tps, "ratio": ratio,
        "command": "python -m bench.loss_scoring " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    md = [
        "# Loss scoring throughput",
        "",
        f"Reproduce: `{result['command'].strip()}` (from the repo root, venv active).",
        "",
        f"Device: {result['device']} ({result['dtype']}, {result['torch_threads']} threads); model: {result['model']}; "
        f"{len(texts)} real documents -> {len(windows)} windows of <= {args.max_length} tokens (overlap "
        f"{args.overlap}) in {len(batches)} length-bucketed batches of <= {args.batch_tokens} padded tokens; "
        f"{scored:,} scored tokens, {padded:,} padded positions. Medians of {args.repeats} alternating repeats.",
        "",
        "| loop | median wall s | tokens/s (wall) | median process CPU s |",
        "|---|---:|---:|---:|",
        f"| bare `model(input_ids, attention_mask)` | {med['bare']:.3f} | {tps['bare']:,.0f} | {med_cpu['bare']:.3f} |",
        f"| thresher `token_losses` (per-token fp32 losses) | {med['thresher']:.3f} | {tps['thresher']:,.0f} | "
        f"{med_cpu['thresher']:.3f} |",
        "",
        f"**Ratio thresher / bare: {ratio:.3f}x by wall time, {cpu_ratio:.3f}x by CPU time** (target >= 0.9x). "
        "CPU time is reported because the shared machine's load makes wall time noisy.",
        "",
        "All runs, wall s: " + "; ".join(f"{k}: " + ", ".join(f"{t:.3f}" for t in v) for k, v in times.items()),
        "",
        "All runs, CPU s: " + "; ".join(f"{k}: " + ", ".join(f"{t:.3f}" for t in v) for k, v in cpu.items()),
        "",
    ]
    print("\n".join(md))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
