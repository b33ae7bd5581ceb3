"""The nightly refresh (ray_jobs.refresh) on the S3-protocol server with real Ray and tiny real models:
only new shards are embedded, the delta is right, an unchanged corpus gives the same selection, a
deleted shard's documents leave it, two refreshes never run at once, drift triggers a refit."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from selector.quad.bandit import UCBBandit
from selector.config import parse_config
from selector.demo.corpus import write_shard
from selector.errors import ConfigError
from selector.data.lease import Lease, LeaseHeldError
from selector.data.manifest import read_manifest
from selector.quad.loop import QuadConfig, QuadSelector
from selector.data.refresh import (RefreshConfig, classify_shards, default_lease_name, document_counts, drift_ratio,
                              load_refresh_config, selection_delta, split_refresh_config)
from selector.demo.textsources import docstrings, synthetic_low_quality

QUIET = dict(progress=False, log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}")
             if os.environ.get("THRESHER_TEST_LOG") else None)
N_SHARDS = 5


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory):
    """Five local shards (docstrings plus low-quality text), uploaded by the tests as they need them."""
    root = tmp_path_factory.mktemp("refresh-corpus")
    good = [{"id": f"doc/{d.name}", "text": d.text[:1200]} for d, _ in zip(docstrings(), range(80))]
    bad = [{"id": f"low/{d.name}", "text": d.text[:1200]} for d in synthetic_low_quality(20, seed=2)]
    docs = good + bad
    files = []
    for i in range(N_SHARDS):
        path = root / f"part-{i}.{'parquet' if i % 2 == 0 else 'jsonl'}"
        write_shard(path, docs[i::N_SHARDS])
        files.append((path, [d["id"] for d in docs[i::N_SHARDS]]))
    reference = root / "reference" / "ref.jsonl"
    write_shard(reference, [{"text": d.text[:1200]} for d, _ in zip(docstrings(), range(100, 112))])
    return files, reference


@pytest.fixture
def s3(s3_bucket):
    fs = s3fs.S3FileSystem(**s3_bucket["storage_options"])
    base = f"s3://{s3_bucket['bucket']}"
    return fs, base, s3_bucket["storage_options"]


def upload(fs, base, shard_files, indices):
    for i in indices:
        path, _ = shard_files[0][i]
        fs.put(str(path), f"{base}/corpus/{path.name}")


def job_config(base, so, tokenizer, method="random", **sections):
    cfg = {"method": method, "seed": 3, "tokenizer": str(tokenizer),
           "corpus": {"uri": f"{base}/corpus", "id_column": "id", "batch_size": 16, "storage_options": so},
           "work": {"root": f"{base}/work", "storage_options": so}, "budget": {"fraction": 0.3},
           "ray": {"shard_readers": 2, "influence_workers": 2, "embed_workers": 1, "worker_num_cpus": 0.25}}
    cfg.update(sections)
    return parse_config(cfg)


def quad_sections(shard_files, tiny_llama_dir, tiny_bert_dir, so=None):
    _, reference = shard_files
    return {
        "proxy_model": str(tiny_llama_dir),
        "reference": {"uri": str(reference.parent), "max_documents": 12},
        "embed": {"model": str(tiny_bert_dir), "max_tokens": 64, "batch_size": 32},
        "cluster": {"k": 6, "seed": 0, "neighbour_radius": 0.5},
        "influence": {"chunk_tokens": 128, "batch_size": 8},
        "factors": {"documents": 24},
        "quad": {"block_size": 4, "warmup_size": 16, "arms_per_round": 2, "sample_ratio": 0.25,
                 "neighbour_radius": 0.5, "fill_rejected": True},
    }


def embed_markers(fs, base, lineage):
    """created_at of every embeddings marker in the lineage work dir (rewritten only when a shard is embedded)."""
    import json

    out = {}
    fs.invalidate_cache()  # s3fs caches listings
    for path in fs.glob(f"{base}/work/runs/{lineage}/embed/*.done.json"):
        if ".ids." not in path:
            out[path.rsplit("/", 1)[-1]] = json.loads(fs.cat_file(path))["created_at"]
    return out


def delta_of(fs, uri):
    table = pq.read_table(fs.open(f"{uri}/delta.parquet", "rb"))
    return {c: {d for d, k in zip(table["doc_id"].to_pylist(), table["change"].to_pylist()) if k == c}
            for c in ("added", "removed")}


def test_refresh_embeds_only_new_shards_and_writes_the_delta(ray_local, s3, shard_files, tiny_tokenizer_dir,
                                                               tiny_llama_dir, tiny_bert_dir):
    from ray_jobs.refresh import refresh
    from selector.data.refresh import lineage_id

    fs, base, so = s3
    upload(fs, base, shard_files, [0, 1, 2])
    cfg = job_config(base, so, tiny_tokenizer_dir, "quad", **quad_sections(shard_files, tiny_llama_dir, tiny_bert_dir))
    settings = RefreshConfig(drift_threshold=100.0)
    lineage = lineage_id(cfg)

    # 1. first refresh of the lineage: a full run, every selected document is "added"
    m1 = read_manifest(refresh(settings, cfg, **QUIET), so)
    r1 = m1.summary["refresh"]
    assert m1.summary["previous_run_id"] is None and r1["lineage"] == lineage
    assert m1.summary["stages"]["embed"]["shards_embedded"] == 3
    assert r1["changes"]["shards"]["added"] == 3 and r1["bandit"]["arms"]
    assert delta_of(fs, m1.uri) == {"added": set(m1.table["doc_id"].to_pylist()), "removed": set()}
    assert m1.summary["run_id"].startswith("quad-refresh-") and len(m1) > 0
    markers = embed_markers(fs, base, lineage)
    assert len(markers) == 3

    # 2. nothing changed: the same selection, nothing embedded (markers untouched), empty delta
    m2 = read_manifest(refresh(settings, cfg, **QUIET), so)
    r2 = m2.summary["refresh"]
    assert m2.summary["previous_run_id"] == m1.summary["run_id"] and r2["reused_selection"]
    assert m2.table.equals(m1.table)
    assert "embed" not in m2.summary["stages"] and m2.summary["stages"]["index"]["shards_skipped"] == 3
    assert embed_markers(fs, base, lineage) == markers
    assert delta_of(fs, m2.uri) == {"added": set(), "removed": set()}
    assert r2["changes"]["shards"] == {"added": 0, "removed": 0, "changed": 0, "touched": 0, "unchanged": 3}

    # 3. two shards added: only they are embedded and assigned to the kept centroids; the bandit carries on
    upload(fs, base, shard_files, [3, 4])
    m3 = read_manifest(refresh(settings, cfg, **QUIET), so)
    r3, stages = m3.summary["refresh"], m3.summary["stages"]
    assert stages["embed"]["shards_embedded"] == 2 and stages["embed"]["shards_skipped"] == 3
    after = embed_markers(fs, base, lineage)
    assert {k: after[k] for k in markers} == markers and len(after) == 5  # the old three were not redone
    assert stages["cluster"]["refit"] is False and stages["cluster"]["shards_assigned"] == 2
    assert stages["cluster"]["drift"] > 0
    assert stages["bandit_carry"]["carried_arms"] > 0 and stages["bandit_carry"]["from_run_id"] == m2.summary["run_id"]
    # the influence scores of the run that made the (reused) selection are looked up, not recomputed
    assert r2["score_cache"]["log"] == m1.summary["run_id"] == r3["score_cache"]["cache_from"]
    assert r3["score_cache"]["cached_scores"] > 0 and stages["quad"]["cache_hits"] > 0
    assert stages["quad"]["cache_misses"] > 0  # the new shards' documents
    new_ids = set(shard_files[0][3][1]) | set(shard_files[0][4][1])
    assert r3["changes"]["shards"]["added"] == 2
    assert r3["changes"]["documents"] == {"added": len(new_ids), "removed": 0,
                                          "unchanged": m3.summary["corpus"]["documents"] - len(new_ids)}
    before, now = set(m2.table["doc_id"].to_pylist()), set(m3.table["doc_id"].to_pylist())
    delta = delta_of(fs, m3.uri)
    assert delta == {"added": now - before, "removed": before - now}
    assert r3["delta"] == {"added": len(now - before), "removed": len(before - now), "file": "delta.parquet"}
    assert now & new_ids, "the new shards' documents compete for the budget"


def test_two_refreshes_of_one_corpus_never_run_at_once(ray_local, s3, shard_files, tiny_tokenizer_dir):
    from ray_jobs.refresh import refresh

    fs, base, so = s3
    upload(fs, base, shard_files, [0, 1])
    cfg = job_config(base, so, tiny_tokenizer_dir)
    settings = RefreshConfig(lease_ttl_s=60)
    lease_name = default_lease_name(cfg)
    watcher = Lease(cfg.work.root, lease_name, storage_options=so)

    # two refreshes started together: the one that finds the lease held refuses, naming the holder
    results = {}

    def first():
        try:
            results["uri"] = refresh(settings, cfg, holder_id="refresh-A", **QUIET)
        except Exception as exc:  # surfaced below
            results["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.time() + 60
    while watcher.read() is None and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    with pytest.raises(LeaseHeldError, match=r"lease 'refresh-[0-9a-f]+' is held by refresh-A .*another refresh "
                                             r"of this corpus is running"):
        refresh(settings, cfg, holder_id="refresh-B", **QUIET)
    thread.join(timeout=300)
    assert "error" not in results, results.get("error")
    assert read_manifest(results["uri"], so).summary["refresh"]["lease"] == lease_name
    assert watcher.read() is None, "the lease is released when the refresh ends"

    # a dead holder's lease (no heartbeat for longer than its ttl) is taken over, and says so;
    # meanwhile a shard was deleted: its documents leave the selection
    first = read_manifest(results["uri"], so)
    gone_path, gone_ids = shard_files[0][1]
    fs.rm(f"{base}/corpus/{gone_path.name}")
    Lease(cfg.work.root, lease_name, holder_id="dead-holder", ttl_s=0.5, storage_options=so).acquire()
    time.sleep(1.0)
    messages = []
    uri = refresh(settings, cfg, holder_id="refresh-C", progress=False, log=messages.append)
    assert any("taking over a stale lease from dead-holder" in m for m in messages)
    second = read_manifest(uri, so)
    assert second.summary["previous_run_id"] == first.summary["run_id"]
    ids = set(second.table["doc_id"].to_pylist())
    assert ids and not ids & set(gone_ids)
    assert not any(gone_path.name in s for s in second.table["shard"].to_pylist())
    changes = second.summary["refresh"]["changes"]
    assert changes["removed_shards"] == [gone_path.name] and changes["documents"]["removed"] == len(gone_ids)
    before = set(first.table["doc_id"].to_pylist())
    assert before & set(gone_ids), "the deleted shard had selected documents"
    assert delta_of(fs, uri) == {"added": ids - before, "removed": before - ids}


def test_rewritten_shard_keeps_its_embeddings_and_drift_refits(ray_local, tmp_path, shard_files, tiny_tokenizer_dir,
                                                               tiny_bert_dir):
    """On local disk a re-written shard gets a new mtime (its version) but the same content digest: it is
    not re-embedded. A drift ratio over the threshold refits k-means (and nothing is carried)."""
    from ray_jobs.refresh import refresh

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path, _ in shard_files[0][:2]:
        (corpus / path.name).write_bytes(path.read_bytes())
    cfg = parse_config({"method": "exploration-only", "seed": 1, "tokenizer": str(tiny_tokenizer_dir),
                        "corpus": {"uri": str(corpus), "id_column": "id"}, "work": {"root": str(tmp_path / "w")},
                        "budget": {"fraction": 0.3}, "cluster": {"k": 3}, "quad": {"block_size": 4},
                        "embed": {"model": str(tiny_bert_dir), "max_tokens": 64},
                        "ray": {"embed_workers": 1, "worker_num_cpus": 0.25}})
    settings = RefreshConfig(drift_threshold=1e-6)
    m1 = read_manifest(refresh(settings, cfg, **QUIET))
    assert m1.summary["stages"]["cluster"]["refit"] is False  # the first fit is not a refit
    target = corpus / shard_files[0][0][0].name
    target.write_bytes(target.read_bytes())
    os.utime(target, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse-clock file systems
    path, _ = shard_files[0][2]
    (corpus / path.name).write_bytes(path.read_bytes())
    m2 = read_manifest(refresh(settings, cfg, **QUIET))
    refresh_info, stages = m2.summary["refresh"], m2.summary["stages"]
    assert refresh_info["changes"]["touched_shards"] == [target.name]
    assert refresh_info["changes"]["added_shards"] == [path.name] and refresh_info["changes"]["shards"]["changed"] == 0
    assert refresh_info["shards"][target.name]["version"] != m1.summary["refresh"]["shards"][target.name]["version"]
    assert stages["embed"]["shards_embedded"] == 1 and stages["embed"]["shards_skipped"] == 2
    assert stages["cluster"]["refit"] is True and stages["cluster"]["fit_skipped"] is False
    assert stages["cluster"]["drift"] > 1e-6 and refresh_info["cluster"]["refit"] is True


# ----------------------------------------------------------------------------- pure parts


def test_bandit_statistics_carry_forward_with_decay():
    old = UCBBandit([0, 1, 2, 3], alpha=1.0, seed=0)
    for arm, reward in [(0, 1.0), (0, 3.0), (1, -1.0), (2, 0.5), (3, 2.0)]:
        old.update(arm, reward)
    new = UCBBandit([0, 1, 2, 7], alpha=1.0, seed=0)  # cluster 3 has no documents now; 7 is new
    assert new.carry_forward(old.to_dict(), decay=0.5) == 3
    assert new.pulls.tolist() == [1, 0, 0, 0] and new.total_pulls == 1  # round(0.5*2)=1, round(0.5)=0 (even)
    np.testing.assert_allclose(new.means(), [2.0, -1.0, 0.5, 0.0])  # means kept, confidence shrunk
    np.testing.assert_allclose(new.weight, [1.0, 0.5, 0.5, 0.0])
    full = UCBBandit([0, 1], seed=0)
    full.carry_forward(old.to_dict(), decay=1.0)
    assert full.pulls.tolist() == [2, 1] and full.total_pulls == 3
    with pytest.raises(ValueError, match="fresh bandit"):
        full.carry_forward(old.to_dict())
    with pytest.raises(ValueError, match="decay"):
        UCBBandit([0]).carry_forward(old.to_dict(), decay=1.5)


def test_quad_selector_carry_forward_steers_the_first_round():
    ids = [f"d{i}" for i in range(40)]
    clusters = [i % 4 for i in range(40)]
    cfg = QuadConfig(tau=0.0, reward_scale=1.0, warmup_size=0, arms_per_round=1, block_size=2, alpha=0.1)
    prior = UCBBandit([0, 1, 2, 3], seed=0)
    prior.update(2, 5.0)  # cluster 2 paid off last night
    q = QuadSelector(cfg, ids, clusters, [10] * 40, budget_tokens=100, seed=0)
    assert q.carry_forward(prior.to_dict(), decay=1.0) == 4
    assert q.plan_round().items[0].cluster == 2
    restored = QuadSelector.from_dict(q.to_dict(), ids, clusters, [10] * 40)
    assert restored.bandit.pulls.tolist() == q.bandit.pulls.tolist()
    q.apply_round([[1.0] * len(q.plan_round().items[0].sample)])
    with pytest.raises(ValueError, match="before the first round"):
        q.carry_forward(prior.to_dict())


def test_shard_classification_and_document_counts():
    prev = {"a": {"size": 1, "version": "v1", "digest": "A", "documents": 10},
            "b": {"size": 2, "version": "v1", "digest": "B", "documents": 20},
            "c": {"size": 3, "version": "v1", "digest": "C", "documents": 30},
            "d": {"size": 4, "version": "v1", "digest": "D", "documents": 40}}
    now = {"a": {"size": 1, "version": "v1", "digest": "A", "documents": 10},   # unchanged
           "b": {"size": 2, "version": "v2", "digest": "B", "documents": 20},   # touched (same content)
           "c": {"size": 5, "version": "v2", "digest": "C2", "documents": 35},  # changed
           "e": {"size": 6, "version": "v1", "digest": "E", "documents": 7}}    # added; d removed
    changes = classify_shards(now, prev)
    assert (changes.added, changes.removed, changes.changed, changes.touched, changes.unchanged) == \
        (["e"], ["d"], ["c"], ["b"], ["a"])
    assert changes.any_change and changes.counts()["unchanged"] == 2
    assert document_counts(changes, now, prev) == {"added": 42, "removed": 70, "unchanged": 30}
    same = classify_shards({"a": now["a"], "b": now["b"]}, {"a": prev["a"], "b": prev["b"]})
    assert not same.any_change


def test_drift_ratio_and_delta():
    assert drift_ratio(None, 0.2) is None
    assert drift_ratio(0.3, 0.2) == pytest.approx(1.5)
    assert drift_ratio(0.1, 0.0) == float("inf") and drift_ratio(0.0, 0.0) == 1.0
    delta = selection_delta(["a", "b", "c"], ["c", "d", "b"])
    assert delta.to_pydict() == {"doc_id": ["d", "a"], "change": ["added", "removed"]}
    assert selection_delta([], []).num_rows == 0


def test_refresh_config_section_is_split_from_the_job_config(tmp_path):
    base = {"tokenizer": "/t", "corpus": {"uri": "/c"}, "work": {"root": "/w"}, "budget": {"tokens": 5}}
    settings, job = split_refresh_config(dict(base, refresh={"name": "c4-nightly", "drift_threshold": 2}))
    assert settings.name == "c4-nightly" and settings.drift_threshold == 2.0 and job.method == "random"
    settings, _ = split_refresh_config(base)
    assert settings == RefreshConfig()
    with pytest.raises(ConfigError, match="refresh.drift_treshold: unknown key"):
        split_refresh_config(dict(base, refresh={"drift_treshold": 2}))
    with pytest.raises(ConfigError, match="corpus.uri: required key missing"):
        split_refresh_config(dict(base, corpus={}))
    # the deployed nightly config is a valid refresh config
    deploy = Path(__file__).resolve().parent.parent / "deploy" / "configs" / "refresh.yaml"
    settings, job = load_refresh_config(deploy)
    assert settings.lease_ttl_s == 900 and job.corpus.uri.startswith("s3://")
