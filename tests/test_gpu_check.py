"""bench/gpu_check.py's pieces that need no GPU and no run: the environment probe, the device peak table,
the rank correlation and the results table. (The whole check runs by hand: python bench/gpu_check.py.)"""

import numpy as np

from bench import gpu_check


def test_probe_names_every_required_module():
    env = gpu_check.probe()
    assert set(env["modules"]) == set(gpu_check.REQUIRED)
    assert env["modules"]["torch"] and isinstance(env["cuda"], bool) and isinstance(env["faiss_gpu"], bool)


def test_peak_bf16_matches_the_specific_name_first():
    assert gpu_check.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_bf16("NVIDIA H200") == 989e12
    assert gpu_check.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_bf16(None) is None and gpu_check.peak_bf16("Some CPU") is None


def test_spearman():
    x = np.arange(10.0)
    assert abs(gpu_check.spearman(x, x ** 3) - 1.0) < 1e-12
    assert abs(gpu_check.spearman(x, -x) + 1.0) < 1e-12


def test_markdown_says_when_no_gpu_was_used():
    env = {"modules": {"torch": "2.13.0+cpu", "faiss": "1.15.1", "ray": "2.60.0"}, "faiss_gpu": False,
           "python": "3.11", "cpus": 2}
    result = {"env": env, "gpu": False, "inputs": {"proxy_shape": "llama 64 x 2", "documents": 10}, "encoder": "e",
              "non_embedding_params": 1000, "seconds": 1.0, "spearman_fp32_vs_cpu": 1.0, "cpu_docs": 4,
              "max_rel_diff_fp32_vs_cpu": 0.0, "cpu_influence_seconds": 0.1, "peak_bf16_flops": None,
              "stages": [{"stage": "embed", "device": "cpu", "dtype": "float32", "docs": 10, "tokens": 100,
                          "seconds": 2.0, "docs_per_s": 5.0, "tokens_per_s": 50.0, "mfu": None, "note": ""}]}
    text = gpu_check.markdown(result, "python bench/gpu_check.py")
    assert "CPU fallback" in text and "no GPU" in text and "| embed | cpu | float32 | 10 | 100 | 2.00 |" in text
