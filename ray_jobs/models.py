"""``thresher models``: train the models the methods need, and print the job-config lines that use them.

    thresher models train --corpus URI --reference URI --tokenizer PATH --out DIR
    thresher models show DIR

``train`` builds an initial causal LM from a tokenizer folder (a tiny Llama/GPT-2 of the given
size) or from an HF model folder's config, trains the proxy (training) model on a corpus sample
with ``--checkpoints`` checkpoints along the way (GTP's trajectory) and the reference model on
the reference set, saves each with ``save_pretrained`` and prints the YAML lines (``tokenizer``,
``proxy_model``, ``reference``, ``rho``, ``gtp``) for a job config; ``--job-config FILE`` writes a
whole runnable job config for ``--method``. A rerun skips every finished model and checkpoint
(their folders are keyed by a hash of their settings and data): see selector.models.training.
Runs on this machine (the GPU when there is one), not on Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

models_app = typer.Typer(help="Train the proxy, reference and trajectory models the methods need.",
                         no_args_is_help=True)

_METHODS = ("quad", "topk-influence", "exploration-only", "perplexity", "rho", "gtp", "random")


def _options(value: Optional[str], flag: str) -> dict:
    from selector.errors import ConfigError

    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"endpoint_url\": \"http://...\"}}'")
    return parsed


def _public(options: dict) -> dict:
    """Storage options without secrets (those come from the environment): safe to write to a file."""
    from selector.config import _is_secret

    return {k: (_public(v) if isinstance(v, dict) else v) for k, v in options.items()
            if isinstance(v, dict) or not _is_secret(k)}


def job_config(lines: dict, method: str, corpus: dict, work_root: str, budget_fraction: float,
               reference: dict | None) -> dict:
    """A runnable job config for ``method`` using the trained models (``lines``: TrainedModels.config_lines)."""
    cfg: dict = {"method": method, "seed": 0, "tokenizer": lines["tokenizer"], "corpus": corpus,
                 "work": {"root": work_root}, "budget": {"fraction": budget_fraction}}
    if method in ("quad", "topk-influence"):
        cfg["proxy_model"] = lines["proxy_model"]
    if method in ("quad", "topk-influence", "gtp") and reference is not None:
        cfg["reference"] = reference
    if method in ("perplexity", "rho"):
        if "rho" not in lines:
            raise typer.BadParameter(f"--method {method} needs a reference model: pass --reference")
        cfg["rho"] = dict(lines["rho"])
    if method == "gtp":
        if "gtp" not in lines:
            raise typer.BadParameter("--method gtp needs at least 2 checkpoints (--checkpoints 2)")
        cfg["gtp"] = dict(lines["gtp"])
    return cfg


@models_app.command("train")
def train(corpus: str = typer.Option(..., help="Corpus URI (the job's corpus.uri): the proxy trains on a sample."),
          tokenizer: str = typer.Option(..., help="Tokenizer folder (save_pretrained), or an HF model folder whose "
                                        "config.json gives the architecture."),
          out: Path = typer.Option(..., help="Folder for the models (a rerun resumes here)."),
          reference: Optional[str] = typer.Option(None, help="Reference set URI: the reference model trains on it."),
          text_column: str = typer.Option("text", help="Text column of the corpus and the reference set."),
          id_column: Optional[str] = typer.Option(None, help="With --job-config: the corpus's id column."),
          storage_options: Optional[str] = typer.Option(None, help="fsspec options (JSON) for the corpus and the "
                                                        "reference set (s3:// etc.); secrets: prefer the environment."),
          arch: str = typer.Option("llama", help="llama or gpt2 (with a tokenizer folder)."),
          hidden_size: int = typer.Option(64, help="Hidden size (with a tokenizer folder)."),
          layers: int = typer.Option(2, help="Layers (with a tokenizer folder)."),
          heads: int = typer.Option(4, help="Attention heads (with a tokenizer folder)."),
          from_weights: bool = typer.Option(False, "--from-weights", help="With an HF model folder: start from its "
                                            "weights, not a fresh init of its config."),
          steps: int = typer.Option(200, help="Proxy training steps (split over the checkpoints)."),
          reference_steps: Optional[int] = typer.Option(None, help="Reference model steps (default: --steps)."),
          checkpoints: int = typer.Option(2, help="Proxy checkpoints along training (GTP's trajectory)."),
          batch_size: int = typer.Option(8, help="Sequences per step."),
          seq_len: int = typer.Option(128, help="Tokens per sequence."),
          lr: float = typer.Option(3e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
          corpus_documents: int = typer.Option(2000, help="Corpus documents sampled for the proxy."),
          reference_documents: int = typer.Option(2000, help="Reference documents used (at most)."),
          seed: int = typer.Option(0, help="Seed of the init, the sample and the training."),
          job_config_out: Optional[Path] = typer.Option(None, "--job-config", help="Also write a runnable job "
                                                        "config (for --method) using the models."),
          method: str = typer.Option("quad", help=f"With --job-config: {', '.join(_METHODS)}."),
          work_root: Optional[str] = typer.Option(None, help="With --job-config: work.root (default: OUT/../work)."),
          budget_fraction: float = typer.Option(0.1, help="With --job-config: budget.fraction."),
          progress: bool = typer.Option(True, help="Show progress bars.")):
    """Train the proxy (training) model with its checkpoints and the reference model; print the job-config lines."""
    import yaml
    from rich.console import Console

    from ray_jobs.errors import report
    from selector.data.corpus import CorpusConfig
    from selector.models.training import MODELS_YAML, ModelTrainingConfig, train_models_from_corpus

    console = Console(soft_wrap=True)
    started = time.time()
    try:
        if method not in _METHODS:
            raise typer.BadParameter(f"--method must be one of {', '.join(_METHODS)}, not {method!r}")
        options = _options(storage_options, "--storage-options")
        settings = ModelTrainingConfig(arch=arch, hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                                       from_weights=from_weights, steps=steps, reference_steps=reference_steps,
                                       checkpoints=checkpoints, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                       seed=seed, corpus_documents=corpus_documents,
                                       reference_documents=reference_documents)
        corpus_cfg = CorpusConfig(uri=corpus, text_column=text_column, storage_options=options,
                                  on_bad_record="quarantine")
        reference_cfg = (CorpusConfig(uri=reference, text_column=text_column, storage_options=options,
                                      on_bad_record="quarantine") if reference else None)
        result = train_models_from_corpus(tokenizer, corpus_cfg, reference_cfg, out, settings, progress=progress,
                                          log=lambda m: console.print(m, markup=False))
    except typer.BadParameter:
        raise
    except Exception as exc:  # one paragraph on stderr (ray_jobs.errors)
        raise typer.Exit(code=report(exc))
    public = _public(options)
    reference_section = ({"uri": reference, "text_column": text_column} | ({"storage_options": public} if public
                                                                          else {})) if reference else None
    lines = result.config_lines(reference)
    if reference_section:
        lines["reference"] = reference_section
    (out / MODELS_YAML).write_text(yaml.safe_dump(lines, sort_keys=False))
    reused = len([result.init, *result.checkpoints] + ([result.reference] if result.reference else [])) - \
        len(result.trained)
    console.print(f"models in {out.resolve()} ({time.time() - started:.0f} s; {len(result.trained)} trained, "
                  f"{reused} reused). Job-config lines (also in {out.resolve() / 'models.yaml'}):", markup=False)
    print(yaml.safe_dump(lines, sort_keys=False), end="", flush=True)
    if job_config_out is not None:
        corpus_section = {"uri": corpus, "text_column": text_column} | ({"id_column": id_column} if id_column else {}) \
            | ({"storage_options": public} if public else {})
        root = work_root or str(out.resolve().parent / "work")
        cfg = job_config(lines, method, corpus_section, root, budget_fraction, reference_section)
        from selector.config import parse_config

        try:
            parse_config(cfg, str(job_config_out))
        except Exception as exc:
            raise typer.Exit(code=report(exc))
        job_config_out.write_text(yaml.safe_dump(cfg, sort_keys=False))
        console.print(f"job config: {job_config_out} (run it: thresher run {job_config_out})", markup=False)


@models_app.command("show")
def show(out: Path = typer.Argument(..., help="The --out folder of `thresher models train`.")):
    """Print the job-config lines of the models last trained in OUT."""
    from ray_jobs.errors import report
    from selector.errors import ModelLoadError
    from selector.models.training import MODELS_YAML

    path = out / MODELS_YAML
    if not path.is_file():
        raise typer.Exit(code=report(ModelLoadError(f"no {MODELS_YAML} in {out}\n  check: OUT is the --out folder "
                                                    "of a finished `thresher models train`")))
    print(path.read_text(), end="")
