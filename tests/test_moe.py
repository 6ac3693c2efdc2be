"""Closed-form MoE tests with hand-built weights, and grouped experts vs a per-token loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ernie45.config import ModelConfig
from ernie45.moe import SparseMoeBlock, select_experts


def _cfg(**kw):
    raw = dict(model_type="ernie4_5_moe", vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
               num_attention_heads=1, num_key_value_heads=1, head_dim=4, moe_num_experts=4, moe_k=2,
               moe_intermediate_size=4, moe_num_shared_experts=0, moe_layer_start_index=0)
    raw.update(kw)
    return ModelConfig.from_dict(raw)


def _hand_block(cfg, gain=3.0):
    """Expert e computes (e+1) * silu(gain*x) * x elementwise; the router reads x's coordinates as logits."""
    block = SparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(4))
        for e in range(cfg.moe_num_experts):
            block.experts.gate_proj[e].copy_(torch.eye(4) * gain)
            block.experts.up_proj[e].copy_(torch.eye(4))
            block.experts.down_proj[e].copy_(torch.eye(4) * (e + 1))
    return block


def test_router_softmax_topk_renormalised():
    cfg = _cfg()
    block = _hand_block(cfg)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, w, idx = block.route(x)
    p = [math.exp(v) for v in (2.0, 1.0, 0.0, -1.0)]
    p = [v / sum(p) for v in p]
    assert torch.allclose(probs[0], torch.tensor(p))
    assert idx[0].tolist() == [0, 1]
    assert torch.allclose(w[0], torch.tensor([p[0], p[1]]) / (p[0] + p[1]))


def test_bias_selects_but_does_not_weight():
    cfg = _cfg()
    block = _hand_block(cfg)
    with torch.no_grad():
        block.moe_statics.e_score_correction_bias.copy_(torch.tensor([[0.0, 0.0, 0.0, 5.0]]))
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, w, idx = block.route(x)
    assert idx[0].tolist() == [3, 0]  # expert 3 is least likely but the bias selects it
    p = probs[0]
    assert torch.allclose(w[0], torch.stack([p[3], p[0]]) / (p[3] + p[0]))  # weights from unbiased probs
    expected = F.silu(3 * x) * x * (w[0, 0] * 4 + w[0, 1] * 1)
    assert torch.allclose(block(x[None])[0], expected, atol=1e-6)


def test_norm_min_guards_zero_sum():
    probs = torch.tensor([[0.0, 0.0, 1.0]])
    w, idx = select_experts(probs, torch.tensor([5.0, 4.0, 0.0]), 2, 1e-12)
    assert idx[0].tolist() == [0, 1] and torch.equal(w, torch.zeros(1, 2))  # 0 / max(0, 1e-12), no NaN


def test_shared_experts_added_unweighted():
    cfg = _cfg(moe_num_shared_experts=2)  # one MLP of width 2*4
    block = _hand_block(cfg)
    with torch.no_grad():
        for p in block.shared_experts.parameters():
            p.zero_()
        block.shared_experts.gate_proj.weight[:4].copy_(torch.eye(4) * 3)
        block.shared_experts.up_proj.weight[:4].copy_(torch.eye(4))
        block.shared_experts.down_proj.weight[:, :4].copy_(torch.eye(4) * 10)
    x = torch.tensor([[[0.5, -0.25, 1.0, 0.0]]])
    routed = _hand_block(_cfg())(x)
    assert torch.allclose(block(x), routed + 10 * F.silu(3 * x) * x, atol=1e-6)


def test_grouped_experts_equal_per_token_loop():
    cfg = _cfg(hidden_size=16, moe_num_experts=8, moe_k=3, moe_intermediate_size=12, num_attention_heads=4)
    torch.manual_seed(0)
    block = SparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 9, 16)
    flat = x.reshape(-1, 16)
    _, w, idx = block.route(flat)
    loop = torch.stack([sum(w[t, j] * block.experts.expert(int(idx[t, j]), flat[t:t + 1])[0] for j in range(3))
                        for t in range(flat.shape[0])])
    assert torch.allclose(block(x).reshape(-1, 16), loop, atol=1e-5)
