"""`ray job submit` of the selection entrypoint against a `ray start --head` on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selector.demo.corpus import write_shard
from selector.data.manifest import read_manifest
from selector.demo.textsources import pydoc_topics

from conftest import _free_port, _stop_process_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head started with `ray start --head --block` in its own process group,
    stopped by PID (its group) — never `ray stop`, which would kill every Ray of the user."""
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = _free_port(), _free_port()
    # Ports of its own for every agent: the session's local Ray (ray_local) may already hold
    # Ray's defaults, and a head whose dashboard agent cannot bind accepts no job.
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                   f"--ray-client-server-port={_free_port()}"]
    temp_dir = tmp_path_factory.mktemp("rayhead")
    proc = subprocess.Popen(
        [f"{venv_bin}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=4", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 120
    while True:
        ready = subprocess.run([f"{venv_bin}/ray", "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if ready.returncode == 0:
            break
        if proc.poll() is not None or time.time() > deadline:
            _stop_process_group(proc)
            pytest.fail(f"ray head did not come up at {address}: {ready.stderr[-2000:]}")
        time.sleep(2)
    yield {"address": address, "env": env, "bin": venv_bin}
    _stop_process_group(proc, timeout=10)  # `ray start --block` is slow to honour SIGTERM


def test_ray_job_submit_runs_the_selection_entrypoint(ray_head, tmp_path, tiny_tokenizer_dir):
    docs = [{"text": d.text} for d in pydoc_topics()]
    write_shard(tmp_path / "corpus" / "a.parquet", docs[:40])
    write_shard(tmp_path / "corpus" / "b.jsonl.gz", docs[40:])
    config = {"method": "random", "seed": 1, "tokenizer": str(tiny_tokenizer_dir),
              "corpus": {"uri": str(tmp_path / "corpus")}, "work": {"root": str(tmp_path / "work")},
              "budget": {"fraction": 0.5}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    deadline = time.time() + 120
    while True:
        result = subprocess.run(
            [f"{ray_head['bin']}/ray", "job", "submit", "--address", ray_head["address"], "--",
             "python", "-m", "ray_jobs.select", "--config", str(config_path), "--no-progress"],
            env=ray_head["env"], capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        # The head answers before its job agent is up; Ray says to try again later.
        if "No available agent to submit job" not in output or time.time() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    manifest_lines = [line for line in output.splitlines() if line.startswith("manifest: ")]
    assert manifest_lines, output[-4000:]
    manifest = read_manifest(manifest_lines[-1].split("manifest: ", 1)[1].strip())
    assert manifest.summary["corpus"]["documents"] == len(docs)
    assert 0 < manifest.selected_tokens <= manifest.summary["budget"]["tokens"]
