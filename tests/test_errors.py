"""Errors a user can cause, as the user sees them: the installed `thresher run` in a subprocess.

Real local Ray, the real S3-protocol server (moto), real tiny models; nothing is mocked. To keep
the suite short, the bad inputs that get past the config run as the jobs of ONE
`thresher run --keep-going` (one process, one Ray session); each test then reads its job's
paragraph from stderr. docs/errors.md lists every case with the message copied from a run.

Every message must: fit in 6 lines, start with ``error:``, name the file/row/field or URI,
carry no Ray actor id, pid or traceback, and end the job with exit code 2.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from selector.demo.corpus import write_shard
from selector.demo.textsources import docstrings

THRESHER = str(Path(sys.executable).with_name("thresher"))
RAY_NOISE = re.compile(r"actor_id|ActorID|pid=|Traceback|ray::|RayTaskError|\b[0-9a-f]{32}\b")
SECRET = "s3cr3t-never-printed"


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "THRESHER_DEBUG")}
    base.update({"COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0", "AWS_EC2_METADATA_DISABLED": "true"})
    base.update(extra)
    return base


def thresher(*args, timeout=600, **extra_env):
    return subprocess.run([THRESHER, *args], capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def paragraph(stderr: str) -> str:
    """The error paragraph: from the last line starting with 'error:' to the end."""
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert starts, f"no 'error:' paragraph in stderr:\n{stderr[-3000:]}"
    return "\n".join(lines[starts[-1]:])


def check_message(message: str, *needles: str) -> None:
    lines = message.splitlines()
    assert 1 <= len(lines) <= 6, message
    assert not RAY_NOISE.search(message), message
    assert SECRET not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


# --------------------------------------------------------------------------- the bad inputs


def _good_docs(n: int = 12) -> list[dict]:
    return [{"text": d.text[:800]} for d, _ in zip(docstrings(), range(n))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def denied_s3():
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): our keys are unknown to it."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server (auth) did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=15)


def build_cases(root: Path, tokenizer: Path, s3_endpoint: str, denied_endpoint: str):
    """{name: (config dict, list of substrings its message must hold)} for every bad input."""
    good = _good_docs()

    def job(name, corpus=None, **over):
        cfg = {"method": "random", "seed": 0, "tokenizer": str(tokenizer),
               "corpus": corpus or {"uri": str(root / name)},
               "work": {"root": str(root / "work" / name)}, "budget": {"fraction": 0.5},
               "ray": {"num_cpus": 4, "shard_readers": 1}}
        cfg.update(over)
        return cfg

    def shard_dir(name, files: dict[str, bytes | list[dict]]):
        d = root / name
        d.mkdir(parents=True)
        for fname, content in files.items():
            if isinstance(content, bytes):
                (d / fname).write_bytes(content)
            else:
                write_shard(d / fname, content)
        return d

    cases = {}
    # bad data: caught by the shard readers inside Ray
    shard_dir("truncated_parquet", {"a.parquet": good})
    data = (root / "truncated_parquet" / "a.parquet").read_bytes()
    (root / "truncated_parquet" / "a.parquet").write_bytes(data[: len(data) // 2])
    cases["truncated_parquet"] = (job("truncated_parquet"), ["shard a.parquet", "cannot read Parquet",
                                                            "on_bad_record: quarantine"])
    shard_dir("malformed_json", {"a.jsonl": b'{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n'})
    cases["malformed_json"] = (job("malformed_json"), ["shard a.jsonl, row 2", "invalid JSON"])
    body = root / "missing_text_column"
    body.mkdir()
    pq.write_table(pa.table({"body": [d["text"] for d in good]}), body / "a.parquet")
    cases["missing_text_column"] = (job("missing_text_column"), ["shard a.parquet", "missing column 'text'",
                                                                "corpus.text_column"])
    shard_dir("non_string_text", {"a.jsonl": good[:3] + [{"text": 5}]})
    cases["non_string_text"] = (job("non_string_text"), ["shard a.jsonl, row 3, field 'text'", "int, not a string"])
    shard_dir("invalid_utf8", {"a.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9 latin-1"}\n'})
    cases["invalid_utf8"] = (job("invalid_utf8"), ["shard a.jsonl, row 1, field 'text'", "not valid UTF-8"])
    shard_dir("huge_document", {"a.jsonl": good[:2] + [{"text": "x" * 5_000_000}]})
    cases["huge_document"] = (job("huge_document"), ["shard a.jsonl, row 2, field 'text'", "5000000 characters",
                                                    "corpus.max_doc_chars"])
    shard_dir("empty_shard", {"a.jsonl": good[:4], "b.jsonl": b""})
    cases["empty_shard"] = (job("empty_shard"), ["shard b.jsonl", "holds no records (0 bytes)"])
    shard_dir("not_gzip", {"a.jsonl.gz": b'{"text": "plain text, not gzip"}\n'})
    cases["not_gzip"] = (job("not_gzip"), ["shard a.jsonl.gz", "Not a gzipped file"])
    shard_dir("budget_too_large", {"a.jsonl": good})
    cases["budget_too_large"] = (job("budget_too_large", budget={"tokens": 10**9}),
                                 ["budget.tokens (1,000,000,000) is larger than the corpus", "budget.fraction"])
    # caught inside Ray, in a Ray Data stage actor's __init__ (Ray Data retries its calls on the dead actor)
    broken = root / "broken_encoder"
    broken.mkdir()
    for f in tokenizer.iterdir():
        if f.name.startswith("tokenizer"):
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": "wide"}')
    cases["broken_encoder"] = (job("broken_encoder", corpus={"uri": str(root / "budget_too_large")},
                                   method="exploration-only", embed={"model": str(broken), "max_tokens": 32},
                                   cluster={"k": 2, "seed": 0}, quad={"block_size": 4}),
                               [str(broken), "hidden_size"])

    # caught before Ray starts
    cases["missing_tokenizer"] = (job("malformed_json", tokenizer=str(root / "no-such-tokenizer")),
                                  ["tokenizer", "no-such-tokenizer", "does not exist"])
    shard_dir("no_shards", {"README.txt": b"not a shard"})
    cases["no_shards"] = (job("no_shards"), [str(root / "no_shards"), "holds no .parquet or .jsonl", "corpus.uri"])
    cases["missing_model"] = (job("malformed_json", method="topk-influence", proxy_model=str(root / "no-such-model"),
                                  reference={"uri": str(root / "malformed_json")}),
                              ["proxy_model", "no-such-model", "does not exist"])
    s3_options = {"key": "testing", "secret": SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    cases["unreachable_s3"] = (job("unreachable_s3", corpus={"uri": "s3://corpus-bucket/corpus/",
                                                             "storage_options": s3_options},
                                   storage={"retry_seconds": 3}),
                               ["cannot reach the object store at http://127.0.0.1:1", "s3://corpus-bucket/corpus/",
                                "storage.retry_seconds: 3", "corpus.storage_options"])
    options = {"key": "testing", "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    missing_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    cases["no_such_bucket"] = (job("no_such_bucket", corpus={"uri": f"s3://{missing_bucket}/corpus/",
                                                             "storage_options": options}),
                               [f"s3://{missing_bucket}/corpus/", "does not exist"])
    denied = {"key": "AKIAUNKNOWNKEY", "secret": SECRET, "client_kwargs": {"endpoint_url": denied_endpoint}}
    cases["access_denied"] = (job("access_denied", corpus={"uri": "s3://private-bucket/corpus/",
                                                           "storage_options": denied}),
                              ["access denied to corpus s3://private-bucket/corpus/", denied_endpoint, "credentials"])
    return cases


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_tokenizer_dir, s3_server, denied_s3):
    """Every bad input as one job of a single `thresher run --keep-going`; {name: (exit code, paragraph)}."""
    root = tmp_path_factory.mktemp("errors")
    cases = build_cases(root, tiny_tokenizer_dir, s3_server, denied_s3)
    paths = []
    for name, (cfg, _) in cases.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(path)
    started = time.time()
    result = thresher("run", "--keep-going", "--no-progress", *map(str, paths))
    elapsed = time.time() - started
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    # split stderr and stdout by the "job i/n: PATH" headers
    outcome = {}
    err_parts = re.split(r"^job \d+/\d+: (\S+)\n", result.stderr, flags=re.M)[1:]
    err_by_path = dict(zip(err_parts[0::2], err_parts[1::2]))
    for name, path in zip(cases, paths):
        status = re.search(rf"^job \d+/\d+: {re.escape(str(path))}: (ok|failed \(exit (\d+)\))$", result.stdout, re.M)
        assert status, result.stdout[-3000:]
        code = int(status.group(2)) if status.group(2) else 0
        outcome[name] = (code, paragraph(err_by_path[str(path)]) if code else "")
    outcome["_elapsed"] = elapsed
    outcome["_stderr"] = result.stderr
    if os.environ.get("THRESHER_ERRORS_DUMP"):  # the messages docs/errors.md quotes
        Path(os.environ["THRESHER_ERRORS_DUMP"]).write_text(
            "".join(f"## {name} (exit {outcome[name][0]})\n{outcome[name][1]}\n\n" for name in cases) + f"elapsed {elapsed:.1f} s\n")
    return cases, outcome


CASES = ["truncated_parquet", "malformed_json", "missing_text_column", "non_string_text", "invalid_utf8",
         "huge_document", "empty_shard", "not_gzip", "budget_too_large", "missing_tokenizer", "no_shards",
         "missing_model", "broken_encoder", "unreachable_s3", "no_such_bucket", "access_denied"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_ends_with_one_short_paragraph_and_exit_2(bad_runs, name):
    cases, outcome = bad_runs
    code, message = outcome[name]
    assert code == 2, (name, message)
    check_message(message, *cases[name][1])


def test_no_ray_traceback_reaches_stderr(bad_runs):
    _, outcome = bad_runs
    stderr = outcome["_stderr"]
    assert "Traceback" not in stderr and "Unhandled error" not in stderr and "actor_id" not in stderr, stderr[-3000:]
    assert SECRET not in stderr


def test_unreachable_store_gives_up_within_the_stated_time(tmp_path, tiny_tokenizer_dir):
    """retry_seconds bounds the wait: 3 s of retries, and the message says so (no Ray is started)."""
    cfg = {"method": "random", "tokenizer": str(tiny_tokenizer_dir),
           "corpus": {"uri": "s3://corpus-bucket/corpus/",
                      "storage_options": {"key": "k", "secret": SECRET, "endpoint_url": "http://127.0.0.1:1"}},
           "work": {"root": str(tmp_path / "w")}, "budget": {"tokens": 10}, "storage": {"retry_seconds": 3}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.time()
    result = thresher("run", str(path), "--no-progress")
    assert result.returncode == 2, result.stderr[-3000:]
    message = paragraph(result.stderr)
    check_message(message, "storage.retry_seconds: 3", "gave up after")
    waited = float(re.search(r"gave up after (\d+) s", message).group(1))
    assert waited <= 3
    assert time.time() - started < 60  # imports + 3 s, not botocore's own minutes of retries


def test_unknown_config_key_names_its_path_and_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"method": "random", "tokenizer": "/t", "corpus": {"uri": "/c", "text_colum": "x"},
                                    "work": {"root": "/w"}, "budget": {"tokens": 1}, "storage": {"retry_secs": 1}}))
    result = thresher("run", str(path))
    assert result.returncode == 2
    message = paragraph(result.stderr)
    check_message(message, "corpus.text_colum: unknown key", "storage.retry_secs: unknown key", str(path))
    assert result.stdout == ""
    debug = thresher("run", str(path), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    also = thresher("run", str(path), THRESHER_DEBUG="1")
    assert also.returncode == 2 and "Traceback" in also.stderr


def test_debug_shows_the_worker_traceback(tmp_path, tiny_tokenizer_dir):
    """--debug prints the remote traceback; without it, two failing shards still give one paragraph."""
    d = tmp_path / "c"
    d.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (d / name).write_text('{"text": "ok"}\n{broken\n')
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"method": "random", "tokenizer": str(tiny_tokenizer_dir), "corpus": {"uri": str(d)},
                                    "work": {"root": str(tmp_path / "w")}, "budget": {"fraction": 0.5},
                                    "ray": {"num_cpus": 4}}))
    result = thresher("run", str(path), "--no-progress", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "CorpusError" in result.stderr
    check_message(paragraph(result.stderr), "row 1", "invalid JSON")
