"""Session fixtures: real local Ray, a real S3-protocol server, real tiny HF models.

Each service is started once per test session and stopped by PID at the end. Nothing is
mocked: the S3 server is moto's standalone server speaking the S3 protocol on 127.0.0.1,
Ray is a real local cluster, models are real transformers models saved with
``save_pretrained`` and loaded back with ``from_pretrained``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Fake credentials: the S3 server accepts any; real AWS is never reached.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process we started (in its own session) and everything it spawned, by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- text + models


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """A few hundred real English/code documents from the CPython install."""
    from selector.demo.textsources import docstrings, pydoc_topics

    texts = [d.text for d in pydoc_topics()]
    texts += [d.text for d, _ in zip(docstrings(), range(200))]
    return texts


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(models_dir, real_texts) -> Path:
    """A byte-level BPE (vocab 512) trained offline on real text, saved as an HF tokenizer."""
    from selector.demo.proxy_models import train_bpe_tokenizer

    out = models_dir / "tokenizer"
    train_bpe_tokenizer(real_texts, out, vocab_size=512)
    return out


def _tiny_causal_lm(models_dir: Path, tokenizer_dir: Path, name: str, arch: str, seed: int) -> Path:
    from selector.demo.proxy_models import build_causal_lm

    out = models_dir / name
    build_causal_lm(tokenizer_dir, out, arch=arch, seed=seed)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(models_dir, tiny_tokenizer_dir) -> Path:
    """A 2-layer, hidden-64 Llama causal LM (random weights, seed 0) with its tokenizer."""
    return _tiny_causal_lm(models_dir, tiny_tokenizer_dir, "llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir_2(models_dir, tiny_tokenizer_dir) -> Path:
    """A second tiny Llama with different weights (seed 1), same tokenizer."""
    return _tiny_causal_lm(models_dir, tiny_tokenizer_dir, "llama2", "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(models_dir, tiny_tokenizer_dir) -> Path:
    """A 2-layer, hidden-64 GPT-2 (Conv1D layers, fused c_attn) with its tokenizer."""
    return _tiny_causal_lm(models_dir, tiny_tokenizer_dir, "gpt2", "gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_bert_dir(models_dir, tiny_tokenizer_dir) -> Path:
    """A 2-layer, hidden-32 BERT encoder with its tokenizer."""
    from selector.demo.proxy_models import build_encoder

    out = models_dir / "bert"
    build_encoder(tiny_tokenizer_dir, out, seed=0)
    return out


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the whole session (4 logical CPUs on 2 cores: actor pools
    taking whole CPUs would otherwise starve Ray Data's read tasks)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             address="local")
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3-protocol server on 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                _stop_process_group(proc)
                raise RuntimeError(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    yield endpoint
    _stop_process_group(proc)


@pytest.fixture
def s3_bucket(s3_server) -> dict:
    """A fresh bucket on the S3 server. Yields {'bucket', 'endpoint_url', 'storage_options'}."""
    import boto3

    name = f"thresher-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return {
        "bucket": name,
        "endpoint_url": s3_server,
        "storage_options": {"key": "testing", "secret": "testing",
                            "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}},
    }
