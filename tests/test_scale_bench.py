"""bench/scale.py's bookkeeping: stage seconds from a job's log lines, also over pieces of a resumed job."""

from bench.scale import STAGE_LINES, combine_pieces, merge_results, stage_seconds


def piece(seconds, marks, **peaks):
    return {"seconds": seconds, "marks": marks, "peak_rss_bytes": peaks}


FINAL = piece(30, [(4, "run x"), (5, "indexed 5"), (6, "embed: skipped"), (20, "cluster: k=4"),
                   (25, "selected 3 documents"), (26, "manifest: uri")], driver=6)


def test_one_piece_is_the_plain_stage_seconds():
    combined = combine_pieces([FINAL])
    assert combined["stages"] == stage_seconds(FINAL["marks"], 30, STAGE_LINES)
    assert (combined["seconds"], combined["pieces"]) == (30, 1)


def test_a_killed_pieces_unfinished_time_goes_to_the_stage_it_was_in():
    killed_in_cluster = piece(100, [(3, "run x"), (20, "indexed 5"), (50, "embed: 5 documents")], driver=5, A=9)
    killed_again = piece(40, [(4, "run x"), (6, "indexed 5"), (7, "embed: skipped")], driver=7)
    combined = combine_pieces([killed_in_cluster, killed_again, FINAL])
    assert combined["seconds"] == 170 and combined["pieces"] == 3
    assert sum(combined["stages"].values()) == 170  # every second is somewhere
    assert combined["stages"]["cluster"] == 14 + 50 + 33  # the final piece's, plus both killed tails
    assert combined["stages"]["start-up"] == 3 + 4 + 4  # each piece's own start-up: the cost of resuming
    assert combined["peak_rss_bytes"] == {"driver": 7, "A": 9}


def test_merge_keeps_the_rows_not_measured_now():
    old = {"meta": {"command": "a", "commit": "c1"}, "results": [{"method": "random", "documents": 10, "commit": "c1"},
                                                                  {"method": "quad", "documents": 10, "commit": "c1"}]}
    rows, meta = merge_results(old, [{"method": "quad", "documents": 10, "commit": "c2"}],
                               {"command": "b", "commit": "c2"})
    assert [(r["method"], r["commit"]) for r in rows] == [("random", "c1"), ("quad", "c2")]
    assert [m["command"] for m in meta["invocations"]] == ["a", "b"]
