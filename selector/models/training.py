"""The models a method needs, trained in one call: proxy (training) model with a trajectory, reference model.

What each method loads (README, "Config reference"):

* ``quad`` / ``topk-influence``: ``proxy_model`` (influence gradients);
* ``perplexity`` / ``rho`` / ``mask_tokens``: ``rho.reference_model`` (trained on the reference set)
  and ``rho.training_model`` (trained on the corpus: the proxy);
* ``gtp``: ``gtp.checkpoints``, at least two points on the proxy's training trajectory.

:func:`train_models` makes all of them from one initial model: a fresh, seeded init built from a
tokenizer folder (a tiny Llama/GPT-2 of the given size, :func:`selector.demo.proxy_models.build_causal_lm`)
or from an HF model folder's ``config.json`` (its architecture, fresh weights; ``from_weights``
keeps its weights instead). The proxy is trained on a corpus sample in ``checkpoints`` segments,
each continuing from the previous segment's saved model (segment ``i`` uses seed ``seed + i``,
later segments skip warm-up), and every segment end is a checkpoint; the reference model is the
same init trained on the reference set (seed ``seed + checkpoints``). Training is
:func:`selector.models.proxy_training.train_causal_lm`.

Resumable: every model folder's name carries a hash of everything it depends on (tokenizer,
init, training texts, settings, the previous checkpoint), a folder is written under a
``.partial`` name and renamed when complete, and a marker (``thresher_model.json``) is written
inside it last. A rerun skips every finished model or checkpoint and trains only the rest;
changed settings give new folders, so a model a committed manifest names is never overwritten.

:func:`train_models_from_corpus` reads the texts (a seeded corpus sample, the reference set) and
calls :func:`train_models`: it is what ``thresher models train`` and ``thresher demo`` run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from selector.config_base import StrictModel
from selector.errors import ConfigError, ModelLoadError
from selector.data.workdir import stable_hash

MARKER = "thresher_model.json"
MODELS_YAML = "models.yaml"
MODELS_JSON = "models.json"


class ModelTrainingConfig(StrictModel):
    """How the proxy and reference models are built and trained (``thresher models train`` options)."""

    arch: Literal["llama", "gpt2"] = Field("llama", description="Architecture when the tokenizer folder has no "
                                           "model config.json.")
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    max_positions: int = Field(256, ge=8)
    from_weights: bool = Field(False, description="With an HF model folder: start from its weights instead of a "
                               "fresh init of its config.")
    steps: int = Field(200, ge=1, description="Proxy training steps in all (split over the checkpoints).")
    reference_steps: int | None = Field(None, ge=1, description="Reference model steps; default: steps.")
    checkpoints: int = Field(2, ge=1, description="Proxy checkpoints saved along training (GTP's trajectory); "
                             "the last is the proxy.")
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads while training; default: 1 for a model "
                                "under 20M parameters (a tiny model gains nothing from more, and extra threads "
                                "contend with other work), else torch's default. Not part of any hash.")
    corpus_documents: int = Field(2000, ge=1, description="Corpus documents sampled to train the proxy.")
    reference_documents: int = Field(2000, ge=1, description="At most this many reference documents.")

    def segment_steps(self) -> list[int]:
        """Steps of each proxy segment: checkpoint ``i`` ends at step ``steps * (i + 1) // checkpoints``."""
        if self.checkpoints > self.steps:
            raise ConfigError(f"checkpoints ({self.checkpoints}) exceed steps ({self.steps}): every checkpoint "
                              "needs at least one step")
        ends = [self.steps * (i + 1) // self.checkpoints for i in range(self.checkpoints)]
        return [e - s for s, e in zip([0] + ends[:-1], ends)]


@dataclass
class TrainedModels:
    """Where the models are, and the job-config lines that use them."""

    tokenizer: str
    init: str
    checkpoints: list[str]
    reference: str | None
    trained: list[str] = field(default_factory=list)  # folders trained by this call (the rest were reused)
    seconds: float = 0.0

    @property
    def proxy(self) -> str:
        return self.checkpoints[-1]

    def config_lines(self, reference_uri: str | None = None) -> dict:
        """The job-config keys naming these models (merge into a job YAML)."""
        lines: dict = {"tokenizer": self.tokenizer, "proxy_model": self.proxy}
        if reference_uri:
            lines["reference"] = {"uri": reference_uri}
        if self.reference:
            lines["rho"] = {"reference_model": self.reference, "training_model": self.proxy}
        if len(self.checkpoints) >= 2:
            lines["gtp"] = {"checkpoints": list(self.checkpoints)}
        return lines

    def to_json(self) -> dict:
        return {"tokenizer": self.tokenizer, "init": self.init, "checkpoints": self.checkpoints,
                "proxy": self.proxy, "reference": self.reference, "trained": self.trained,
                "seconds": round(self.seconds, 1)}


# --------------------------------------------------------------------------- hashing


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _folder_identity(path: Path, with_weights: bool) -> dict:
    """What a model/tokenizer folder's contents are, for hashing: config and tokenizer files by
    content, weight files by size and mtime (hashing GBs of weights would dominate)."""
    out = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name == MARKER:
            continue
        if f.suffix in (".json", ".txt", ".model", ".merges") or f.name.startswith("tokenizer"):
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        elif with_weights and f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            st = f.stat()
            out[f.name] = [st.st_size, int(st.st_mtime)]
    return out


def _done(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _publish(partial: Path, final: Path, marker: dict) -> None:
    """Write the marker last, then move the finished folder into place."""
    (partial / MARKER).write_text(json.dumps(marker, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)  # a folder without a matching marker: debris of an interrupted run
    partial.rename(final)


def _partial(final: Path) -> Path:
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    return partial


# --------------------------------------------------------------------------- building and training


def _is_model_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except ValueError:
        return False


def _build_init(source: Path, folder: Path, s: ModelTrainingConfig) -> None:
    """The initial model in ``folder``: from a tokenizer folder (tiny model of the given size) or an
    HF model folder (its config with fresh seeded weights, or its weights with ``from_weights``)."""
    from selector.demo.proxy_models import build_causal_lm

    if not _is_model_folder(source):
        build_causal_lm(source, folder, arch=s.arch, hidden_size=s.hidden_size, num_layers=s.num_layers,
                        num_heads=s.num_heads, max_positions=s.max_positions, seed=s.seed)
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selector.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    if s.from_weights:
        from selector.models.loading import load_causal_lm

        model = load_causal_lm(str(source), torch.float32)
    else:
        try:
            config = AutoConfig.from_pretrained(str(source), local_files_only=True)
            torch.manual_seed(s.seed)
            model = AutoModelForCausalLM.from_config(config)
        except Exception as exc:
            raise ModelLoadError(f"cannot build a causal LM from the config in {source}: {exc}\n"
                                 "  check: the folder holds a causal LM's config.json (or pass a tokenizer folder)") \
                from exc
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _bar(desc: str, total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr, mininterval=0.5,
                dynamic_ncols=True)


@contextlib.contextmanager
def _threads(model_dir: Path, threads: int | None):
    """torch's CPU threads for one training (see ModelTrainingConfig.threads), restored afterwards."""
    import torch

    if threads is None:
        if torch.cuda.is_available():
            yield
            return
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        threads = 1 if weights < 20e6 * 4 else None  # fp32: 4 bytes per parameter
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(start: Path, texts: list[str], final: Path, key: str, role: str, steps: int, seed: int,
           warmup_steps: int, s: ModelTrainingConfig, progress: bool, desc: str) -> dict:
    from selector.models.proxy_training import train_causal_lm

    partial = _partial(final)
    with _bar(desc, steps, progress) as bar, _threads(start, s.threads):
        def step(_: int, loss: float) -> None:
            bar.set_postfix_str(f"loss {loss:.2f}", refresh=False)
            bar.update(1)

        history = train_causal_lm(start, texts, partial, steps=steps, batch_size=s.batch_size, seq_len=s.seq_len,
                                  lr=s.lr, seed=seed, weight_decay=s.weight_decay, warmup_steps=warmup_steps,
                                  progress=step)
    marker = {"key": key, "role": role, "started_from": str(start), "steps": steps, "seed": seed,
              "documents": len(texts), "first_loss": history[0], "last_loss": history[-1]}
    _publish(partial, final, marker)
    return marker


def train_models(tokenizer: str | Path, corpus_texts: list[str], reference_texts: list[str] | None,
                 out_dir: str | Path, settings: ModelTrainingConfig | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, paths: dict | None = None) -> TrainedModels:
    """Build the initial model, train the proxy (with its checkpoints) on ``corpus_texts`` and the
    reference model on ``reference_texts`` (None: no reference model), under ``out_dir``.

    ``paths`` (optional) names the folders instead of the hashed defaults: ``init``,
    ``checkpoints`` (one per checkpoint) and ``reference``; resumption still checks the hash
    recorded in each folder. Returns the folders; writes ``models.yaml`` (the job-config lines)
    and ``models.json`` into ``out_dir``.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-save bars would interleave with ours
    s = settings or ModelTrainingConfig()
    source = Path(str(tokenizer).removeprefix("file://")).resolve()
    if not source.is_dir():
        raise ModelLoadError(f"tokenizer {str(tokenizer)!r} is not a folder\n"
                             "  check: --tokenizer names a tokenizer folder (save_pretrained) or an HF model folder")
    if not corpus_texts:
        raise ConfigError("no corpus documents to train the proxy model on")
    if reference_texts is not None and not reference_texts:
        raise ConfigError("the reference set has no documents to train the reference model on")
    from selector.models.loading import load_tokenizer, tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(load_tokenizer(str(source)))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    segments = s.segment_steps()
    arch = (s.model_dump(include={"arch", "hidden_size", "num_layers", "num_heads", "max_positions"})
            if not _is_model_folder(source) else {"config": _folder_identity(source, s.from_weights),
                                                  "from_weights": s.from_weights})
    train_keys = s.model_dump(include={"batch_size", "seq_len", "lr", "weight_decay", "warmup_steps"})
    init_key = stable_hash({"tokenizer": fingerprint, "arch": arch, "seed": s.seed})
    corpus_key = texts_hash(corpus_texts)
    proxy_key = stable_hash({"init": init_key, "texts": corpus_key, "segments": segments, "train": train_keys})
    paths = paths or {}
    init = Path(paths.get("init") or out / f"init-{init_key[:10]}")
    ckpts = [Path(p) for p in paths.get("checkpoints") or []] or [
        out / f"proxy-{proxy_key[:10]}" / f"step-{sum(segments[:i + 1]):06d}" for i in range(len(segments))]
    if len(ckpts) != len(segments):
        raise ConfigError(f"paths names {len(ckpts)} checkpoints for {len(segments)} segments")
    trained: list[str] = []

    if _done(init, init_key):
        log(f"models: initial model {init} (done)")
    else:
        partial = _partial(init)
        _build_init(source, partial, s)
        _publish(partial, init, {"key": init_key, "role": "init", "source": str(source)})
        trained.append(str(init))
        log(f"models: initial model {init}")

    previous, key = init, init_key
    for i, (final, steps) in enumerate(zip(ckpts, segments)):
        key = stable_hash({"proxy": proxy_key, "segment": i, "previous": key})
        desc = f"proxy {i + 1}/{len(segments)}" if len(segments) > 1 else "proxy"
        if _done(final, key):
            log(f"models: {desc} {final} (done)")
        else:
            marker = _train(previous, corpus_texts, final, key, "proxy", steps, s.seed + i,
                            s.warmup_steps if i == 0 else 0, s, progress, desc)
            trained.append(str(final))
            log(f"models: {desc} {final}: {steps} steps on {len(corpus_texts):,} corpus documents, "
                f"loss {marker['first_loss']:.2f} -> {marker['last_loss']:.2f}")
        previous = final

    reference = None
    if reference_texts is not None:
        ref_steps = s.reference_steps or s.steps
        ref_key = stable_hash({"init": init_key, "texts": texts_hash(reference_texts), "steps": ref_steps,
                               "seed": s.seed + len(segments), "train": train_keys})
        reference = Path(paths.get("reference") or out / f"reference-{ref_key[:10]}")
        if _done(reference, ref_key):
            log(f"models: reference {reference} (done)")
        else:
            marker = _train(init, reference_texts, reference, ref_key, "reference", ref_steps,
                            s.seed + len(segments), s.warmup_steps, s, progress, "reference")
            trained.append(str(reference))
            log(f"models: reference {reference}: {ref_steps} steps on {len(reference_texts):,} reference documents, "
                f"loss {marker['first_loss']:.2f} -> {marker['last_loss']:.2f}")

    result = TrainedModels(tokenizer=str(source), init=str(init), checkpoints=[str(c) for c in ckpts],
                           reference=str(reference) if reference else None, trained=trained,
                           seconds=time.time() - started)
    return result


def write_summary(result: TrainedModels, out_dir: str | Path, reference_uri: str | None = None,
                  settings: ModelTrainingConfig | None = None) -> str:
    """``models.yaml`` (the job-config lines) and ``models.json`` in ``out_dir``; returns the YAML text."""
    import yaml

    text = yaml.safe_dump(result.config_lines(reference_uri), sort_keys=False)
    out = Path(out_dir)
    (out / MODELS_YAML).write_text(text)
    (out / MODELS_JSON).write_text(json.dumps({**result.to_json(), "reference_uri": reference_uri,
                                               "settings": settings.model_dump() if settings else None}, indent=2))
    return text


# --------------------------------------------------------------------------- reading the texts


def sample_corpus_texts(corpus, n: int, seed: int = 0) -> list[str]:
    """``n`` documents of a corpus (:class:`selector.data.corpus.CorpusConfig`), seeded.

    Shards are drawn in a seeded order until they hold at least ``4 n`` documents (every shard of a
    small corpus), then read in listing order; the documents are shuffled with ``seed`` and the
    first ``n`` kept. Bad records are skipped (counted by the corpus reader, never trained on).
    """
    from selector.data.corpus import Corpus, RejectSink

    reader = Corpus(corpus)
    shards = reader.list_shards()
    order = list(range(len(shards)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    texts: list[str] = []
    sink = RejectSink()
    by_shard: dict[int, list[str]] = {}
    for i in order:
        by_shard[i] = [t for b in reader.iter_batches(shards[i], rejects=sink) for t in b.texts]
        chosen.append(i)
        if sum(len(v) for v in by_shard.values()) >= 4 * n:
            break
    for i in sorted(chosen):
        texts.extend(by_shard[i])
    random.Random(seed).shuffle(texts)
    return texts[:n]


def reference_set_texts(reference, max_documents: int) -> list[str]:
    """Up to ``max_documents`` documents of the reference set, in listing order."""
    from selector.data.corpus import Corpus, RejectSink

    reader = Corpus(reference)
    texts: list[str] = []
    sink = RejectSink()
    for shard in reader.list_shards():
        for batch in reader.iter_batches(shard, rejects=sink):
            texts.extend(batch.texts)
            if len(texts) >= max_documents:
                return texts[:max_documents]
    return texts


def train_models_from_corpus(tokenizer: str | Path, corpus, reference, out_dir: str | Path,
                             settings: ModelTrainingConfig | None = None, progress: bool = True,
                             log: Callable[[str], None] = print) -> TrainedModels:
    """Sample the corpus, read the reference set (``reference``: a CorpusConfig or None), train with
    :func:`train_models` and write ``models.yaml`` / ``models.json``: ``thresher models train`` and the demo."""
    s = settings or ModelTrainingConfig()
    corpus_texts = sample_corpus_texts(corpus, s.corpus_documents, s.seed)
    log(f"models: {len(corpus_texts):,} corpus documents sampled from {corpus.uri}")
    reference_texts = None
    if reference is not None:
        reference_texts = reference_set_texts(reference, s.reference_documents)
        log(f"models: {len(reference_texts):,} reference documents from {reference.uri}")
    result = train_models(tokenizer, corpus_texts, reference_texts, out_dir, s, progress=progress, log=log)
    write_summary(result, out_dir, reference.uri if reference is not None else None, s)
    return result
