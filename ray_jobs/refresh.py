"""The nightly corpus refresh: select again over a corpus that grew or changed, redoing only what changed.

    python -m ray_jobs.refresh --config refresh.yaml

The config is a job config (any method) with an optional ``refresh:`` section (lease name and
ttl, drift threshold, bandit decay; see :mod:`selector.data.refresh` and docs/refresh.md). A refresh

1. takes the lease ``<work.root>/runs/_leases/<name>.json`` (default name: one per corpus URI);
   a second refresh of the same corpus stops at once with :class:`selector.data.lease.LeaseHeldError`
   naming the holder, a stale lease (no heartbeat for ``lease_ttl_s``) is taken over;
2. lists the corpus and runs the pipeline of :mod:`ray_jobs.select` in the lineage work dir
   ``runs/<method>-lineage-<config hash>/``, where stage outputs of unchanged shards are found
   and skipped (index, embeddings, cluster assignments, K-FAC factors and query);
3. compares each shard with the previous committed run of the lineage (size/version, then
   content digest): with no document changed it commits the previous selection as it was
   (nothing embedded, nothing scored); otherwise
4. assigns new shards to the kept centroids, refitting only when the drift ratio passes
   ``drift_threshold``; seeds the Quad bandit with the previous run's arm statistics (times
   ``bandit_decay``) when the centroids were kept; selects under the budget;
5. commits ``manifests/<method>-refresh-<UTC timestamp>/`` with ``delta.parquet`` (doc_id,
   change: added|removed vs the previous selection) and ``manifest.json["refresh"]``
   (lineage, previous_run_id, shard/document change counts, drift, carried bandit statistics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import ray

from selector.clusters.kmeans import (ASSIGN_STAGE, FIT_STAGE, SUMMARY_STAGE, ClusterModel, assign_hash_for,
                                 load_centroids, write_summaries)
from selector.config import JobConfig
from selector.data.corpus import Corpus, ShardInfo
from selector.errors import ThresherError
from selector.data.lease import Lease, LeaseHeldError
from selector.data.index import INDEX_STAGE
from selector.data.manifest import list_manifests, read_manifest
from selector.data.refresh import (DELTA_FILE, RefreshConfig, carried_bandit, classify_shards, dated_run_id,
                              default_lease_name, document_counts, drift_ratio, lineage_id, load_refresh_config,
                              previous_run, same_listing, selection_delta, shard_digest)
from selector.data.workdir import WorkDir, shard_key, table_to_parquet_bytes
from workers.runtime import job_env
from ray_jobs.select import run_pipeline

FIT_STATE = "refresh_fit"        # state/refresh_fit.json: the kept fit (hashes, fit-time mean distance)
BANDIT_SEED_STATE = "refresh_bandit"  # state/refresh_bandit.json: which run the bandit checkpoint was seeded from


class RefreshHooks:
    """What a refresh changes in :func:`ray_jobs.select.run_pipeline` (called from there)."""

    def __init__(self, settings: RefreshConfig, lineage: str, previous: dict | None, lease: Lease, log=print,
                 run_id: str = ""):
        self.settings, self.lineage, self.previous, self.lease, self.log = settings, lineage, previous, lease, log
        self.run_id = run_id
        self.score_cache_info: dict = {}
        self.prev_shards: dict = ((previous or {}).get("refresh") or {}).get("shards", {})
        self.snapshot: dict[str, dict] = {}
        self.changes = None
        self.documents: dict[str, int] = {}
        self.reused = False
        self.cluster_info: dict = {}
        self.bandit_info: dict = {}

    # -- after the index stage: what changed, and is the previous selection still valid? ----
    def reuse(self, job, index_stats: dict):
        per_shard = {s["shard"]: s for s in index_stats["shards"]}
        for shard in job.shards:
            now = {"size": shard.size, "version": shard.version, "documents": per_shard[shard.relpath]["documents"]}
            before = self.prev_shards.get(shard.relpath)
            if same_listing(now, before) and before.get("digest"):
                now["digest"] = before["digest"]  # same size and version: the content is the one digested then
            else:
                now["digest"] = shard_digest(job.workdir.read_table(INDEX_STAGE, shard_key(shard.relpath),
                                                                    columns=["doc_id", "row", "content_hash"]))
            self.snapshot[shard.relpath] = now
        self.changes = classify_shards(self.snapshot, self.prev_shards)
        self.documents = document_counts(self.changes, self.snapshot, self.prev_shards)
        c = self.changes.counts()
        self.log(f"refresh: shards {c['added']} added, {c['removed']} removed, {c['changed']} changed, "
                 f"{c['unchanged']} unchanged ({c['touched']} re-written with the same content) since "
                 f"{self.previous['run_id'] if self.previous else 'no previous run'}")
        if self.changes.touched:
            self._keep_embeddings(job)
        if self.previous is None or self.changes.any_change:
            return None
        previous = read_manifest(self.previous["uri"], job.config.work.storage_options)
        self.reused = True
        # the clusters are the previous run's: a later refresh may carry its bandit statistics on,
        # and look up the scores in the log of the run that made this selection
        self.cluster_info = dict(((self.previous.get("refresh") or {}).get("cluster") or {}), reused=True)
        logged = ((self.previous.get("refresh") or {}).get("score_cache") or {}).get("log")
        self.score_cache_info = {"log": logged, "cache_from": None, "reason": "selection reused"}
        self.log(f"refresh: no document changed: committing the selection of {self.previous['run_id']} again")
        rows = previous.table  # Arrow columns as they are (selection_table keeps them)
        extra = {"stages": {"reused": {"from_run_id": self.previous["run_id"]}}}
        for key in ("quad",):
            if key in self.previous:
                extra[key] = self.previous[key]
        return rows, extra

    def _keep_embeddings(self, job) -> None:
        """A touched shard holds the same documents: re-stamp its embeddings for its new version."""
        from selector.clusters.embedding import STAGE, encoder_identity, shard_config_hash

        if job.config.method not in ("quad", "exploration-only"):
            return
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and job.config.embed.device != "cpu"
        identity = encoder_identity(job.config.embed, "cuda" if use_gpu else "cpu")
        by_path = {s.relpath: s for s in job.shards}
        for relpath in self.changes.touched:
            now, before = by_path[relpath], self.prev_shards[relpath]
            old = ShardInfo(now.uri, relpath, int(before["size"]), str(before["version"]), now.format)
            old_hash = shard_config_hash(identity, job.config.corpus, old)
            new_hash = shard_config_hash(identity, job.config.corpus, now)
            key = shard_key(relpath)
            for k in (f"{key}.ids", key):  # ids first: the .npy marker is the shard's "done" signal
                marker = job.workdir.read_marker(STAGE, k)
                if marker is None or marker.get("config_hash") != old_hash:
                    break
                job.workdir.mark_done(STAGE, k, new_hash, marker.get("stats"))
            else:
                self.log(f"refresh: {relpath} was re-written with the same documents: embeddings kept")

    # -- clustering: keep the centroids, assign new shards, refit on drift -------------------
    def cluster(self, job, keys: list[str]) -> dict:
        from workers.clusterer import cluster_corpus

        workdir, cfg = job.workdir, job.config.cluster
        keys = sorted(keys)
        fit = workdir.read_state(FIT_STATE)
        ratio = None
        if fit is not None and workdir.is_done(FIT_STAGE, "centroids", fit["fit_hash"]):
            model = ClusterModel(load_centroids(workdir))
            if assign_hash_for(fit["fit_hash"], model) == fit["assign_hash"]:
                per_shard = assign_shards(workdir, keys, fit["assign_hash"], cfg, job.progress)
                new = [s["key"] for s in per_shard if not s["skipped"]]
                ratio = drift_ratio(mean_distance(workdir, new), fit["mean_distance"])
                if ratio is None or ratio <= self.settings.drift_threshold:
                    table, neighbours = write_summaries(workdir, keys, model, fit["assign_hash"], cfg)
                    sizes = table.column("size").to_numpy()
                    self.cluster_info = {"refit": False, "drift": ratio, "fit_hash": fit["fit_hash"],
                                         "assigned_shards": len(new)}
                    self.log(f"refresh: {len(new)} shards assigned to the kept centroids (drift "
                             f"{'n/a' if ratio is None else f'{ratio:.3f}'} <= {self.settings.drift_threshold})")
                    return {"k": model.k, "fit_hash": fit["fit_hash"], "assign_hash": fit["assign_hash"],
                            "fit_skipped": True, "refit": False, "drift": ratio,
                            "shards_assigned": len(new), "shards_skipped": len(per_shard) - len(new),
                            "documents": int(sizes.sum()), "empty_clusters": int((sizes == 0).sum()),
                            "neighbour_pairs": neighbours.num_rows, "shards": per_shard}
                self.log(f"refresh: drift {ratio:.3f} > {self.settings.drift_threshold}: refitting k-means")
        clustered = cluster_corpus(workdir, keys, cfg, progress=job.progress)
        table = workdir.read_table(SUMMARY_STAGE, "clusters")
        sizes, means = table.column("size").to_numpy(), table.column("mean_distance").to_numpy()
        fit_mean = float(np.nansum(sizes * means) / max(sizes.sum(), 1))
        workdir.write_state(FIT_STATE, {"fit_hash": clustered["fit_hash"], "assign_hash": clustered["assign_hash"],
                                        "mean_distance": fit_mean, "documents": int(sizes.sum()), "k": clustered["k"]})
        refit = fit is not None
        self.cluster_info = {"refit": refit, "drift": ratio, "fit_hash": clustered["fit_hash"],
                             "fit_mean_distance": fit_mean}
        return dict(clustered, refit=refit, drift=ratio)

    # -- quad: the bandit starts from the previous run's arm statistics ----------------------
    def prepare_bandit(self, job) -> dict:
        from selector.clusters.queues import DiskClusterQueues
        from selector.quad.loop import QuadSelector, load_cluster_neighbours

        if self.previous is None:  # first run of the lineage: a checkpoint here can only be its own
            self.bandit_info = {"carried_arms": 0, "reason": "first run of the lineage"}
            return self.bandit_info
        cfg = job.config
        # the queues the select job's queue stage wrote (O(clusters) metadata, blocks read on demand)
        quad = QuadSelector.on_store(cfg.quad, DiskClusterQueues(job.workdir), job.budget,
                                     load_cluster_neighbours(job.workdir), cfg.seed)
        seed_mark = {"from_run_id": self.previous["run_id"], "documents": quad.queues.fingerprint()}
        state = job.workdir.read_state("bandit")
        if job.workdir.read_state(BANDIT_SEED_STATE) == seed_mark and state is not None and \
                state.get("documents") == seed_mark["documents"]:
            # a refresh that died mid-bandit: its (seeded) checkpoint resumes as it is
            self.bandit_info = dict(job.workdir.read_state(f"{BANDIT_SEED_STATE}_info") or {}, resumed=True)
            return self.bandit_info
        prior = (self.previous.get("refresh") or {}).get("bandit")
        same_fit = self._same_fit()
        if prior is None or not same_fit or self.settings.bandit_decay == 0:
            reason = ("the previous run has no bandit" if prior is None else
                      "k-means was fit anew: cluster ids changed" if not same_fit else "bandit_decay is 0")
            self.bandit_info = {"carried_arms": 0, "reason": reason}
        else:
            carried = quad.carry_forward(prior, self.settings.bandit_decay)
            self.bandit_info = {"carried_arms": carried, "decay": self.settings.bandit_decay,
                                "from_run_id": self.previous["run_id"], "carried_pulls": int(quad.bandit.total_pulls)}
            self.log(f"refresh: bandit seeded with {carried} arms' statistics from {self.previous['run_id']} "
                     f"(decay {self.settings.bandit_decay})")
        # Written even when nothing is carried: the lineage's last checkpoint belongs to the previous
        # run and must not be resumed by this one. The bandit actor resumes from this fresh state.
        job.workdir.write_state("bandit", quad.to_dict())
        job.workdir.write_state(f"{BANDIT_SEED_STATE}_info", self.bandit_info)
        job.workdir.write_state(BANDIT_SEED_STATE, seed_mark)
        return self.bandit_info

    def _same_fit(self) -> bool:
        # Cluster ids mean the same clusters only under the same fit (not after a refit, nor when
        # the lineage's work dir was lost and k-means fit anew).
        previous = (self.previous or {}).get("refresh") or {}
        return bool(self.cluster_info.get("fit_hash")) and \
            self.cluster_info.get("fit_hash") == (previous.get("cluster") or {}).get("fit_hash")

    # -- quad: the previous run's influence scores are looked up, not recomputed -------------
    def score_cache(self, job) -> dict:
        """This run logs its sample scores under its run id; when the previous run's cluster ids
        still hold (same fit) and it logged scores, they become this run's cache, without the
        shards that changed or left (selector.quad.score_cache). Logs of older runs are deleted."""
        from selector.clusters.queues import DiskClusterQueues
        from selector.quad.score_cache import CACHE_STAGE, build_score_cache, log_segments, prune
        from workers.clusterer import queue_calls_on_ray

        # the run whose log holds the previous selection's scores (a refresh that reused a selection
        # logged nothing and names the run it took the selection from)
        prev = (((self.previous or {}).get("refresh") or {}).get("score_cache") or {}).get("log")
        info: dict = {"log": self.run_id, "cache_from": None}
        if self.previous is None:
            info["reason"] = "first run of the lineage"
        elif prev is None:
            info["reason"] = f"{self.previous['run_id']} kept no score log"
        elif not self._same_fit():
            info["reason"] = "k-means was fit anew: cluster ids changed"
        elif not log_segments(job.workdir, prev):
            info["reason"] = f"{prev} logged no scores"
        else:
            meta_path = f"{job.workdir.stage_dir(CACHE_STAGE)}/{prev}.json"
            if job.workdir.fs.exists(meta_path):  # a refresh that died after building it: the same cache
                with job.workdir.fs.open(meta_path, "rb") as f:
                    meta = json.loads(f.read())
            else:
                valid = self.changes.unchanged + self.changes.touched
                n_clusters = int(DiskClusterQueues(job.workdir).cluster_ids.max()) + 1  # O(clusters) metadata
                meta = build_score_cache(job.workdir, prev, n_clusters, valid,
                                         map_calls=queue_calls_on_ray(num_cpus=job.config.ray.worker_num_cpus))
            info.update(cache_from=prev, cached_scores=meta["rows"], segments=meta["segments"])
            self.log(f"refresh: score cache: {meta['rows']:,} influence scores of {prev} "
                     f"(unchanged shards only)")
        info["pruned_files"] = prune(job.workdir, [r for r in (prev, self.run_id) if r])
        self.score_cache_info = info
        return info

    # -- the delta and the refresh record, staged before the commit --------------------------
    def before_commit(self, job, writer, table, summary: dict) -> None:
        self.lease.check()  # a lease taken over while we ran: do not commit over the new holder's work
        before = []
        if self.previous is not None:
            before = read_manifest(self.previous["uri"], job.config.work.storage_options,
                                   columns=["doc_id"]).table["doc_id"].to_pylist()
        delta = selection_delta(before, table["doc_id"].to_pylist())
        writer.write_extra(DELTA_FILE, table_to_parquet_bytes(delta))
        n_added = sum(1 for c in delta["change"].to_pylist() if c == "added")
        if self.reused:
            bandit = ((self.previous or {}).get("refresh") or {}).get("bandit")
        elif job.config.method == "quad":
            bandit = carried_bandit((job.workdir.read_state("bandit") or {}).get("bandit"))
        else:
            bandit = None
        summary["previous_run_id"] = self.previous["run_id"] if self.previous else None
        summary["refresh"] = {
            "lineage": self.lineage,
            "workdir": job.workdir.path,
            "previous_run_id": summary["previous_run_id"],
            "lease": self.lease.name,
            "reused_selection": self.reused,
            "shards": self.snapshot,
            "changes": {"shards": self.changes.counts(), "documents": self.documents,
                        "added_shards": self.changes.added, "removed_shards": self.changes.removed,
                        "changed_shards": self.changes.changed, "touched_shards": self.changes.touched},
            "delta": {"added": n_added, "removed": delta.num_rows - n_added, "file": DELTA_FILE},
            "cluster": self.cluster_info,
            "bandit_carry": self.bandit_info,
            "score_cache": self.score_cache_info,
            "bandit": bandit,
            "drift_threshold": self.settings.drift_threshold,
        }
        self.log(f"refresh: selection delta vs {summary['previous_run_id']}: +{n_added} "
                 f"-{delta.num_rows - n_added} documents")


def assign_shards(workdir: WorkDir, keys: list[str], assign_hash: str, config, progress: bool = True,
                  num_cpus: float = 0.5) -> list[dict]:
    """Assign shards to the kept centroids on Ray (one task per shard; done shards are skipped)."""
    from workers.clusterer import _assign_task  # the cluster stage's own per-shard task
    from workers.progress import gather

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and config.use_gpu is not False
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": num_cpus}
    work = (workdir.root, workdir.run_id, workdir.storage_options)
    futures = [_assign_task.options(**job_env(**resources)).remote(work, key, assign_hash, config.assign_batch_size,
                                                        bool(use_gpu), resources["num_cpus"]) for key in keys]
    return gather(futures, "cluster", enabled=progress)


def mean_distance(workdir: WorkDir, keys: list[str]) -> float | None:
    """Mean cosine distance to the assigned centroid over the documents of ``keys`` (None if none)."""
    total, n = 0.0, 0
    for key in keys:
        d = workdir.read_table(ASSIGN_STAGE, key, columns=["distance"]).column("distance").to_numpy()
        total += float(d.astype(np.float64).sum())
        n += len(d)
    return total / n if n else None


def unique_run_id(config: JobConfig) -> str:
    """A dated run id no committed (or staged) manifest has yet."""
    from selector.data.workdir import open_fs

    fs, root = open_fs(config.work.root, config.work.storage_options)
    base = dated_run_id(config)
    run_id, n = base, 1
    while fs.exists(f"{root}/manifests/{run_id}"):
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def refresh(settings: RefreshConfig, config: JobConfig, progress: bool = True, log=print,
            holder_id: str | None = None) -> str:
    """Run one refresh under the corpus's lease; returns the committed manifest's URI.

    Raises :class:`LeaseHeldError` (naming the holder) when another refresh of the corpus runs.
    """
    name = settings.name or default_lease_name(config)
    lease = Lease(config.work.root, name, holder_id=holder_id, ttl_s=settings.lease_ttl_s,
                  storage_options=config.work.storage_options, log_fn=log)
    start = time.perf_counter()
    with lease:
        lineage = lineage_id(config)
        previous = previous_run(list_manifests(config.work.root, config.work.storage_options), lineage)
        shards = Corpus(config.corpus).list_shards()
        run_id = unique_run_id(config)
        log(f"refresh {run_id}: lease {name!r} held by {lease.holder}; lineage {lineage}; previous run "
            f"{previous['run_id'] if previous else '(none: full run)'}")
        workdir = WorkDir(config.work.root, lineage, config.work.storage_options)
        hooks = RefreshHooks(settings, lineage, previous, lease, log, run_id=run_id)
        uri = run_pipeline(config, run_id, workdir, progress, log, shards=shards, hooks=hooks)
    log(f"refresh {run_id}: committed in {time.perf_counter() - start:.1f} s -> {uri}")
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.refresh", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML job config, optionally with a refresh: section")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        settings, config = load_refresh_config(args.config)
        uri = refresh(settings, config, progress=not args.no_progress)
    except LeaseHeldError as exc:
        print(f"refresh refused: {exc}", file=sys.stderr)
        return 3
    except ThresherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"manifest: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RefreshHooks", "refresh", "main"]
