"""Logits and greedy generation against transformers, through the production loader."""

from __future__ import annotations

import pytest
import torch

from ernie45 import GenerationConfig, generate, load_model
from conftest import CONFIGS

IDS = torch.tensor([[1, 5, 9, 14, 77, 3, 42, 8, 60, 21, 2, 98], [4, 4, 4, 90, 31, 7, 11, 19, 23, 29, 31, 37]])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_match_transformers(hf_checkpoint, name):
    path, ref = hf_checkpoint(name)
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(IDS) - ref(IDS).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max-abs logit difference {diff}"


@pytest.mark.parametrize("name", ["moe_shared_tied", "dense_untied"])
def test_sharded_checkpoint_matches(hf_checkpoint, name):
    path, ref = hf_checkpoint(name, shard=True)
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        assert (model(IDS) - ref(IDS).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_transformers(hf_checkpoint, name):
    path, ref = hf_checkpoint(name)
    model = load_model(path, dtype=torch.float32)
    prompt = [1, 5, 9, 14]
    ours = generate(model, prompt, GenerationConfig(max_new_tokens=32, stop_token_ids=()))
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ours) == 32 and ours == theirs


def _greedy_with_topk(step_logits_fn, prompt, n, k=5):
    tokens, tops = [], []
    ids = list(prompt)
    for _ in range(n):
        logits = step_logits_fn(torch.tensor([ids]))[0, -1].float()
        tops.append(set(torch.topk(logits, k).indices.tolist()))
        tokens.append(int(logits.argmax()))
        ids.append(tokens[-1])
    return tokens, tops


@pytest.mark.parametrize("name", ["moe_noshared_untied_bias", "moe_shared_tied", "dense_headdim_tied"])
def test_bf16_checkpoint_greedy_topk_containment(hf_checkpoint, name):
    """bf16 may flip near-ties: until the first divergence tokens agree, and there each is in the other's top-5."""
    path, ref = hf_checkpoint(name, dtype=torch.bfloat16)
    model = load_model(path)  # dtype auto -> bfloat16 from config.json
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours, our_top = _greedy_with_topk(model, [1, 5, 9, 14], 32)
        theirs, their_top = _greedy_with_topk(lambda x: ref(x).logits, [1, 5, 9, 14], 32)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert a in their_top[i] and b in our_top[i], f"step {i}: {a} vs {b} outside each other's top-5"
            break
    with torch.no_grad():  # whole-sequence logits close in bf16
        diff = (model(IDS).float() - ref(IDS).logits.float()).abs().max().item()
    assert diff < 0.1


def test_router_and_bias_stay_fp32_in_bf16(hf_checkpoint):
    path, _ = hf_checkpoint("moe_shared_tied")
    model = load_model(path, dtype="bfloat16")
    mlp = model.model.layers[1].mlp
    assert mlp.gate.weight.dtype == torch.float32
    assert mlp.moe_statics.e_score_correction_bias.dtype == torch.float32
    assert mlp.experts.gate_proj.dtype == torch.bfloat16


def test_correction_bias_changes_selected_experts(hf_checkpoint):
    """The test checkpoints' bias must matter, or the parity tests would not cover bias-for-selection."""
    path, _ = hf_checkpoint("moe_noshared_untied_bias")
    model = load_model(path, dtype=torch.float32)
    mlp = model.model.layers[1].mlp
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    probs, _, idx = mlp.route(x)
    plain = torch.topk(probs, mlp.k).indices
    assert (idx.sort(-1).values != plain.sort(-1).values).any()
