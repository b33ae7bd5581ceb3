"""selector.quad.score_cache: the score log, the per-range cache built from it, lookups, pruning."""

from __future__ import annotations

import numpy as np

from selector.quad.score_cache import (CACHE_STAGE, LOG_STAGE, ScoreCache, build_score_cache, log_segments, prune,
                                  write_log_segment)
from selector.data.workdir import WorkDir


def test_cache_keeps_the_latest_score_per_document_drops_invalid_shards_and_answers_by_cluster(tmp_path):
    wd = WorkDir(str(tmp_path), "lineage")
    write_log_segment(wd, "run-a", 0, [3, 0, 3, 1], [0.5, 0.25, 0.125, 0.75], ["a", "a", "b", "a"], [1.0, 2.0, 3.0, 4.0])
    write_log_segment(wd, "run-a", 1, [3, 2], [0.5, 0.1], ["a", "a"], [9.0, 5.0])  # key 0.5 scored again
    write_log_segment(wd, "run-a-1", 0, [0], [0.3], ["a"], [7.0])  # another run whose id extends this one
    assert write_log_segment(wd, "run-a", 2, [], [], [], []) is None
    assert log_segments(wd, "run-a") == ["run-a-000000", "run-a-000001"]
    for max_rows in (1, 100):  # many ranges, one range: the same answers
        meta = build_score_cache(wd, "run-a", 5, valid_shards=["a"], max_range_rows=max_rows)
        assert meta["rows"] == 4 and meta["segments"] == 2 and (len(meta["ranges"]) > 1) == (max_rows == 1)
        cache = ScoreCache(wd, "run-a", cache_clusters=2)
        assert cache.lookup(3, [0.5, 0.125, 0.9]) == [9.0, None, None]  # latest wins; shard b is invalid
        assert cache.lookup(0, [0.25, 0.3]) == [2.0, None]
        assert cache.lookup(1, [0.75]) == [4.0] and cache.lookup(2, [0.1]) == [5.0] and cache.lookup(4, [0.5]) == [None]
        assert (cache.hits, cache.misses) == (4, 4)
        assert len(cache._lru) == 2
    everything = build_score_cache(wd, "run-a", 5, valid_shards=None)
    assert everything["rows"] == 5 and ScoreCache(wd, "run-a").lookup(3, np.array([0.125])) == [3.0]


def test_prune_keeps_only_the_named_runs(tmp_path):
    wd = WorkDir(str(tmp_path), "lineage")
    for run in ("old", "prev", "now"):
        write_log_segment(wd, run, 0, [0], [0.5], ["a"], [1.0])
    build_score_cache(wd, "old", 1, None)
    build_score_cache(wd, "prev", 1, None)
    deleted = prune(wd, ["prev", "now"])
    assert deleted == 4  # old's segment and marker, its cache range file and its metadata
    assert log_segments(wd, "old") == [] and log_segments(wd, "prev") and log_segments(wd, "now")
    names = [p.rsplit("/", 1)[-1] for stage in (LOG_STAGE, CACHE_STAGE) for p in wd.fs.ls(wd.stage_dir(stage))]
    assert names and not any(n.startswith("old") for n in names)
    assert ScoreCache(wd, "prev").lookup(0, [0.5]) == [1.0]
