"""`thresher models train`: real tiny models trained from a tokenizer or an HF model folder, resumable,
with job-config lines that a job runs with (real local Ray, nothing mocked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selector.demo.corpus import write_shard
from selector.models.training import MARKER, ModelTrainingConfig, train_models
from selector.demo.textsources import docstrings, pydoc_topics

THRESHER = str(Path(sys.executable).with_name("thresher"))
SMALL = ["--steps", "12", "--reference-steps", "6", "--checkpoints", "2", "--batch-size", "4", "--seq-len", "32",
         "--corpus-documents", "40"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("models-cli")
    docs = [{"id": f"doc/{d.name}", "text": d.text[:1000]} for d, _ in zip(docstrings(), range(48))]
    for i, suffix in enumerate(["parquet", "jsonl"]):
        write_shard(root / "corpus" / f"part-{i}.{suffix}", docs[i::2])
    write_shard(root / "reference" / "ref.jsonl", [{"text": d.text[:1000]} for d, _ in zip(pydoc_topics(), range(10))])
    return root


def thresher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([THRESHER, *args], capture_output=True, text=True, timeout=300)


def test_models_train_prints_lines_a_job_runs_with_and_a_rerun_reuses_them(ray_local, data, tmp_path,
                                                                          tiny_tokenizer_dir):
    from ray_jobs.select import run
    from selector.config import load_config
    from selector.data.manifest import read_manifest
    from selector.models.loading import load_causal_lm

    out = tmp_path / "models"
    args = ["models", "train", "--corpus", str(data / "corpus"), "--reference", str(data / "reference"),
            "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out), "--no-progress", *SMALL,
            "--job-config", str(tmp_path / "ppl.yaml"), "--method", "perplexity", "--id-column", "id",
            "--work-root", str(tmp_path / "work")]
    first = thresher(*args)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "4 trained, 0 reused" in first.stdout
    lines = yaml.safe_load(first.stdout[first.stdout.index("tokenizer:"):first.stdout.index("job config:")])
    assert lines == yaml.safe_load((out / "models.yaml").read_text())
    ckpts = lines["gtp"]["checkpoints"]
    assert [Path(c).name for c in ckpts] == ["step-000006", "step-000012"]
    assert lines["proxy_model"] == ckpts[-1] == lines["rho"]["training_model"]
    assert lines["tokenizer"] == str(tiny_tokenizer_dir.resolve())
    assert lines["reference"]["uri"] == str(data / "reference")
    for path in ckpts + [lines["rho"]["reference_model"]]:
        assert json.loads((Path(path) / MARKER).read_text())["key"]
        load_causal_lm(path)  # save_pretrained folders that load
    meta = json.loads((Path(lines["rho"]["reference_model"]) / "proxy_training.json").read_text())
    assert meta["steps"] == 6 and meta["last_loss"] < meta["first_loss"]

    again = thresher(*args)
    assert again.returncode == 0, again.stderr
    assert "0 trained, 4 reused" in again.stdout and "(done)" in again.stdout

    # the written job config runs (perplexity, with the reference and training models)
    manifest = read_manifest(run(load_config(tmp_path / "ppl.yaml"), progress=False, log=lambda m: None))
    assert len(manifest) > 0 and manifest.summary["models"]["reference_model"] == lines["rho"]["reference_model"]


def test_models_train_from_an_hf_model_folder_uses_its_config(data, tmp_path, tiny_gpt2_dir):
    from selector.models.loading import load_causal_lm

    result = thresher("models", "train", "--corpus", str(data / "corpus"), "--tokenizer", str(tiny_gpt2_dir),
                      "--out", str(tmp_path / "m"), "--no-progress", "--checkpoints", "1", *SMALL[:2], *SMALL[6:])
    assert result.returncode == 0, result.stderr
    lines = yaml.safe_load((tmp_path / "m" / "models.yaml").read_text())
    assert "rho" not in lines and "gtp" not in lines  # no reference set, one checkpoint
    model = load_causal_lm(lines["proxy_model"])
    assert type(model).__name__ == "GPT2LMHeadModel"

    bad = thresher("models", "train", "--corpus", str(data / "corpus"), "--tokenizer", str(tmp_path / "nowhere"),
                   "--out", str(tmp_path / "x"), "--no-progress")
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr


def test_train_models_resumes_from_the_last_finished_checkpoint(tiny_tokenizer_dir, tmp_path, real_texts):
    s = ModelTrainingConfig(steps=6, checkpoints=3, batch_size=2, seq_len=16)
    logs: list[str] = []
    first = train_models(tiny_tokenizer_dir, real_texts[:30], real_texts[30:40], tmp_path, s, progress=False,
                         log=logs.append)
    assert len(first.trained) == 5  # init, 3 checkpoints, reference
    # an interrupted run: the last checkpoint lost its marker, a .partial folder is left over
    (Path(first.checkpoints[-1]) / MARKER).unlink()
    Path(first.checkpoints[-1] + ".partial").mkdir()
    again = train_models(tiny_tokenizer_dir, real_texts[:30], real_texts[30:40], tmp_path, s, progress=False,
                         log=logs.append)
    assert again.trained == [first.checkpoints[-1]] and again.checkpoints == first.checkpoints
    assert not Path(first.checkpoints[-1] + ".partial").exists()
    # other settings or other texts: new folders, the old ones are left as they were
    other = train_models(tiny_tokenizer_dir, real_texts[:30], None, tmp_path, s.model_copy(update={"lr": 1e-3}),
                         progress=False, log=logs.append)
    assert other.init == first.init and set(other.checkpoints).isdisjoint(first.checkpoints)
    assert other.reference is None
    with pytest.raises(Exception, match="checkpoints"):
        ModelTrainingConfig(steps=2, checkpoints=3).segment_steps()
