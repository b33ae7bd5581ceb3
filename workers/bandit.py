"""BanditActor: Quad's central bandit as a named Ray actor, checkpointed every round.

Thin over :class:`selector.quad.loop.QuadSelector`. The actor is started with the work dir, where the
queue step (:func:`selector.clusters.queues.write_cluster_queues`) wrote every cluster's queue; it
holds O(clusters) state -- per-arm statistics, a cursor per queue, the queue store's metadata and a
small LRU of row groups -- plus the kept queue ranges and the round log, and reads from the queue
files the blocks it plans. (Tests and small runs may give ``docs`` instead: an in-memory store.)
Each plan item carries the sampled documents' ids, shards and rows. One actor per run (named from the run id,
``get_if_exists``), so a driver that restarts finds the running actor, and an actor that
restarts (or a new job on the same work dir) resumes from the work dir:

    runs/<run_id>/state/bandit.json                 QuadSelector.to_dict(history_since=...)
    runs/<run_id>/state/bandit-history-<n>.json     round-log segments of HISTORY_SEGMENT rounds

The checkpoint is written after every round (segments first, then ``bandit.json``, each
atomically), so a crash loses at most the round being scored: the plan of that round is a
pure function of the checkpoint and is re-issued identically. A checkpoint taken under a
different Quad config, seed, budget, document set or neighbour set is not resumed: the
actor starts afresh and says why in :meth:`BanditActor.status`. The document set is checked
by the queue store's fingerprint (per-cluster sizes, token totals and content hashes that the
queue step wrote), never by hashing every id; the checkpoint is O(clusters + kept ranges + rounds).

The driver loop (:func:`run_quad_rounds`) asks for a plan, has ``score_fn`` compute the
sampled documents' influences from their (shard, row) locations (shard readers + influence
workers, in parallel), and reports the scores back. The result (:meth:`BanditActor.selection`
with ``locations=True``) carries shard and row too, so the manifest needs no index of the corpus.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray

from selector.clusters.queues import ClusterQueues, DiskClusterQueues, write_cluster_queues
from selector.quad.loop import QuadConfig, QuadSelector, StateMismatch, load_cluster_neighbours
from selector.quad.score_cache import ScoreCache, write_log_segment
from selector.data.workdir import WorkDir
from workers.runtime import job_env

STATE_NAME = "bandit"
HISTORY_SEGMENT = 100  # rounds per log segment: per-round checkpoints rewrite at most this many


def bandit_actor_name(run_id: str) -> str:
    return f"thresher-quad-bandit-{run_id}"


def _history_name(segment: int) -> str:
    return f"{STATE_NAME}-history-{segment:06d}"


def _memory_store(docs: Any, seed: int) -> ClusterQueues:
    """An in-memory queue store from ``doc_id, cluster, n_tokens`` (and optional ``shard, row``)
    columns: a pyarrow table or a mapping of columns."""
    if hasattr(docs, "column_names"):  # pyarrow.Table
        docs = {name: docs.column(name).to_pylist() for name in docs.column_names}
    return ClusterQueues(list(docs["doc_id"]), np.asarray(docs["cluster"], np.int64),
                         np.asarray(docs["n_tokens"], np.int64), seed, docs.get("shard"), docs.get("row"))


@ray.remote
class BanditActor:
    """The Quad state machine behind a Ray handle; see the module docstring."""

    def __init__(self, work: tuple, config: dict, budget_tokens: int, seed: int, docs: Any = None,
                 neighbours: Any = None, score_log: str | None = None, score_cache: str | None = None):
        self.workdir = WorkDir(*work)
        # selector.quad.score_cache: this run's sample scores are logged under ``score_log`` (a run id),
        # and plans carry the scores cached from run ``score_cache``, so those are not recomputed.
        self.score_log = score_log
        self.cache = ScoreCache(self.workdir, score_cache) if score_cache else None
        self._log_rows: list[tuple[int, float, str, float]] = []
        self._plan: tuple[int, Any] | None = None
        cfg = QuadConfig.model_validate(config)
        if docs is None:  # the queues the queue step wrote to the work dir
            store = DiskClusterQueues(self.workdir)
            neighbours = load_cluster_neighbours(self.workdir) if neighbours is None else neighbours
        else:
            store = _memory_store(docs, int(seed))
        neighbours = () if neighbours is None else neighbours
        self.resumed = False
        self.discarded: str | None = None
        self.quad: QuadSelector | None = None
        state = self.workdir.read_state(STATE_NAME)
        if state is not None:
            expected = {"config": cfg.model_dump(mode="json"), "seed": int(seed), "budget": int(budget_tokens)}
            differs = [k for k, v in expected.items() if state.get(k) != v]
            if differs:
                self.discarded = f"checkpoint has a different {', '.join(differs)}"
            else:
                try:
                    prefix = self._read_history(int(state["history_offset"]))
                    self.quad = QuadSelector.from_dict(state, neighbours=neighbours, history_prefix=prefix,
                                                       store=store)
                    self.resumed = True
                except (StateMismatch, FileNotFoundError, KeyError) as exc:
                    self.discarded = f"checkpoint not usable: {exc}"
        if self.quad is None:
            self.quad = QuadSelector.on_store(cfg, store, budget_tokens, neighbours, seed)
        self._segments_written = len(self.quad.history) // HISTORY_SEGMENT if self.resumed else 0

    # -- the loop --------------------------------------------------------------------------
    def plan_round(self) -> dict | None:
        """The round to score: ``{"round", "kind", "items": [{"cluster", "block", "sample", ...}]}``,
        or None when the selection is finished."""
        if self.quad.awaiting_tau:  # tau: validate: the driver must choose tau (set_tau) first
            return {"round": self.quad.next_round, "kind": "calibrate", "items": []}
        plan = self.quad.plan_round()
        if plan is None:
            return None
        self._plan = (plan.round, plan)
        out = plan.to_dict()
        store = self.quad.queues
        with_texts = getattr(store, "has_texts", False)
        for item, it in zip(out["items"], plan.items):
            if self.cache is not None:
                item["cached"] = self.cache.lookup(item["cluster"], item["keys"])
            if with_texts:  # the texts to score come with the plan, read from the block's queue file
                todo = [j for j, c in enumerate(item.get("cached") or [None] * len(it.sample)) if c is None]
                texts: list[str | None] = [None] * len(it.sample)
                for j, text in zip(todo, store.read_texts(it.cluster, [it.positions[j] for j in todo])):
                    texts[j] = text
                item["texts"] = texts
        return out

    def tau_buckets(self) -> list[dict]:
        """``tau: validate``: the warm-up documents in influence buckets (QuadSelector.tau_buckets)."""
        return self.quad.tau_buckets()

    def set_tau(self, tau_doc: float, report: dict) -> dict:
        """``tau: validate``: fix the chosen tau, keep the warm-up documents above it, checkpoint."""
        if not self.quad.awaiting_tau:  # a retried call after the tau was set: nothing to do again
            return self.quad.tau_validation or {}
        self.quad.set_tau(tau_doc, report)
        self._checkpoint()
        return self.quad.tau_validation

    def report(self, scores: Sequence[Sequence[float]] | Mapping[int, Sequence[float]],
               round_no: int | None = None) -> dict:
        """Apply the planned round's sample scores (one list per item, in plan order, or
        ``{cluster: scores}``), checkpoint, and return the round's history record.

        With ``round_no``: a report for a round already applied (a retried call) returns that
        round's record without applying anything again.
        """
        if round_no is not None and round_no != self.quad.next_round:
            for rec in self.quad.history:
                if rec["round"] == round_no:
                    return rec
            raise ValueError(f"report for round {round_no}, but the bandit is at round {self.quad.next_round}")
        if self.score_log is not None:
            plan = self._plan[1] if self._plan and self._plan[0] == self.quad.next_round else self.quad.plan_round()
            per_item = scores if not isinstance(scores, Mapping) else [scores[it.cluster] for it in plan.items]
            for it, s in zip(plan.items, per_item):
                self._log_rows.extend(zip([it.cluster] * len(s), it.keys, it.shards, map(float, s)))
        record = self.quad.apply_round(scores)
        self._checkpoint()
        return record

    def finish_scores(self) -> dict:
        """Write the score log's last (partial) segment; returns the cache's hit counts."""
        self._flush_scores(len(self.quad.history) // HISTORY_SEGMENT)
        return {"cache_hits": self.cache.hits if self.cache else 0,
                "cache_misses": self.cache.misses if self.cache else 0,
                "cache_from": self.cache.source if self.cache else None}

    def _flush_scores(self, segment: int) -> None:
        if self.score_log is None or not self._log_rows:
            return
        c, k, sh, sc = zip(*self._log_rows)
        write_log_segment(self.workdir, self.score_log, segment, c, k, sh, sc)
        self._log_rows = []

    def _checkpoint(self) -> None:
        history = self.quad.history
        full = len(history) // HISTORY_SEGMENT
        for seg in range(self._segments_written, full):  # segments before the state that refers to them
            self.workdir.write_state(_history_name(seg), history[seg * HISTORY_SEGMENT:(seg + 1) * HISTORY_SEGMENT])
        if full > self._segments_written:
            self._flush_scores(full - 1)
        self._segments_written = full
        self.workdir.write_state(STATE_NAME, self.quad.to_dict(history_since=full * HISTORY_SEGMENT))

    def _read_history(self, offset: int) -> list[dict]:
        records: list[dict] = []
        for seg in range(offset // HISTORY_SEGMENT):
            part = self.workdir.read_state(_history_name(seg))
            if part is None:
                raise FileNotFoundError(f"round-log segment {_history_name(seg)} is missing")
            records.extend(part)
        return records

    # -- results ---------------------------------------------------------------------------
    def selection(self, locations: bool = False) -> dict[str, list]:
        """Manifest rows: ``doc_id, cluster, n_tokens, score, round``, with ``locations`` also ``shard,
        row`` (see QuadSelector.selection): O(selection), read from the queue files."""
        return self.quad.selection(locations)

    def selection_table(self):
        """:meth:`selection` with locations as an Arrow table, converted batch by batch (what goes to the
        manifest: the actor never holds every selected row as Python objects)."""
        import pyarrow as pa

        schema = pa.schema([("doc_id", pa.string()), ("cluster", pa.int32()), ("n_tokens", pa.int64()),
                            ("score", pa.float64()), ("round", pa.int32()), ("shard", pa.string()), ("row", pa.int64())])
        return pa.Table.from_batches([pa.RecordBatch.from_pydict(b, schema=schema)
                                      for b in self.quad.selection_batches(locations=True)], schema=schema)

    def summary(self) -> dict:
        """``manifest.json["quad"]``: settings, tau, reward scale, stop reason, round log."""
        return self.quad.summary()

    def footprint(self) -> dict[str, int]:
        """Lengths of the arrays and containers the actor holds (the selector, its bandit, its queue
        store), plus ``queues.cached_rows``: what tests check to see that nothing grows with the corpus."""
        out: dict[str, int] = {}
        for prefix, obj in (("quad", self.quad), ("bandit", self.quad.bandit), ("queues", self.quad.queues)):
            for name, value in vars(obj).items():
                if isinstance(value, np.ndarray):
                    out[f"{prefix}.{name}"] = int(value.size)
                elif isinstance(value, (list, tuple, dict, set)):
                    out[f"{prefix}.{name}"] = len(value)
        if hasattr(self.quad.queues, "cached_rows"):
            out["queues.cached_rows"] = self.quad.queues.cached_rows()
        return out

    def status(self) -> dict:
        q = self.quad
        return {"round": q.next_round, "phase": q.phase, "done": q.done, "stop_reason": q.stop_reason,
                "used_tokens": int(q.used_tokens), "budget": q.budget, "active_arms": q.bandit.n_active(),
                "arms": len(q.queues.cluster_ids), "tau": q.tau, "reward_scale": q.scale,
                "resumed": self.resumed, "discarded_checkpoint": self.discarded}


def start_bandit(workdir: WorkDir, config: QuadConfig | dict, budget_tokens: int, seed: int, docs: Any = None,
                 neighbours: Sequence[Sequence] | None = None, cluster_keys: Sequence[str] | None = None,
                 num_cpus: float = 0.1, score_log: str | None = None, score_cache: str | None = None):
    """The run's bandit actor: the live one if it exists (its arguments then are not used),
    else a new one that resumes from the work dir's checkpoint when there is a usable one.

    The actor reads the cluster queues from the work dir (``docs=None``); with ``cluster_keys``
    the queue step runs first, here (skipped when its output is done under the same hash). ``docs``
    (columns ``doc_id, cluster, n_tokens``, optionally ``shard, row``) gives an in-memory store instead.
    ``score_log`` / ``score_cache``: see :class:`BanditActor` and selector.quad.score_cache.
    """
    cfg = config.model_dump(mode="json") if isinstance(config, QuadConfig) else dict(config)
    if docs is None and cluster_keys is not None:
        write_cluster_queues(workdir, cluster_keys, int(seed))
    work = (workdir.root, workdir.run_id, workdir.storage_options)
    return BanditActor.options(**job_env(num_cpus=num_cpus), name=bandit_actor_name(workdir.run_id),
                               get_if_exists=True).remote(work, cfg, int(budget_tokens), int(seed), docs=docs,
                                                         neighbours=neighbours, score_log=score_log,
                                                         score_cache=score_cache)


class ScoreRequest(tuple):
    """One planned item to score. Unpacks as ``(cluster, doc_ids)`` (what a score function that
    knows only ids takes); ``shards`` / ``rows`` locate the same documents (shard names as the queue
    step recorded them: relpaths in the select job), so scoring needs no id lookup; ``texts`` are
    the documents' texts when the queue files hold them (then nothing is read from the shards)."""

    def __new__(cls, cluster: int, doc_ids: Sequence[str], shards: Sequence = (), rows: Sequence[int] = (),
                texts: Sequence[str] | None = None):
        self = super().__new__(cls, (int(cluster), list(doc_ids)))
        self.shards = list(shards)
        self.rows = [int(r) for r in rows]
        self.texts = None if texts is None else list(texts)  # given when the queues hold the texts
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.shards, self.rows, self.texts)

    @property
    def cluster(self) -> int:
        return self[0]

    @property
    def doc_ids(self) -> list[str]:
        return self[1]


ScoreFn = Callable[[list[ScoreRequest]], Sequence[Sequence[float]]]


CalibrateFn = Callable[[list[dict]], dict]


def run_quad_rounds(bandit, score_fn: ScoreFn, progress: bool = True, log: Callable[[str], Any] | None = None,
                    calibrate_fn: CalibrateFn | None = None) -> dict:
    """Drive ``bandit`` to the end: plan, score, report, until it is done; returns its status.

    ``score_fn([ScoreRequest(cluster, sample doc_ids, shards, rows), ...])`` returns one list of
    influence scores per request (same order, one per document). It is where the select job plugs
    in shard readers and influence workers; it runs on the driver, so it may fan out Ray tasks
    itself. ``calibrate_fn(buckets)`` (``tau: validate`` only) returns ``{"tau", ...report}`` for the
    warm-up's influence buckets (:func:`selector.quad.tau_validation.choose_bucket`; each bucket carries its
    documents' ``shards`` / ``rows``). The driver holds one plan at a time: O(round).
    """
    from tqdm import tqdm

    status = ray.get(bandit.status.remote())
    if log and status["resumed"]:
        log(f"quad: resumed the bandit at round {status['round']} ({status['used_tokens']:,} tokens selected)")
    if log and status["discarded_checkpoint"]:
        log(f"quad: started afresh ({status['discarded_checkpoint']})")
    used = status["used_tokens"]
    # where a round's time goes (the loop is sequential: this is the stage's critical path)
    spent = {"rounds": 0, "plan": 0.0, "score": 0.0, "report": 0.0}
    with tqdm(total=status["budget"], initial=used, desc="quad", unit="tok", unit_scale=True,
              disable=not progress, file=sys.stderr, mininterval=0.5, dynamic_ncols=True) as bar:
        while True:
            t0 = time.perf_counter()
            plan = ray.get(bandit.plan_round.remote())
            t1 = time.perf_counter()
            spent["plan"] += t1 - t0
            if plan is None:
                break
            if plan["kind"] == "calibrate":
                if calibrate_fn is None:
                    raise ValueError("quad.tau: validate needs a calibration function (the select job supplies it)")
                result = calibrate_fn(ray.get(bandit.tau_buckets.remote()))
                ray.get(bandit.set_tau.remote(float(result["tau"]), result))
                continue
            scores = _score_uncached(score_fn, plan["items"])
            t2 = time.perf_counter()
            record = ray.get(bandit.report.remote(scores, plan["round"]))
            spent["score"] += t2 - t1
            spent["report"] += time.perf_counter() - t2
            spent["rounds"] += 1
            now = record.get("budget_used", used)
            bar.update(now - used)
            used = now
            if record["kind"] == "warmup":
                bar.set_postfix_str(f"tau={record['tau']:.3g} scale={record['reward_scale']:.3g}", refresh=False)
            else:
                bar.set_postfix_str(f"round {record['round']} arms {record['active_arms']}", refresh=False)
    cache = ray.get(bandit.finish_scores.remote())
    timing = {k: round(v, 3) for k, v in spent.items()}
    status = dict(ray.get(bandit.status.remote()), **cache, round_seconds=timing)
    if log:
        log(f"quad: stopped ({status['stop_reason']}) after round {status['round'] - 1}: "
            f"{status['used_tokens']:,} of {status['budget']:,} tokens")
        if spent["rounds"]:
            log(f"quad: {spent['rounds']} rounds: plan {spent['plan']:.1f} s, score {spent['score']:.1f} s, "
                f"report + checkpoint {spent['report']:.1f} s")
        if cache["cache_from"]:
            log(f"quad: {cache['cache_hits']:,} sample scores looked up in the score cache of "
                f"{cache['cache_from']}, {cache['cache_misses']:,} computed")
    return status


def _score_uncached(score_fn: ScoreFn, items: list[dict]) -> list[list[float]]:
    """Every item's sample scores: the ones the plan carries from the score cache as they are, the
    rest computed by ``score_fn`` in one call (items with nothing left to score are not sent)."""
    requests, slots = [], []
    for i, item in enumerate(items):
        cached = item.get("cached") or [None] * len(item["sample"])
        todo = [j for j, c in enumerate(cached) if c is None]
        if todo:
            texts = item.get("texts")
            requests.append(ScoreRequest(item["cluster"], [item["sample"][j] for j in todo],
                                         [item["shards"][j] for j in todo], [item["rows"][j] for j in todo],
                                         None if texts is None else [texts[j] for j in todo]))
            slots.append((i, todo))
    computed = score_fn(requests) if requests else []
    out = [[float(c) if c is not None else float("nan") for c in (item.get("cached") or [None] * len(item["sample"]))]
           for item in items]
    for (i, todo), scores in zip(slots, computed):
        for j, v in zip(todo, scores):
            out[i][j] = float(v)
    return out
