"""The selection job: corpus -> index -> select -> committed manifest.

    python -m ray_jobs.select --config job.yaml

Runs on a local Ray, or on the cluster named by ``ray.address`` / ``RAY_ADDRESS`` (as under
``ray job submit``). Finished stages are found in the work dir and not redone.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa

from selector.config import JobConfig, load_config
from selector.corpus import Corpus
from selector.errors import ManifestError
from selector.manifest import ManifestWriter, manifest_uri, read_manifest, run_summary, selection_table
from selector.models import load_tokenizer, tokenizer_fingerprint
from selector.workdir import WorkDir
from workers.runtime import connect
from workers.shard_reader import index_corpus, random_selection, start_shard_readers


def run(config: JobConfig, progress: bool = True, log=print) -> str:
    """Run the job described by ``config``; returns the committed manifest's URI."""
    run_id = config.resolved_run_id()
    target = manifest_uri(config.work.root, run_id)
    try:
        existing = read_manifest(target, config.work.storage_options, columns=["doc_id"])
        log(f"run {run_id} already committed its manifest ({len(existing)} documents): {target}")
        return target
    except ManifestError:
        pass  # not committed yet: run (finished stages are skipped)

    connect(config.ray)
    workdir = WorkDir(config.work.root, run_id, config.work.storage_options)
    tokenizer = load_tokenizer(config.tokenizer)  # fail fast on a wrong path, before any Ray work

    # 1. index: list shards, validate, count documents and tokens
    shards = Corpus(config.corpus).list_shards()
    log(f"run {run_id}: {len(shards)} shards under {config.corpus.uri}")
    readers = start_shard_readers(config.corpus, config.tokenizer, workdir, shards,
                                  config.ray.shard_readers, config.ray.reader_num_cpus)
    index_stats = index_corpus(readers, config.stage_hash("corpus", "tokenizer"), progress)
    log(f"indexed {index_stats['documents']:,} documents, {index_stats['tokens']:,} tokens, "
        f"{index_stats['rejected']} rejected ({index_stats['shards_skipped']} shards already indexed)")
    budget = config.budget.resolve(index_stats["tokens"])

    # 5. select
    if config.method == "random":
        chosen = random_selection(readers, config.seed, budget)
        rows = _rows(chosen, shards, method="random")
    else:  # pragma: no cover - the config's Literal rejects unknown methods first
        raise ValueError(f"unknown method {config.method!r}")

    # manifest, committed last
    writer = ManifestWriter(config.work.root, run_id, config.work.storage_options)
    writer.write(selection_table(rows))
    summary = run_summary(config, shards, index_stats, budget, selection_table(rows),
                          tokenizer={"path": config.tokenizer, "fingerprint": tokenizer_fingerprint(tokenizer)},
                          stages={"index": {k: v for k, v in index_stats.items() if k != "shards"}})
    uri = writer.commit(summary)
    log(f"selected {summary['budget']['selected_documents']:,} documents, "
        f"{summary['budget']['selected_tokens']:,} of {budget:,} budget tokens -> {uri}")
    return uri


def _rows(chosen: pa.Table, shards, method: str, **extra: list) -> dict[str, list]:
    uri_of = {s.relpath: s.uri for s in shards}
    rows = {
        "doc_id": chosen["doc_id"].to_pylist(),
        "shard": [uri_of[p] for p in chosen["shard"].to_pylist()],
        "row": chosen["row"].to_pylist(),
        "n_tokens": chosen["n_tokens"].to_pylist(),
        "method": [method] * chosen.num_rows,
    }
    rows.update(extra)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.select", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML job config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    uri = run(load_config(args.config), progress=not args.no_progress)
    print(f"manifest: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
