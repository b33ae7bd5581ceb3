"""Smoke test of the quality benchmark machinery at minimum size (real Ray, real tiny models)."""

import math

from bench.quality.report import table_markdown, write_results
from bench.quality.run import BenchSettings, run_bench
from bench.quality.train import TrainSettings


def test_quality_bench_smallest(ray_local, tmp_path):
    s = BenchSettings(out=str(tmp_path / "cache"), methods=("random", "perplexity"), seeds=(0,),
                      budget_tokens=6_000, max_docs_per_source=30, max_text_dir_docs=0, n_low_quality=12,
                      max_chars=1200, n_general=10, vocab_size=300, max_target_docs=80, proxy_steps=4,
                      train=TrainSettings(steps=3, batch_size=2, seq_len=32, warmup_steps=1))
    result = run_bench(s)
    rows = {r["method"]: r for r in result["summary"]}
    assert set(rows) == {"random", "perplexity", "oracle"}
    for r in result["runs"]:
        assert math.isfinite(r["target_loss"]) and math.isfinite(r["general_loss"])
    assert 0 < rows["random"]["selected_tokens"] <= 6_000
    assert rows["random"]["share_of_gain"] == 0.0
    by_method = {r["method"]: r for r in result["runs"]}
    assert math.isclose(rows["perplexity"]["delta_vs_random"],
                        by_method["perplexity"]["target_loss"] - by_method["random"]["target_loss"])
    assert len(result["code"]["commit"]) == 40
    md = write_results(result, tmp_path / "results", "python -m bench.quality (test)")
    text = md.read_text()
    assert "| perplexity | 1 |" in text and "| oracle | 1 |" in text
    assert f"commit `{result['code']['commit'][:10]}`" in text and "every run computed in it" in text
    assert all(r["commit"] == result["code"]["commit"] for r in result["runs"])
    assert (tmp_path / "results" / "quality.png").stat().st_size > 0
    assert "random" in table_markdown(result["summary"])


def test_summary_pairs_each_method_with_random_and_its_token_matched_random():
    from bench.quality.run import summarize

    def run(method, seed, target, tokens=90_000):
        return {"method": method, "seed": seed, "target_loss": target, "general_loss": 6.0,
                "selected_tokens": tokens, "kept_tokens": tokens or 88_000, "select_s": 1.0, "train_s": 1.0}

    results = [run("random", 0, 6.4), run("random", 1, 6.5), run("oracle", 0, 6.2, None), run("oracle", 1, 6.3, None),
               run("quad", 0, 6.3, 40_000), run("quad", 1, 6.45, 50_000),
               run("random@quad", 0, 6.35, 40_000), run("gtp", 0, 6.38), run("gtp", 1, 6.42, 60_000),
               run("random@gtp", 1, 6.44, 60_000)]
    rows = {r["method"]: r for r in summarize(results)}
    assert math.isclose(rows["quad"]["delta_vs_random"], ((6.3 - 6.4) + (6.45 - 6.5)) / 2)
    assert math.isclose(rows["quad"]["delta_vs_matched"], ((6.3 - 6.35) + (6.45 - 6.5)) / 2)
    # gtp filled the budget on seed 0: there the same-token baseline is plain random
    assert math.isclose(rows["gtp"]["delta_vs_matched"], ((6.38 - 6.4) + (6.42 - 6.44)) / 2)
    assert rows["random"]["delta_vs_matched"] is None
    assert math.isclose(rows["quad"]["share_of_gain"], (6.45 - 6.375) / (6.45 - 6.25))
    assert "| quad | 2 |" in table_markdown(summarize(results))
