"""The driver never collects the corpus: random and quad jobs run with the driver's memory capped below
the size of the corpus's ids (``resource.setrlimit(RLIMIT_DATA)`` in a fresh subprocess), and the same
cap is shown to stop a driver that does collect them.

The corpus has long document ids (128 KB each, 2,000 documents: 256 MB of ids; 1% of the tokens selected), so holding its index
-- or the list of its ids -- in the driver would cost more than the cap leaves free. Ray's own
processes start before the cap (they are not the driver's to count); the driver first runs each
method on a small corpus, so the cap is set over a driver that has imported and done everything once.
"""

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selector.demo.textsources import docstrings

N_DOCS = 2_000
ID_CHARS = 128_000
HEADROOM_MIB = 100  # what the capped driver may still allocate: well under half the ids' size

SCRIPT = textwrap.dedent("""
    import json, re, resource, sys, threading, time
    import ray
    from ray_jobs.select import run
    from selector.config import parse_config
    from selector.data.corpus import Corpus
    from selector.data.manifest import read_manifest
    from selector.data.workdir import WorkDir
    from selector.data.index import read_index

    def vm_data():
        return int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    class PeakRSS(threading.Thread):  # the driver's resident memory, sampled every 20 ms
        def __init__(self):
            super().__init__(daemon=True)
            self.peak, self.stop = rss(), threading.Event()
        def run(self):
            while not self.stop.wait(0.02):
                self.peak = max(self.peak, rss())

    small, big = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    quiet = dict(progress=False, log=lambda m: None)
    for cfg in small:  # warm: every import and first-use cost paid
        read_manifest(run(parse_config(cfg), **quiet))
    base = vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (base + {headroom} * 2**20, resource.RLIM_INFINITY))
    out = {{}}
    for cfg in big:
        before, sampler, started = rss(), PeakRSS(), time.monotonic()
        sampler.start()
        manifest = read_manifest(run(parse_config(cfg), **quiet), columns=["doc_id", "n_tokens"])
        sampler.stop.set()
        sampler.join()
        out[cfg["method"]] = {{"selected": manifest.table.num_rows, "vm_data_growth": vm_data() - base,
                              "peak_rss_growth": sampler.peak - before, "seconds": time.monotonic() - started}}
        del manifest
    # the control: the same capped driver collecting the corpus's ids fails
    cfg = parse_config(big[0])
    workdir = WorkDir(cfg.work.root, cfg.resolved_run_id())
    shards = Corpus(cfg.corpus).list_shards()
    try:  # what a driver-side index (the design before issue 14) did: every shard's index, then the ids
        table = read_index(workdir, [s.relpath for s in shards])
        out["control"] = f"collected {{len(table['doc_id'].to_pylist())}} ids under the cap"
    except MemoryError:
        out["control"] = "MemoryError"
    print("RESULT " + json.dumps(out))
""").format(headroom=HEADROOM_MIB)


@pytest.fixture(scope="module")
def long_id_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("long-ids")
    texts = [d.text[:600] for d, _ in zip(docstrings(), range(400))]
    pad = "x" * (ID_CHARS - 8)
    (root / "big").mkdir()
    for s in range(4):
        rows = range(s, N_DOCS, 4)
        pq.write_table(pa.table({"id": [f"{pad}{i:08d}" for i in rows], "text": [texts[i % len(texts)] for i in rows]}),
                       root / "big" / f"part-{s}.parquet", compression="zstd")
    (root / "small").mkdir()
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(80)], "text": texts[:80]}), root / "small" / "part-0.parquet")
    (root / "reference").mkdir()
    pq.write_table(pa.table({"text": texts[-12:]}), root / "reference" / "ref.parquet")
    return root


def _config(method, root, corpus, work, tokenizer, llama, bert):
    cfg = {"method": method, "seed": 0, "tokenizer": str(tokenizer),
           "corpus": {"uri": str(root / corpus), "id_column": "id"}, "work": {"root": str(work)},
           "budget": {"fraction": 0.01 if corpus == "big" else 0.1},
           "ray": {"shard_readers": 2, "reader_num_cpus": 0.25, "influence_workers": 1, "embed_workers": 1,
                   "worker_num_cpus": 0.25}}
    if method == "quad":
        cfg.update({"proxy_model": str(llama), "reference": {"uri": str(root / "reference")},
                    "embed": {"model": str(bert), "max_tokens": 32, "batch_size": 64},
                    "cluster": {"k": 8, "seed": 0}, "influence": {"chunk_tokens": 64, "batch_size": 8},
                    "factors": {"documents": 16}, "quad": {"block_size": 16, "warmup_size": 16}})
    return cfg


def test_jobs_run_with_the_driver_capped_below_the_corpus_ids(long_id_corpus, tmp_path, tiny_tokenizer_dir,
                                                             tiny_llama_dir, tiny_bert_dir):
    models = (tiny_tokenizer_dir, tiny_llama_dir, tiny_bert_dir)
    small = [_config(m, long_id_corpus, "small", tmp_path / f"small-{m}", *models) for m in ("random", "quad")]
    big = [_config(m, long_id_corpus, "big", tmp_path / f"big-{m}", *models) for m in ("random", "quad")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(small), json.dumps(big)], capture_output=True,
                          text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    ids_bytes = N_DOCS * ID_CHARS
    for method in ("random", "quad"):
        r = result[method]
        assert r["selected"] > 0, result
        assert r["vm_data_growth"] < HEADROOM_MIB * 2**20 < ids_bytes / 2
        # the peak resident memory (object-store pages the driver touched included) grew by less than half
        # the ids' size: the index did not pass through the driver by way of Ray's object store either
        assert r["peak_rss_growth"] < ids_bytes / 2, result
    assert result["control"] == "MemoryError", result
