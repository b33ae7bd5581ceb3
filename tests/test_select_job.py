"""The random selection job end to end on a real local Ray, to local disk and to the S3 server."""

import json

import pyarrow.parquet as pq
import pytest

from selector.config import parse_config
from selector.demo.corpus import write_shard
from selector.errors import ModelLoadError
from selector.data.manifest import read_manifest
from selector.demo.textsources import docstrings


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = [{"id": f"{d.name}", "text": d.text} for d, _ in zip(docstrings(), range(120))]
    for i, suffix in enumerate(["parquet", "jsonl", "jsonl.gz", "jsonl.zst"]):
        write_shard(root / f"part-{i}.{suffix}", docs[i::4])
    return root, docs


def job(corpus_uri, work_root, tokenizer, **over):
    cfg = {"method": "random", "seed": 11, "tokenizer": str(tokenizer),
           "corpus": {"uri": str(corpus_uri), "id_column": "id", "batch_size": 16},
           "work": {"root": str(work_root)}, "budget": {"fraction": 0.3}, "ray": {"shard_readers": 2}}
    for k, v in over.items():
        cfg[k] = v
    return parse_config(cfg)


def test_random_job_writes_a_committed_manifest_under_budget(ray_local, small_corpus, tmp_path, tiny_tokenizer_dir):
    from ray_jobs.select import run

    corpus, docs = small_corpus
    cfg = job(corpus, tmp_path / "w1", tiny_tokenizer_dir)
    uri = run(cfg, progress=False, log=lambda m: None)
    manifest = read_manifest(uri)
    summary = manifest.summary
    assert summary["corpus"]["documents"] == len(docs)
    budget = summary["budget"]["tokens"]
    assert budget == int(0.3 * summary["corpus"]["tokens"])
    assert 0 < manifest.selected_tokens <= budget
    # random selection stops only when the next document would not fit: it is within one document of budget
    assert budget - manifest.selected_tokens < max(manifest.table["n_tokens"].to_pylist()) * 5
    assert set(manifest.table["method"].to_pylist()) == {"random"}
    assert summary["config_hash"] == cfg.config_hash() and len(summary["corpus"]["shards"]) == 4
    assert summary["tokenizer"]["fingerprint"]
    ids = set(manifest.table["doc_id"].to_pylist())
    assert ids <= {d["id"] for d in docs}
    # each row points back to the right document
    by_id = {d["id"]: d["text"] for d in docs}
    from selector.data.corpus import Corpus

    c = Corpus(cfg.corpus)
    shards = {s.uri: s for s in c.list_shards()}
    first = manifest.table.slice(0, 3).to_pylist()
    for r in first:
        assert c.read_rows(shards[r["shard"]], [r["row"]]).texts[0] == by_id[r["doc_id"]]


def test_same_config_and_seed_give_an_identical_manifest(ray_local, small_corpus, tmp_path, tiny_tokenizer_dir):
    from ray_jobs.select import run

    corpus, _ = small_corpus
    tables = []
    for name, readers in (("a", 1), ("b", 3)):  # reader count is execution detail: same result
        cfg = job(corpus, tmp_path / name, tiny_tokenizer_dir, ray={"shard_readers": readers})
        tables.append(read_manifest(run(cfg, progress=False, log=lambda m: None)).table)
    assert tables[0].equals(tables[1])
    other_seed = job(corpus, tmp_path / "c", tiny_tokenizer_dir, seed=12)
    assert not read_manifest(run(other_seed, progress=False, log=lambda m: None)).table.equals(tables[0])


def test_rerun_resumes_from_the_work_dir(ray_local, small_corpus, tmp_path, tiny_tokenizer_dir):
    from ray_jobs.select import run

    corpus, _ = small_corpus
    cfg = job(corpus, tmp_path / "w", tiny_tokenizer_dir)
    logs = []
    first = run(cfg, progress=False, log=logs.append)
    # remove the manifest but keep the work dir: the index stage is found and not redone
    import shutil

    shutil.rmtree(tmp_path / "w" / "manifests")
    logs.clear()
    second = run(cfg, progress=False, log=logs.append)
    assert first == second
    assert any("(4 shards already indexed)" in m for m in logs), logs
    logs.clear()
    run(cfg, progress=False, log=logs.append)
    assert any("already committed" in m for m in logs)


def test_quarantined_records_are_counted_in_the_manifest(ray_local, tmp_path, tiny_tokenizer_dir):
    from ray_jobs.select import run

    write_shard(tmp_path / "c" / "a.jsonl", [{"text": "good document one"}, {"text": ""}, {"text": "another good one"}])
    (tmp_path / "c" / "b.jsonl").write_text('{"text": "fine"}\n{broken\n')
    cfg = job(tmp_path / "c", tmp_path / "w", tiny_tokenizer_dir,
              corpus={"uri": str(tmp_path / "c"), "on_bad_record": "quarantine"}, budget={"fraction": 1.0})
    manifest = read_manifest(run(cfg, progress=False, log=lambda m: None))
    assert manifest.summary["corpus"]["rejected"] == 2
    assert manifest.summary["corpus"]["documents"] == 3
    assert sorted(manifest.table["doc_id"].to_pylist()) == ["a.jsonl:0", "a.jsonl:2", "b.jsonl:0"]
    rejects = sorted((tmp_path / "w" / "runs").glob("*/rejects/*.jsonl"))
    reasons = [json.loads(line)["reason"] for p in rejects for line in p.read_text().splitlines()]
    assert any("empty" in r for r in reasons) and any("invalid JSON" in r for r in reasons)


def test_bad_record_in_error_mode_fails_the_job_naming_shard_and_row(ray_local, tmp_path, tiny_tokenizer_dir):
    import ray

    from ray_jobs.select import run

    write_shard(tmp_path / "c" / "a.jsonl", [{"text": "ok"}, {"text": 5}])
    cfg = job(tmp_path / "c", tmp_path / "w", tiny_tokenizer_dir, corpus={"uri": str(tmp_path / "c")})
    with pytest.raises(ray.exceptions.RayTaskError, match="shard a.jsonl, row 1, field 'text'"):
        run(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "w" / "manifests").exists() or not any((tmp_path / "w" / "manifests").glob("*/_SUCCESS"))


def test_wrong_tokenizer_path_is_a_clear_error(ray_local, small_corpus, tmp_path):
    from ray_jobs.select import run

    corpus, _ = small_corpus
    with pytest.raises(ModelLoadError, match="does not exist"):
        run(job(corpus, tmp_path / "w", tmp_path / "no-such-tokenizer"), progress=False, log=lambda m: None)


def test_random_job_reads_from_and_writes_to_s3(ray_local, small_corpus, s3_bucket, tiny_tokenizer_dir):
    import fsspec

    from ray_jobs.select import run

    corpus, docs = small_corpus
    opts = s3_bucket["storage_options"]
    fs = fsspec.filesystem("s3", **opts)
    bucket = s3_bucket["bucket"]
    for path in sorted(corpus.iterdir()):
        fs.put_file(str(path), f"{bucket}/corpus/{path.name}")
    cfg = job(f"s3://{bucket}/corpus", f"s3://{bucket}/thresher", tiny_tokenizer_dir,
              corpus={"uri": f"s3://{bucket}/corpus", "id_column": "id", "storage_options": opts},
              work={"root": f"s3://{bucket}/thresher", "storage_options": opts})
    uri = run(cfg, progress=False, log=lambda m: None)
    assert uri == f"s3://{bucket}/thresher/manifests/{cfg.resolved_run_id()}"
    manifest = read_manifest(uri, opts)
    assert manifest.summary["corpus"]["documents"] == len(docs)
    assert all(s.startswith(f"s3://{bucket}/corpus/") for s in manifest.table["shard"].to_pylist())
    # the written summary never holds the secret
    raw = fs.cat_file(f"{bucket}/thresher/manifests/{cfg.resolved_run_id()}/manifest.json").decode()
    assert '"testing"' not in raw and "***redacted***" in raw
    # same selection as the local run of the same config (ids are the id column, the seed is the same)
    local = read_manifest(run(job(corpus, "/tmp/thresher-s3-compare-" + bucket, tiny_tokenizer_dir),
                              progress=False, log=lambda m: None))
    assert manifest.table["doc_id"].to_pylist() == local.table["doc_id"].to_pylist()
