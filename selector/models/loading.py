"""Loading models and tokenizers from paths, with errors that say what is wrong.

Nothing is fetched from a hub: every load is ``local_files_only`` unless the path is an
fsspec URI, which is first copied to a local cache directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from selector.errors import ModelLoadError


def local_model_path(path: str, storage_options: dict | None = None) -> str:
    """A local directory for ``path``; remote URIs (s3://, gs://) are copied to a cache once."""
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        if not Path(local).exists():
            raise ModelLoadError(f"model path {path!r} does not exist")
        if not Path(local).is_dir():
            raise ModelLoadError(f"model path {path!r} is not a directory (expected a save_pretrained folder)")
        return local
    import fsspec

    cache = Path(os.environ.get("THRESHER_MODEL_CACHE", Path(tempfile.gettempdir()) / "thresher-models"))
    target = cache / hashlib.sha1(path.encode()).hexdigest()[:16]
    if not (target / ".complete").exists():
        fs, remote = fsspec.core.url_to_fs(path, **(storage_options or {}))
        if not fs.exists(remote):
            raise ModelLoadError(f"model path {path!r} does not exist")
        target.mkdir(parents=True, exist_ok=True)
        fs.get(remote.rstrip("/") + "/", str(target) + "/", recursive=True)
        (target / ".complete").touch()
    return str(target)


def load_tokenizer(path: str, storage_options: dict | None = None):
    from transformers import AutoTokenizer

    local = local_model_path(path, storage_options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        # Causal LM tokenizers often have no pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(auto_class, what: str, path: str, dtype, device: str, storage_options: dict | None):
    from transformers.utils import logging as hf_logging

    # transformers draws a bar per load and per save ("Loading weights", "Writing model shards"): in a job's
    # log, one per actor, they bury Thresher's own progress
    hf_logging.disable_progress_bar()
    local = local_model_path(path, storage_options)
    try:
        model = auto_class.from_pretrained(local, local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what} from {path!r}: {exc}") from exc
    return model.to(device).eval()


def load_causal_lm(path: str, dtype=None, device: str = "cpu", storage_options: dict | None = None):
    """A causal LM in eval mode from a ``save_pretrained`` folder."""
    from transformers import AutoModelForCausalLM

    return _load_model(AutoModelForCausalLM, "a causal LM", path, dtype, device, storage_options)


def load_encoder(path: str, dtype=None, device: str = "cpu", storage_options: dict | None = None):
    """An encoder (``AutoModel``) in eval mode from a ``save_pretrained`` folder."""
    from transformers import AutoModel

    return _load_model(AutoModel, "an encoder", path, dtype, device, storage_options)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and special tokens: equal fingerprints tokenize identically."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return hashlib.sha256(repr((vocab, special, type(tokenizer.backend_tokenizer.model).__name__
                                if hasattr(tokenizer, "backend_tokenizer") else "")).encode()).hexdigest()[:16]


def require_same_tokenizer(paths: dict[str, str], storage_options: dict | None = None) -> str:
    """Raise :class:`ModelLoadError` unless all ``{role: path}`` models share one tokenizer."""
    prints = {role: tokenizer_fingerprint(load_tokenizer(p, storage_options)) for role, p in paths.items()}
    if len(set(prints.values())) > 1:
        detail = ", ".join(f"{role} ({paths[role]}): {fp}" for role, fp in prints.items())
        raise ModelLoadError(f"models use different tokenizers: {detail}")
    return next(iter(prints.values()))
