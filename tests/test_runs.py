"""Listing and showing runs: committed manifests (written with ManifestWriter) and incomplete work dirs."""

import datetime as dt

import pyarrow as pa
import pytest

from selector.errors import ManifestError
from selector.data.lease import Lease
from selector.data.manifest import ManifestWriter, selection_table
from selector.data.runs import list_runs, show_run
from selector.data.workdir import WorkDir


def rows(n, method="random"):
    return {
        "doc_id": [f"d{i}" for i in range(n)],
        "shard": [f"s3://b/corpus/{i % 2}.parquet" for i in range(n)],
        "row": list(range(n)),
        "n_tokens": [100 + i for i in range(n)],
        "cluster": [i % 3 for i in range(n)],
        "method": [method] * n,
    }


def commit(root, run_id, n, storage_options=None, method="random", budget=10_000):
    writer = ManifestWriter(root, run_id, storage_options, rows_per_part=4)
    writer.write(selection_table(rows(n, method)))
    tokens = sum(100 + i for i in range(n))
    return writer.commit({
        "method": method,
        "config_hash": f"hash-{run_id}",
        "seed": 7,
        "corpus": {"uri": "s3://b/corpus/", "documents": 50, "tokens": 6000, "rejected": 1,
                   "shards": [{"uri": "s3://b/corpus/0.parquet"}, {"uri": "s3://b/corpus/1.parquet"}]},
        "budget": {"tokens": budget, "selected_tokens": tokens, "selected_documents": n},
        "counts": {"by_method": {method: n}, "by_cluster": {"0": {}, "1": {}, "2": {}}},
        "tokenizer": {"path": "/tok"},
    })


def incomplete_run(root, run_id, shards, storage_options=None):
    work = WorkDir(root, run_id, storage_options)
    for i in range(shards):
        work.write_table("index", f"shard-{i}", pa.table({"doc_id": ["x"]}), config_hash="idx-hash")
    work.write_table("embed", "shard-0", pa.table({"doc_id": ["x"]}), config_hash="emb-hash")


def test_list_committed_and_incomplete_runs(tmp_path):
    root = str(tmp_path)
    commit(root, "random-aaa", 10)
    incomplete_run(root, "random-aaa", 2)  # a committed run keeps its work dir: listed once, as committed
    commit(root, "quad-nightly-2026-11-24", 6, method="random")
    incomplete_run(root, "random-bbb", 3)  # still running, or died before committing
    ManifestWriter(root, "staged-only").write(selection_table(rows(2)))  # staged, never committed
    Lease(root, "c4-nightly", holder_id="h").acquire()  # runs/_leases is bookkeeping, not a run

    runs = list_runs(root)
    by_id = {r["run_id"]: r for r in runs}
    assert set(by_id) == {"random-aaa", "quad-nightly-2026-11-24", "random-bbb"}
    a = by_id["random-aaa"]
    assert a["status"] == "committed" and a["documents"] == 10 and a["method"] == "random"
    assert a["selected_tokens"] == sum(100 + i for i in range(10)) and a["budget_tokens"] == 10_000
    assert a["config_hash"] == "hash-random-aaa" and a["shards"] == 2 and a["uri"] == f"{root}/manifests/random-aaa"
    dt.datetime.fromisoformat(a["created_at"])
    b = by_id["random-bbb"]
    assert b["status"] == "incomplete" and b["documents"] is None and b["method"] == "random"
    assert b["stages"] == {"index": 3, "embed": 1} and b["shards"] == 3
    assert b["uri"] == f"{root}/runs/random-bbb"
    assert dt.datetime.fromisoformat(b["created_at"]) <= dt.datetime.fromisoformat(b["updated_at"])
    assert [r["created_at"] for r in runs] == sorted(r["created_at"] for r in runs), "oldest first"


def test_crashed_commit_is_listed_as_incomplete(tmp_path):
    root = str(tmp_path)
    commit(root, "random-ccc", 3)
    (tmp_path / "manifests" / "random-ccc" / "_SUCCESS").unlink()  # as if the job died mid-commit
    [run] = list_runs(root)
    assert run["run_id"] == "random-ccc" and run["status"] == "incomplete"
    assert run["uri"] == f"{root}/manifests/random-ccc"
    assert show_run(root, "random-ccc")["status"] == "incomplete"


def test_show_committed_run(tmp_path):
    root = str(tmp_path)
    commit(root, "random-aaa", 10)
    incomplete_run(root, "random-aaa", 2)
    shown = show_run(root, "random-aaa")
    assert shown["status"] == "committed" and shown["method"] == "random" and shown["seed"] == 7
    assert shown["config_hash"] == "hash-random-aaa" and shown["documents"] == 10 and shown["parts"] == 3
    assert shown["budget"]["tokens"] == 10_000 and shown["budget"]["selected_documents"] == 10
    assert shown["corpus"] == {"uri": "s3://b/corpus/", "shards": 2, "documents": 50, "tokens": 6000, "rejected": 1}
    assert shown["shards"] == ["s3://b/corpus/0.parquet", "s3://b/corpus/1.parquet"]
    assert shown["counts"] == {"by_method": {"random": 10}, "clusters": 3}
    assert shown["stages"]["index"]["done"] == 2 and shown["work_uri"] == f"{root}/runs/random-aaa"
    assert "pyarrow" in shown["versions"]


def test_show_incomplete_run_and_unknown_run(tmp_path):
    root = str(tmp_path)
    incomplete_run(root, "custom-run", 2)
    shown = show_run(root, "custom-run")
    assert shown["status"] == "incomplete" and shown["method"] is None  # a custom run id names no method
    assert shown["stages"]["index"]["done"] == 2 and shown["stages"]["embed"]["files"] == 2
    assert shown["stage_config_hashes"] == {"index": "idx-hash", "embed": "emb-hash"}
    assert shown["started_at"] <= shown["updated_at"]
    with pytest.raises(ManifestError, match="no run 'nope' under"):
        show_run(root, "nope")
    assert list_runs(str(tmp_path / "empty")) == []


def test_list_and_show_on_s3(s3_bucket):
    root, so = f"s3://{s3_bucket['bucket']}/thresher", s3_bucket["storage_options"]
    commit(root, "random-aaa", 5, so)
    incomplete_run(root, "random-bbb", 2, so)
    runs = {r["run_id"]: r for r in list_runs(root, so)}
    assert runs["random-aaa"]["status"] == "committed" and runs["random-aaa"]["documents"] == 5
    assert runs["random-bbb"]["status"] == "incomplete" and runs["random-bbb"]["stages"] == {"index": 2, "embed": 1}
    dt.datetime.fromisoformat(runs["random-bbb"]["updated_at"])  # S3's LastModified, as ISO
    assert show_run(root, "random-aaa", so)["documents"] == 5
