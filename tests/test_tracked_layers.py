import pytest
import torch
from torch import nn

from _influence_helpers import load
from selector.errors import StageError
from selector.gradients.tracked_layers import TrackedLayersConfig, capture, discover_blocks, report


def test_llama_blocks_joint_qkv_and_mlp(tiny_llama_dir):
    model, _ = load(tiny_llama_dir)
    blocks = discover_blocks(model)
    names = [b.name for b in blocks]
    assert names[0] == "model.layers.0.self_attn.[q_proj+k_proj+v_proj]"
    qkv = blocks[0]
    assert qkv.module_names == [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"]
    assert (qkv.in_aug, qkv.out_features, qkv.has_bias) == (64, 192, False)
    leaf = {n.rpartition(".")[2] for b in blocks for n in b.module_names}
    assert leaf == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(blocks) == 2 * 5  # per layer: QKV, o, gate, up, down
    assert not any("lm_head" in n for n in names)
    rep = report(blocks)
    assert rep[0]["params"] == 64 * 192 and rep[0]["modules"] == qkv.module_names


def test_gpt2_conv1d_fused_c_attn(tiny_gpt2_dir):
    model, _ = load(tiny_gpt2_dir)
    blocks = discover_blocks(model)
    assert [b.name.split(".", 3)[-1] for b in blocks[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    c_attn = blocks[0]
    assert c_attn.kind == "conv1d" and c_attn.has_bias
    assert (c_attn.in_aug, c_attn.out_features) == (65, 192)  # bias folded in as a homogeneous input
    # weight_matrix is out x in even though Conv1D stores (in, out)
    W = c_attn.weight_matrix()
    assert torch.equal(W[:, :64], c_attn.modules[0].weight.t())
    assert torch.equal(W[:, 64], c_attn.modules[0].bias)


def test_include_exclude_and_bias_are_configurable(tiny_llama_dir, tiny_gpt2_dir):
    model, _ = load(tiny_llama_dir)
    only_mlp = discover_blocks(model, TrackedLayersConfig(include=[r"\.mlp\."]))
    assert {b.name.rpartition(".")[2] for b in only_mlp} == {"gate_proj", "up_proj", "down_proj"}
    no_joint = discover_blocks(model, TrackedLayersConfig(joint_groups=[]))
    assert len(no_joint) == 2 * 7
    no_down = discover_blocks(model, TrackedLayersConfig(exclude=[r"down_proj", r"lm_head"]))
    assert len(no_down) == 2 * 4
    gpt2, _ = load(tiny_gpt2_dir)
    nobias = discover_blocks(gpt2, TrackedLayersConfig(include_bias=False))
    assert nobias[0].in_aug == 64


def test_capture_records_inputs_and_output_grads_then_removes_hooks(tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    blocks = discover_blocks(model)
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    with capture(blocks):
        model(input_ids=ids).logits.sum().backward()
        b = blocks[0]
        assert b.a.shape == (1, ids.shape[1], 64) and b.g.shape == (1, ids.shape[1], 192)
        # sum_t g_t a_t^T is the weight gradient of the joint block
        D = torch.einsum("bto,bti->oi", b.g, b.a_aug())
        assert torch.allclose(D, b.grad_matrix(), rtol=1e-4, atol=1e-6)
    assert all(len(m._forward_hooks) == 0 for bl in blocks for m in bl.modules)
    assert blocks[0].a is None


def test_model_without_trackable_layers_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(StageError, match="no trackable layers"):
        discover_blocks(model)


def test_include_matching_nothing_is_a_clear_error(tiny_llama_dir):
    model, _ = load(tiny_llama_dir)
    with pytest.raises(StageError, match=r"no trackable layers.*include=\['nothing_here'\]"):
        discover_blocks(model, TrackedLayersConfig(include=["nothing_here"]))
