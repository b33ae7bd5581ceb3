"""selector.selection.ranked: the merge of sorted per-shard runs equals the one-table greedy fill."""

import numpy as np
import pyarrow as pa
import pytest

from selector.errors import StageError
from selector.selection.ranked import KEY, select_from_runs, sort_run
from selector.rho.excess_loss import select_by_score
from selector.data.workdir import WorkDir


def _corpus(rng, n_shards, per_shard):
    tables = []
    for s in range(n_shards):
        n = int(rng.integers(0, per_shard + 1))
        score = rng.choice([0.5, 1.0, 1.5, 2.0], size=n) if s % 2 else rng.normal(size=n)  # ties in odd shards
        score[rng.random(n) < 0.1] = np.nan  # too short to score
        tables.append(pa.table({"doc_id": pa.array([f"d{s:02d}-{i:04d}" for i in rng.permutation(n)], pa.string()),
                                "shard": pa.array([f"s{s}"] * n, pa.string()), "row": np.arange(n, dtype=np.int64),
                                "n_tokens": rng.integers(1, 60, size=n).astype(np.int64), "score": score}))
    return tables


def _runs_in_workdir(tmp_path, tables, descending, row_group):
    wd = WorkDir(str(tmp_path), "r")
    dropped, mins = 0, []
    for i, t in enumerate(tables):
        run, d = sort_run(t, "score", descending)
        dropped += d
        if run.num_rows:
            mins.append(int(run["n_tokens"].to_numpy().min()))
        wd.write_table("losses", f"k{i}", run, "h", row_group_size=row_group)
    return [wd.iter_row_groups("losses", f"k{i}") for i in range(len(tables))], dropped, min(mins)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_runs_select_what_the_one_table_rule_selects(tmp_path, descending, seed):
    rng = np.random.default_rng(seed)
    tables = _corpus(rng, n_shards=7, per_shard=40)
    whole = pa.concat_tables(tables)
    total = int(whole["n_tokens"].to_numpy().sum())
    for budget in (0, 1, 37, total // 10, total // 2, total, 10 * total):
        want = select_by_score(whole["doc_id"].to_pylist(), whole["score"].to_numpy(zero_copy_only=False),
                               whole["n_tokens"].to_numpy(), budget, descending=descending)
        runs, dropped, min_tokens = _runs_in_workdir(tmp_path / f"{seed}-{descending}-{budget}", tables,
                                                     descending, row_group=5)
        got = select_from_runs(runs, budget, min_tokens, columns=("shard", "row", "n_tokens", "score"))
        assert got["doc_id"] == whole.take(pa.array(want, pa.int64()))["doc_id"].to_pylist(), budget
        assert sum(got["n_tokens"]) <= budget
        assert dropped == int(np.isnan(whole["score"].to_numpy(zero_copy_only=False)).sum())
        np.testing.assert_array_equal(got[KEY], -np.asarray(got["score"]) if descending else got["score"])


def test_the_walk_stops_when_no_document_can_fit():
    """After the budget is within min_tokens of full, no further row is read."""
    read = []

    def run(n_groups):
        for g in range(n_groups):
            read.append(g)
            yield pa.table({KEY: [float(g)], "doc_id": [f"d{g}"], "n_tokens": [10]})

    got = select_from_runs([run(100)], budget_tokens=35, min_tokens=10, columns=("n_tokens",))
    assert got["doc_id"] == ["d0", "d1", "d2"]
    assert len(read) == 3


def test_an_unsorted_run_is_refused():
    bad = [pa.table({KEY: [2.0, 1.0], "doc_id": ["a", "b"], "n_tokens": [1, 1]})]
    with pytest.raises(StageError, match="not sorted"):
        select_from_runs([bad], budget_tokens=10, min_tokens=1, columns=("n_tokens",))


def test_sort_run_names_a_missing_column():
    with pytest.raises(StageError, match="'ref_mean'"):
        sort_run(pa.table({"doc_id": ["a"], "n_tokens": [3]}), "ref_mean", False)


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_rule_with_hash_ties_selects_what_topk_influence_selects(tmp_path, seed):
    from selector.selection.baselines import topk_influence
    from selector.data.index import hash_keys

    rng = np.random.default_rng(seed)
    tables = []
    for t in _corpus(rng, n_shards=5, per_shard=40):
        score = np.nan_to_num(t["score"].to_numpy(zero_copy_only=False), nan=0.5)  # topk needs every score
        tables.append(t.set_column(t.schema.get_field_index("score"), "score", pa.array(score))
                      .append_column("hash_key", pa.array(hash_keys(t["doc_id"].to_pylist(), seed), pa.float64())))
    whole = pa.concat_tables(tables)
    total = int(whole["n_tokens"].to_numpy().sum())
    wd = WorkDir(str(tmp_path), "r")
    for i, t in enumerate(tables):
        wd.write_table("influence", f"k{i}", sort_run(t, "score", True, tie="hash_key")[0], "h", row_group_size=4)
    for budget in (0, 50, total // 7, total // 2, total):
        want = topk_influence(whole["doc_id"].to_pylist(), whole["n_tokens"].to_numpy(), whole["score"].to_numpy(),
                              budget, seed)
        runs = [wd.iter_row_groups("influence", f"k{i}") for i in range(len(tables))]
        got = select_from_runs(runs, budget, 1, columns=("n_tokens", "score"), tie="hash_key", rule="prefix")
        assert got["doc_id"] == whole.take(pa.array(want, pa.int64()))["doc_id"].to_pylist(), budget
