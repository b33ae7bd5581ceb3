"""Faults a job survives, on a real local Ray and a real S3-protocol server (nothing mocked).

(a) a model actor killed mid-stage (``ray.kill`` of one encoder / loss-scoring actor): Ray restarts
    it and retries its in-flight call (``max_restarts`` / ``max_task_retries``), and the manifest
    equals an uninterrupted run's;
(b) the S3 server stopped mid-stage for a few seconds and started again (moto's in-process server
    keeps its buckets across a stop/start): the job's storage retries (``storage.retry_seconds``,
    selector.data.storage) wait and the manifest equals an uninterrupted run's; stopped for longer than
    the retry budget, the job fails with an error naming the URI and leaves no committed manifest,
    and a rerun finishes;
(c) the driver killed inside the manifest commit (paused there by ``THRESHER_COMMIT_PAUSE``, then
    SIGKILL): a rerun commits exactly one manifest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from selector.config import parse_config
from selector.demo.corpus import write_shard
from selector.data.manifest import SUCCESS, read_manifest
from selector.demo.textsources import docstrings, pydoc_topics, synthetic_low_quality

QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 small shards (enough that a stage is still running after its first shard)."""
    root = tmp_path_factory.mktemp("faults")
    docs = [{"id": f"doc/{d.name}", "text": d.text[:800]} for d, _ in zip(docstrings(), range(72))]
    docs += [{"id": f"low/{d.name}", "text": d.text[:800]} for d in synthetic_low_quality(24, seed=2)]
    for i in range(12):
        write_shard(root / "corpus" / f"part-{i:02d}.jsonl", docs[i::12])
    write_shard(root / "reference" / "ref.jsonl", [{"text": d.text[:1200]} for d, _ in zip(pydoc_topics(), range(8))])
    return root


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """12 shards of longer documents, so loss scoring runs for seconds (a kill lands mid-stage)."""
    root = tmp_path_factory.mktemp("faults-long")
    docs = [{"id": f"doc/{d.name}", "text": d.text[:4000]} for d, _ in zip(docstrings(), range(144))]
    for i in range(12):
        write_shard(root / "corpus" / f"part-{i:02d}.jsonl", docs[i::12])
    return root


def job_config(corpus_uri: str, work: str, tokenizer, **over) -> dict:
    cfg = {"seed": 5, "tokenizer": str(tokenizer), "corpus": {"uri": corpus_uri, "id_column": "id", "batch_size": 8},
           "work": {"root": work}, "budget": {"fraction": 0.3},
           "ray": {"shard_readers": 2, "worker_num_cpus": 0.25}}
    cfg.update(over)
    return cfg


def run_in_thread(cfg: dict) -> dict:
    """Start ``ray_jobs.select.run`` in a thread; the dict gets 'uri' or 'error' and 'ended'."""
    from ray_jobs.select import run

    out: dict = {}

    def target():
        try:
            out["uri"] = run(parse_config(cfg), **QUIET)
        except BaseException as exc:  # noqa: BLE001  (reported by the test)
            out["error"] = exc
        out["ended"] = time.monotonic()

    out["thread"] = threading.Thread(target=target, daemon=True)
    out["thread"].start()
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def rows(manifest) -> list[tuple]:
    t = manifest.table
    return sorted(zip(t["doc_id"].to_pylist(), t["cluster"].to_pylist(), t["round"].to_pylist(),
                      [None if s is None else round(s, 6) for s in t["score"].to_pylist()]))


# --------------------------------------------------------------------------- (a) actors killed


def stage_processes(stage_class: str) -> dict[int, str]:
    """pid -> title of the live Ray Data actor processes of ``stage_class`` (Ray titles them
    ``ray::MapWorker(MapBatches(<class>))``)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if f"MapBatches({stage_class})" in title and proc.status() != psutil.STATUS_ZOMBIE:
            found[proc.info["pid"]] = title
    return found


def test_embed_actor_killed_mid_stage_is_restarted(ray_local, corpus, tmp_path, tiny_tokenizer_dir, tiny_bert_dir):
    sections = {"method": "exploration-only", "embed": {"model": str(tiny_bert_dir), "max_tokens": 64},
                "cluster": {"k": 4, "seed": 0}, "quad": {"block_size": 4}}
    sections["ray"] = {"shard_readers": 2, "worker_num_cpus": 0.25, "embed_workers": 2}
    clean = read_manifest(run_in_thread_blocking(job_config(str(corpus / "corpus"), str(tmp_path / "clean"),
                                                            tiny_tokenizer_dir, **sections)))

    cfg = job_config(str(corpus / "corpus"), str(tmp_path / "killed"), tiny_tokenizer_dir, **sections)
    embed_dir = tmp_path / "killed" / "runs" / parse_config(cfg).resolved_run_id() / "embed"
    before = set(stage_processes("EmbedShards"))
    job = run_in_thread(cfg)
    # mid-stage: the first shard is embedded, most are not
    wait_for(lambda: list(embed_dir.glob("*.done.json")), 120, "the first embedded shard")
    victim = wait_for(lambda: sorted(set(stage_processes("EmbedShards")) - before), 10, "encoder actors")[0]
    done_at_kill = len(list(embed_dir.glob("*.done.json")))
    os.kill(victim, signal.SIGKILL)  # the process dies as on a lost node or the OOM killer
    job["thread"].join(180)
    assert "error" not in job, job.get("error")
    assert done_at_kill < 24  # 12 shards, each writes an .ids and an embedding marker: the stage was not over
    assert rows(read_manifest(job["uri"])) == rows(clean)


def run_in_thread_blocking(cfg: dict) -> str:
    job = run_in_thread(cfg)
    job["thread"].join(300)
    if "error" in job:
        raise job["error"]
    return job["uri"]


def test_loss_actor_killed_mid_stage_is_restarted(ray_local, long_corpus, tmp_path, tiny_tokenizer_dir,
                                                  tiny_llama_dir, tiny_llama_dir_2):
    sections = {"method": "perplexity", "ray": {"shard_readers": 2, "loss_workers": 2},
                "rho": {"reference_model": str(tiny_llama_dir_2), "training_model": str(tiny_llama_dir),
                        "max_length": 128, "overlap": 16, "worker_num_cpus": 0.25}}
    corpus_uri = str(long_corpus / "corpus")
    started = time.monotonic()
    clean = read_manifest(run_in_thread_blocking(job_config(corpus_uri, str(tmp_path / "clean"), tiny_tokenizer_dir,
                                                            **sections)))
    clean_seconds = time.monotonic() - started
    cfg = job_config(corpus_uri, str(tmp_path / "killed"), tiny_tokenizer_dir, **sections)
    losses_dir = tmp_path / "killed" / "runs" / parse_config(cfg).resolved_run_id() / "losses"
    before = set(stage_processes("ScoreShardLosses"))
    job = run_in_thread(cfg)
    # mid-stage: the first shard is scored (so the actors hold both models), the others are not
    wait_for(lambda: list(losses_dir.glob("*.done.json")), 120, "the first scored shard")
    victim = wait_for(lambda: sorted(set(stage_processes("ScoreShardLosses")) - before), 10,
                      "loss-scoring actors")[0]
    assert job["thread"].is_alive(), f"the job ended before the kill (a clean run took {clean_seconds:.1f} s)"
    done_at_kill = len(list(losses_dir.glob("*.done.json")))
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    job["thread"].join(180)
    assert "error" not in job, job.get("error")
    assert job["ended"] > killed_at  # the kill landed while the job ran
    assert done_at_kill < len(list((long_corpus / "corpus").iterdir()))  # shards were left to score
    assert rows(read_manifest(job["uri"])) == rows(clean)


# --------------------------------------------------------------------------- (b) S3 server stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def restartable_s3():
    """moto's in-process server on a fixed port, with stop()/start() (its buckets survive a restart)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in the test log
    port = _free_port()
    state = {"server": ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)}
    state["server"].start()
    endpoint = f"http://127.0.0.1:{port}"

    def stop():
        state["server"].stop()

    def start():
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()
        wait_for(lambda: _listening(port), 10, "the S3 server to listen again")

    yield {"endpoint": endpoint, "stop": stop, "start": start,
           "storage_options": {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}}
    try:
        state["server"].stop()
    except Exception:  # already stopped
        pass


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _s3_corpus(s3, corpus: Path) -> str:
    import boto3

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    # 24 shards of 4 documents, indexed by one reader: after the first shard's marker the index
    # stage has ~23 shards (seconds) to go, far more than the 0.4 s the server takes to stop.
    docs = [json.loads(line) for f in sorted((corpus / "corpus").iterdir()) for line in f.read_text().splitlines()]
    for i in range(24):
        body = "".join(json.dumps(d) + "\n" for d in docs[i::24])
        client.put_object(Bucket=bucket, Key=f"corpus/part-{i:02d}.jsonl", Body=body.encode())
    return bucket


def _s3_config(s3, bucket: str, work: str, tokenizer, retry_seconds: float) -> dict:
    cfg = job_config(f"s3://{bucket}/corpus/", f"s3://{bucket}/{work}", tokenizer, method="random",
                     storage={"retry_seconds": retry_seconds}, ray={"shard_readers": 1})
    cfg["corpus"]["storage_options"] = s3["storage_options"]
    cfg["work"]["storage_options"] = s3["storage_options"]
    return cfg


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def _stop_the_store_mid_index(s3, bucket: str, cfg: dict, work: str) -> dict:
    """Start the job, stop the S3 server once the first shard is indexed (its marker is on S3)."""
    run_id = parse_config(cfg).resolved_run_id()
    job = run_in_thread(cfg)
    wait_for(lambda: [k for k in _keys(s3, bucket, f"{work}/runs/{run_id}/index/") if k.endswith(".done.json")],
             120, "the first indexed shard", interval=0.02)
    s3["stop"]()
    assert job["thread"].is_alive(), "the job finished before the store went down"
    return job


def test_s3_stopped_mid_stage_the_job_waits_and_finishes(ray_local, restartable_s3, corpus, tiny_tokenizer_dir):
    s3 = restartable_s3
    bucket = _s3_corpus(s3, corpus)
    clean = read_manifest(run_in_thread_blocking(_s3_config(s3, bucket, "clean", tiny_tokenizer_dir, 30)),
                          s3["storage_options"])
    cfg = _s3_config(s3, bucket, "outage", tiny_tokenizer_dir, 30)
    job = _stop_the_store_mid_index(s3, bucket, cfg, "outage")
    time.sleep(4)
    s3["start"]()
    restarted = time.monotonic()
    job["thread"].join(120)
    assert "error" not in job, job.get("error")
    assert job["ended"] > restarted  # it waited for the store
    assert read_manifest(job["uri"], s3["storage_options"]).table["doc_id"].to_pylist() == \
        clean.table["doc_id"].to_pylist()


def test_s3_down_past_the_retry_budget_fails_clearly_and_commits_nothing(ray_local, restartable_s3, corpus,
                                                                        tiny_tokenizer_dir):
    from ray_jobs.errors import EXIT_USER, describe

    s3 = restartable_s3
    bucket = _s3_corpus(s3, corpus)
    cfg = _s3_config(s3, bucket, "down", tiny_tokenizer_dir, 3)
    run_id = parse_config(cfg).resolved_run_id()
    job = _stop_the_store_mid_index(s3, bucket, cfg, "down")
    stopped = time.monotonic()
    job["thread"].join(90)
    assert not job["thread"].is_alive(), "the job did not give up on a store that is down"
    s3["start"]()
    assert "error" in job, "the job finished although the store was down"
    # retry budget 3 s, in the readers too (workers.runtime.job_env; with the default 30 s they would
    # take ~26 s); on top: a request stalled on a kept-alive connection (read_timeout, 5 s per attempt)
    # and Ray reporting the reader's error
    assert job["ended"] - stopped < 20, f"gave up after {job['ended'] - stopped:.0f} s"
    code, message = describe(job["error"])
    assert code == EXIT_USER, message
    assert f"s3://{bucket}" in message and len(message.splitlines()) <= 6, message
    assert not [k for k in _keys(s3, bucket, f"down/manifests/{run_id}/")]  # no manifest, half-written or not
    # the store is back: a rerun resumes and commits
    cfg["storage"]["retry_seconds"] = 30
    manifest = read_manifest(run_in_thread_blocking(cfg), s3["storage_options"])
    assert len(manifest) > 0


# --------------------------------------------------------------------------- (c) driver killed in the commit


@pytest.mark.parametrize("point", ["after_parts", "before_success"])
def test_driver_killed_in_the_commit_then_a_rerun_commits_one_manifest(ray_local, corpus, tmp_path,
                                                                       tiny_tokenizer_dir, point):
    from selector.data.manifest import COMMIT_PAUSE_ENV, MANIFEST_JSON

    cfg = job_config(str(corpus / "corpus"), str(tmp_path / "work"), tiny_tokenizer_dir, method="random",
                     ray={"num_cpus": 2, "shard_readers": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_id = parse_config(cfg).resolved_run_id()
    final = tmp_path / "work" / "manifests" / run_id
    log = tmp_path / "stderr.log"
    thresher = Path(sys.executable).with_name("thresher")
    env = dict(os.environ, **{COMMIT_PAUSE_ENV: point})
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(thresher), "run", str(path), "--no-progress"], stdout=subprocess.DEVNULL,
                                stderr=err, env=env, start_new_session=True)
    try:
        wait_for(lambda: f"commit paused at {point}" in log.read_text(errors="replace") or proc.poll() is not None,
                 180, "the commit to pause", interval=0.2)
        assert proc.poll() is None, log.read_text(errors="replace")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (final / "part-00000.parquet").exists() and not (final / SUCCESS).exists()
    assert (final / MANIFEST_JSON).exists() == (point == "before_success")
    with pytest.raises(Exception, match="not committed"):
        read_manifest(str(final))

    from ray_jobs.select import run

    uri = run(parse_config(cfg), **QUIET)
    manifest = read_manifest(uri)
    assert [p.name for p in (tmp_path / "work" / "manifests").iterdir() if p.name != "_staging"] == [run_id]
    assert sorted(p.name for p in final.iterdir()) == [SUCCESS, MANIFEST_JSON] + \
        [p["name"] for p in manifest.summary["parts"]]
    assert len(manifest) == sum(p["rows"] for p in manifest.summary["parts"]) > 0
    assert run(parse_config(cfg), **QUIET) == uri  # committed: a third run only reports it
