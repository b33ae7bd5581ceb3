"""The `thresher` command line, run as a user runs it (a subprocess of the console script)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selector.data.manifest import read_manifest

THRESHER = str(Path(sys.executable).with_name("thresher"))


def thresher(*args, timeout=600):
    return subprocess.run([THRESHER, *args], capture_output=True, text=True, timeout=timeout,
                          env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                               "HOME": str(Path.home()), "RAY_USAGE_STATS_ENABLED": "0"})


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["manifest"], ["manifest", "show"], ["runs"],
                                     ["runs", "list"], ["runs", "show"], ["report"], ["materialize"], ["refresh"]])
def test_every_command_documents_itself(command):
    result = thresher(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    if command:
        # every option of the command is described
        assert "--help" in result.stdout


def test_run_reports_config_errors_without_a_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"method": "random", "tokenizer": "/t", "corpus": {"uri": "/c", "txt": 1},
                                    "work": {"root": "/w"}, "budget": {"tokens": 1}}))
    result = thresher("run", str(path))
    assert result.returncode == 2
    assert "corpus.txt: unknown key" in result.stderr  # errors go to stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_run_print_config_redacts_secrets(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"method": "random", "tokenizer": "/t",
                                    "corpus": {"uri": "s3://b/c", "storage_options": {"secret": "hunter2"}},
                                    "work": {"root": "/w"}, "budget": {"tokens": 1}}))
    result = thresher("run", str(path), "--print-config")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "redacted" in result.stdout


def test_demo_then_manifest_show(tmp_path):
    result = thresher("demo", "--out", str(tmp_path / "demo"), "--no-progress")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "selected by source:" in out
    uri = [line for line in out.splitlines() if line.startswith("manifest: ")][-1].split(": ", 1)[1]
    assert Path(uri, "_SUCCESS").exists()
    shown = thresher("manifest", "show", uri, "--rows", "3")
    assert shown.returncode == 0, shown.stderr
    assert "method quad" in shown.stdout and "selected" in shown.stdout
    missing = thresher("manifest", "show", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no manifest at" in missing.stderr
    assert "report:" in out and Path(out.split("report: ", 1)[1].split()[0]).read_text().count("<img") == 5
    # the selection, materialized for a trainer: input_ids + loss mask, readable with pyarrow
    import pyarrow.dataset as ds

    made = thresher("materialize", uri, str(tmp_path / "train"), "--no-progress")
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    table = ds.dataset(str(tmp_path / "train"), format="parquet").to_table()
    assert sorted(table["doc_id"].to_pylist()) == sorted(read_manifest(uri).table["doc_id"].to_pylist())
    assert table["input_ids"].type.value_type.bit_width == 32
    again = thresher("materialize", uri, str(tmp_path / "train"), "--no-progress")
    assert again.returncode == 2 and "already holds a materialized selection" in again.stderr


def test_runs_list_and_show(tmp_path):
    from selector.data.manifest import ManifestWriter, selection_table

    w = ManifestWriter(str(tmp_path), "random-aaa")
    w.write(selection_table({"doc_id": ["d0"], "shard": ["s"], "row": [0], "n_tokens": [5], "method": ["random"]}))
    w.commit({"method": "random", "config_hash": "abc", "budget": {"tokens": 10, "selected_tokens": 5}})
    listed = thresher("runs", "list", str(tmp_path))
    assert listed.returncode == 0 and "random-aaa" in listed.stdout and "committed" in listed.stdout
    shown = thresher("runs", "show", str(tmp_path), "random-aaa")
    assert shown.returncode == 0 and "selected 1 documents" in shown.stdout
    missing = thresher("runs", "show", str(tmp_path), "nope")
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr
