"""Every method through the installed `thresher run`, in a fresh process (issue 16, item 5).

tests/test_methods_job.py runs the methods in the test process, where some other import may
already have loaded a module a method forgets to import (``pyarrow.compute`` did, and GTP
crashed for users). Here one `thresher run` subprocess runs the jobs one after another on
one Ray session (one start-up instead of eight), on the same small real-text corpus and tiny
models as test_methods_job.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from selector.data.manifest import read_manifest
from test_methods_job import config, corpus, quad_sections  # noqa: F401  (module fixtures reused)

THRESHER = str(Path(sys.executable).with_name("thresher"))


def test_every_method_runs_through_the_cli_in_a_fresh_process(corpus, tmp_path, tiny_tokenizer_dir,  # noqa: F811
                                                               tiny_llama_dir, tiny_llama_dir_2, quad_sections):
    rho = {"reference_model": str(tiny_llama_dir_2), "training_model": str(tiny_llama_dir), "max_length": 128,
           "overlap": 16, "keep_ratio": 0.6, "global_method": "exact", "num_workers": 1, "worker_num_cpus": 0.25}
    gtp = {"checkpoints": [str(tiny_llama_dir), str(tiny_llama_dir_2)], "projection_dim_a": 4,
           "projection_dim_g": 4, "chunk_tokens": 128, "target": "reference"}
    jobs = {  # plain quad runs inside quad+mask_tokens (same stages, then masks)
        "random": {},
        "topk-influence": quad_sections,
        "exploration-only": quad_sections,
        "perplexity": {"rho": rho},
        "rho": {"rho": rho},
        "gtp": {"gtp": gtp, "reference": quad_sections["reference"]},
        "quad+mask_tokens": dict(quad_sections, rho=rho, mask_tokens=True),
    }
    paths = []
    for name, sections in jobs.items():
        cfg = config(corpus, tmp_path / "work", tiny_tokenizer_dir, method=name.split("+")[0], **sections)
        cfg["ray"].update(num_cpus=4, shard_readers=1, influence_workers=1)  # fewer actor processes to start
        path = tmp_path / f"{name.replace('+', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(path)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "THRESHER_DEBUG")}
    env.update(RAY_USAGE_STATS_ENABLED="0", COLUMNS="200")
    result = subprocess.run([THRESHER, "run", "--no-progress", *map(str, paths)], capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    uris = re.findall(r"^manifest: (\S+)$", result.stdout, re.M)
    assert len(uris) == len(jobs), result.stdout[-4000:]
    for (name, _), uri in zip(jobs.items(), uris):
        manifest = read_manifest(uri)
        method = name.split("+")[0]
        assert manifest.summary["method"] == method and len(manifest) > 0, name
        assert set(manifest.table["method"].to_pylist()) == {method}
        if name.endswith("mask_tokens"):
            assert all(m is not None for m in manifest.token_masks())
        if method == "gtp":
            assert abs(manifest.table["weight"].to_numpy().mean() - 1.0) < 1e-9
