"""workers.shard_stage: per-shard stages on a real Ray Data actor pool (local Ray, nothing mocked)."""

from __future__ import annotations

import os

from selector.data.corpus import ShardInfo


def shards(n: int) -> list[ShardInfo]:
    return [ShardInfo(uri=f"file:///corpus/s{i}.parquet", relpath=f"s{i}.parquet", size=100 + i, version="v1",
                      format="parquet") for i in range(n)]


def test_every_shard_runs_once_with_its_hash_on_resident_actors(ray_local):
    from workers.shard_stage import ShardStage, run_shard_stage

    class CountRows(ShardStage):  # local: Ray pickles it by value for the actors
        def __init__(self, scale: int):
            self.scale = scale
            self.pid = os.getpid()
            self.calls = 0

        def process(self, shard: ShardInfo, config_hash: str) -> dict:
            self.calls += 1
            return {"shard": shard.relpath, "hash": config_hash, "n_docs": shard.size * self.scale,
                    "pid": self.pid, "calls": self.calls}

    todo = shards(7)
    hashes = {s.relpath: f"h-{s.relpath}" for s in todo}
    stats = run_shard_stage("count", CountRows, {"scale": 2}, todo, hashes, concurrency=2, num_cpus=0.25,
                            progress=False, count_key="n_docs")
    assert sorted(r["shard"] for r in stats) == sorted(s.relpath for s in todo)
    assert all(r["hash"] == f"h-{r['shard']}" for r in stats)
    assert sum(r["n_docs"] for r in stats) == 2 * sum(s.size for s in todo)
    # constructed once per actor (at most 2), not once per shard: the model stays resident
    pids = {r["pid"] for r in stats}
    assert 1 <= len(pids) <= 2
    assert sum(max(r["calls"] for r in stats if r["pid"] == p) for p in pids) == len(todo)
    assert run_shard_stage("count", CountRows, {"scale": 2}, [], {}, concurrency=2, progress=False) == []


def test_a_stage_error_reaches_the_user_as_its_own_message(ray_local):
    from ray_jobs.errors import EXIT_USER, describe
    from selector.errors import CorpusError
    from workers.shard_stage import ShardStage, run_shard_stage

    class FailsOnOne(ShardStage):
        def process(self, shard: ShardInfo, config_hash: str) -> dict:
            if shard.relpath == "s2.parquet":
                raise CorpusError("shard s2.parquet, row 7, field 'text': int, not a string")
            return {"shard": shard.relpath}

    todo = shards(4)
    try:
        run_shard_stage("fails", FailsOnOne, {}, todo, {s.relpath: "h" for s in todo}, concurrency=1,
                        num_cpus=0.25, progress=False)
    except Exception as exc:  # Ray Data wraps it: RayTaskError(UserCodeException)
        code, message = describe(exc)
    else:
        raise AssertionError("the stage's error was not raised")
    assert (code, message) == (EXIT_USER, "error: shard s2.parquet, row 7, field 'text': int, not a string")
