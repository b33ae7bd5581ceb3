"""Every selection method end to end through ray_jobs.select on a real local Ray and tiny real models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from selector.config import parse_config
from selector.demo.corpus import write_shard
from selector.data.manifest import read_manifest, unpack_mask
from selector.demo.textsources import docstrings, pydoc_topics, synthetic_low_quality

QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    good = [{"id": f"doc/{d.name}", "text": d.text[:1500]} for d, _ in zip(docstrings(), range(60))]
    bad = [{"id": f"low/{d.name}", "text": d.text[:1500]} for d in synthetic_low_quality(24, seed=1)]
    docs = good + bad
    for i, suffix in enumerate(["parquet", "jsonl", "jsonl.gz"]):
        write_shard(root / "corpus" / f"part-{i}.{suffix}", docs[i::3])
    write_shard(root / "reference" / "ref.jsonl", [{"text": d.text[:1500]} for d, _ in zip(pydoc_topics(), range(12))])
    return root, docs


def config(corpus, work, tokenizer, **over):
    root, _ = corpus
    cfg = {"seed": 3, "tokenizer": str(tokenizer),
           "corpus": {"uri": str(root / "corpus"), "id_column": "id", "batch_size": 16},
           "work": {"root": str(work)}, "budget": {"fraction": 0.3},
           "ray": {"shard_readers": 2, "influence_workers": 2, "embed_workers": 1, "worker_num_cpus": 0.25}}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def quad_sections(corpus, tiny_llama_dir, tiny_bert_dir):
    root, _ = corpus
    return {
        "proxy_model": str(tiny_llama_dir),
        "reference": {"uri": str(root / "reference"), "max_documents": 12},
        "embed": {"model": str(tiny_bert_dir), "max_tokens": 64, "batch_size": 32},
        "cluster": {"k": 6, "seed": 0, "neighbour_radius": 0.5},
        "influence": {"chunk_tokens": 128, "batch_size": 8},
        "factors": {"documents": 24},
        "quad": {"block_size": 4, "warmup_size": 16, "arms_per_round": 2, "sample_ratio": 0.25,
                 "neighbour_radius": 0.5, "fill_rejected": True},
    }


def check_rows(manifest, docs, method):
    ids = manifest.table["doc_id"].to_pylist()
    assert ids and len(set(ids)) == len(ids)
    assert set(ids) <= {d["id"] for d in docs}
    assert set(manifest.table["method"].to_pylist()) == {method}
    assert 0 < manifest.selected_tokens <= manifest.summary["budget"]["tokens"]


def test_quad_selects_by_cluster_with_rounds_and_scores(ray_local, corpus, tmp_path, tiny_tokenizer_dir, quad_sections):
    from ray_jobs.select import run

    cfg = parse_config(config(corpus, tmp_path, tiny_tokenizer_dir, method="quad", **quad_sections))
    manifest = read_manifest(run(cfg, **QUIET))
    check_rows(manifest, corpus[1], "quad")
    t = manifest.table
    assert None not in t["cluster"].to_pylist() and None not in t["round"].to_pylist()
    assert all(np.isfinite(t["score"].to_numpy()))
    quad = manifest.summary["quad"]
    assert quad["history"] and quad["tau"] is not None
    assert manifest.summary["models"]["proxy_model"] == str(quad_sections["proxy_model"])
    assert manifest.summary["stages"]["cluster"]["k"] == 6
    # the report renders from the committed manifest
    from selector.data.report import write_report

    html = Path(write_report(manifest.uri, str(tmp_path / "report.html"))).read_text()
    assert html.count("data:image/png;base64,") == 5


def test_quad_validates_tau_on_a_held_out_part_of_the_reference_set(ray_local, corpus, tmp_path, tiny_tokenizer_dir,
                                                                    quad_sections):
    """quad.tau: validate (the paper's procedure): buckets of the warm-up, a short proxy training on
    each cumulative bucket prefix, the lowest validation loss picks tau; its table and cost land in
    the manifest, and the warm-up documents above it are kept."""
    from ray_jobs.select import run

    sections = dict(quad_sections, quad=dict(quad_sections["quad"], tau="validate", tau_buckets=4,
                                             validation_fraction=0.34, validation_steps=3, warmup_size=24))
    manifest = read_manifest(run(parse_config(config(corpus, tmp_path, tiny_tokenizer_dir, method="quad",
                                                     **sections)), **QUIET))
    check_rows(manifest, corpus[1], "quad")
    quad = manifest.summary["quad"]
    val = quad["tau_validation"]
    assert len(val["table"]) == 4 and val["seconds"] > 0 and val["steps"] == 3
    best = min((r for r in val["table"] if r["val_loss"] is not None), key=lambda r: (r["val_loss"], r["bucket"]))
    assert val["bucket"] == best["bucket"] and quad["thresholds"]["doc"] == best["low"] == val["tau"]
    warm = next(h for h in quad["history"] if h["kind"] == "warmup")
    kept = set(manifest.table["doc_id"].to_pylist())
    above = {d for d, x in zip(warm["doc_ids"], warm["scores"]) if x > val["tau"]}
    assert above and above <= kept  # the budget (30%) holds the warm-up's passers


def test_quad_never_builds_the_corpus_index_in_the_driver(ray_local, corpus, tmp_path, tiny_tokenizer_dir,
                                                          quad_sections):
    """Quad reads and reports documents by (shard, row): the job never asks for the index of every
    document (``Job.documents``), through the factor sample, warm-up, tau validation, sampled and
    expanded rounds, and the manifest rows; those rows still carry each document's index location."""
    import ray_jobs.select as select
    from selector.data.index import INDEX_STAGE
    from selector.data.workdir import WorkDir, shard_key

    # no method can ask for the index of every document, nor for a driver-side doc_id -> reader map
    assert not hasattr(select.Job, "documents") and not hasattr(select.Job, "owners")
    sections = dict(quad_sections, quad=dict(quad_sections["quad"], accept="two_stage", tau="validate",
                                             tau_buckets=3, validation_steps=2, warmup_size=16))
    cfg = parse_config(config(corpus, tmp_path, tiny_tokenizer_dir, method="quad", run_id="located", **sections))
    manifest = read_manifest(select.run(cfg, **QUIET))
    check_rows(manifest, corpus[1], "quad")
    history = manifest.summary["quad"]["history"]
    assert {"warmup", "bandit", "expand"} <= {h["kind"] for h in history}
    assert manifest.summary["quad"]["tau_validation"]["bucket"] is not None
    workdir = WorkDir(str(tmp_path), "located")
    where = {}
    for shard in (root := corpus[0] / "corpus").iterdir():
        t = workdir.read_table(INDEX_STAGE, shard_key(shard.name))
        where.update({d: (str(root / s), r, n) for d, s, r, n in zip(*(t[c].to_pylist() for c in
                                                                        ("doc_id", "shard", "row", "n_tokens")))})
    t = manifest.table
    assert [where[d] for d in t["doc_id"].to_pylist()] == \
        [(s.removeprefix("file://"), r, n) for s, r, n in zip(*(t[c].to_pylist() for c in ("shard", "row", "n_tokens")))]


def test_baselines_on_the_same_engine(ray_local, corpus, tmp_path, tiny_tokenizer_dir, quad_sections):
    from ray_jobs.select import run

    topk = read_manifest(run(parse_config(config(corpus, tmp_path / "t", tiny_tokenizer_dir, method="topk-influence",
                                                 **quad_sections)), **QUIET))
    check_rows(topk, corpus[1], "topk-influence")
    scores = topk.table["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)
    assert topk.summary["stages"]["influence"]["scored_documents"] == len(corpus[1])
    # the merge of the per-shard ranked runs the workers wrote selects what topk_influence does over all scores
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selector.selection.baselines import topk_influence

    runs = sorted((tmp_path / "t" / "runs").glob("*/influence_runs/*.parquet"))
    assert len(runs) == 3  # one per shard
    scored = pa.concat_tables([pq.read_table(r) for r in runs])
    want = topk_influence(scored["doc_id"].to_pylist(), scored["n_tokens"].to_numpy(), scored["score"].to_numpy(),
                          topk.summary["budget"]["tokens"], 3)
    assert topk.table["doc_id"].to_pylist() == scored.take(pa.array(want, pa.int64()))["doc_id"].to_pylist()

    explore = read_manifest(run(parse_config(config(corpus, tmp_path / "e", tiny_tokenizer_dir,
                                                    method="exploration-only", **quad_sections)), **QUIET))
    check_rows(explore, corpus[1], "exploration-only")
    assert len(set(explore.table["cluster"].to_pylist())) >= 3  # diversity: several clusters visited


def test_perplexity_and_rho_with_token_masks(ray_local, corpus, tmp_path, tiny_tokenizer_dir, tiny_llama_dir,
                                             tiny_llama_dir_2):
    from ray_jobs.select import run

    rho_section = {"reference_model": str(tiny_llama_dir_2), "training_model": str(tiny_llama_dir),
                   "max_length": 128, "overlap": 16, "keep_ratio": 0.6, "global_method": "exact", "num_workers": 1,
                   "worker_num_cpus": 0.25}
    ppl = read_manifest(run(parse_config(config(corpus, tmp_path / "p", tiny_tokenizer_dir, method="perplexity",
                                                rho=rho_section)), **QUIET))
    check_rows(ppl, corpus[1], "perplexity")
    assert ppl.table["score"].to_pylist() == sorted(ppl.table["score"].to_pylist())  # lowest loss first
    # the merge of the per-shard runs the workers wrote selects what one greedy pass over all scores does
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selector.rho.excess_loss import select_by_score

    runs = sorted((tmp_path / "p" / "runs").glob("*/losses/*.parquet"))
    assert len(runs) == 3  # one per shard
    scores = pa.concat_tables([pq.read_table(r) for r in runs])
    losses = ppl.summary["stages"]["losses"]
    assert losses["documents"] == len(corpus[1]) == scores.num_rows + losses["unscored_documents"]
    want = select_by_score(scores["doc_id"].to_pylist(), scores["ref_mean"].to_numpy(), scores["n_tokens"].to_numpy(),
                           ppl.summary["budget"]["tokens"], descending=False)
    assert ppl.table["doc_id"].to_pylist() == scores.take(pa.array(want, pa.int64()))["doc_id"].to_pylist()

    rho = read_manifest(run(parse_config(config(corpus, tmp_path / "r", tiny_tokenizer_dir, method="rho",
                                                rho=rho_section, mask_tokens=True)), **QUIET))
    check_rows(rho, corpus[1], "rho")
    assert rho.table["score"].to_pylist() == sorted(rho.table["score"].to_pylist(), reverse=True)
    masks = list(rho.token_masks())
    assert all(m is not None for m in masks)
    kept = sum(int(m.sum()) for m in masks)
    scored = sum(len(m) - 1 for m in masks)  # the first token of a document has no prediction
    assert abs(kept / scored - 0.6) < 0.01
    assert rho.summary["tokenizer"]["token_masks"] and rho.summary["stages"]["mask"]["keep_ratio"] == 0.6


def test_gtp_selects_weighted_documents(ray_local, corpus, tmp_path, tiny_tokenizer_dir, tiny_llama_dir,
                                        tiny_llama_dir_2, quad_sections):
    from ray_jobs.select import run

    gtp = {"checkpoints": [str(tiny_llama_dir), str(tiny_llama_dir_2)], "projection_dim_a": 4, "projection_dim_g": 4,
           "chunk_tokens": 128, "target": "reference"}
    manifest = read_manifest(run(parse_config(config(corpus, tmp_path, tiny_tokenizer_dir, method="gtp", gtp=gtp,
                                                     reference=quad_sections["reference"])), **QUIET))
    check_rows(manifest, corpus[1], "gtp")
    weights = manifest.table["weight"].to_numpy()
    assert (weights > 0).all() and abs(weights.mean() - 1.0) < 1e-9
    assert 0 <= manifest.summary["stages"]["gtp"]["rel_residual"] <= 1.0


def test_method_sections_are_required():
    from selector.errors import ConfigError

    base = {"tokenizer": "/t", "corpus": {"uri": "/c"}, "work": {"root": "/w"}, "budget": {"tokens": 5}}
    for method, needs in [("quad", "proxy_model and reference"), ("rho", "rho section"), ("gtp", "gtp section")]:
        with pytest.raises(ConfigError, match=needs):
            parse_config(dict(base, method=method))


def test_killed_quad_job_resumes_to_the_uninterrupted_manifest(corpus, tmp_path, tiny_tokenizer_dir, quad_sections):
    """Kill a running quad job (SIGKILL to its process group, local Ray included) mid-bandit,
    re-run it, and compare with an uninterrupted run of the same config."""
    sections = dict(quad_sections, quad=dict(quad_sections["quad"], arms_per_round=1, block_size=2,
                                             fill_rejected=False))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)

    def job_file(root, run_id):
        cfg = config(corpus, root, tiny_tokenizer_dir, method="quad", run_id=run_id, **sections)
        cfg["ray"]["num_cpus"] = 4
        path = tmp_path / f"{run_id}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(path):
        return subprocess.Popen([sys.executable, "-m", "ray_jobs.select", "--config", str(path), "--no-progress"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    killed_root = tmp_path / "killed"
    path = job_file(killed_root, "resume-me")
    proc = start(path)
    state = killed_root / "runs" / "resume-me" / "state" / "bandit.json"
    deadline = time.time() + 300
    round_at_kill = None
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                current = json.loads(state.read_text())["next_round"]
            except (ValueError, KeyError):
                current = None
            if current is not None and current >= 4:
                os.killpg(proc.pid, signal.SIGKILL)
                round_at_kill = current
                break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert round_at_kill is not None, "the job finished or stalled before it could be killed mid-bandit:\n" + \
        proc.stdout.read().decode()[-3000:]
    assert not (killed_root / "manifests" / "resume-me" / "_SUCCESS").exists()

    resumed = start(path)
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out.decode()[-3000:]
    text = out.decode()
    assert "already indexed" in text and "K-FAC factors found in the work dir" in text
    assert "quad: resumed the bandit at round" in text

    fresh = start(job_file(tmp_path / "fresh", "resume-me"))
    out2, _ = fresh.communicate(timeout=400)
    assert fresh.returncode == 0, out2.decode()[-3000:]
    a = read_manifest(str(killed_root / "manifests" / "resume-me")).table
    b = read_manifest(str(tmp_path / "fresh" / "manifests" / "resume-me")).table
    assert a.drop(["shard"]).equals(b.drop(["shard"]))
