"""The fast CPU path (kernels/gemv.c through fast.accelerate) against the slow reference modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ernie45 import fast, fast_decode, greedy_head, kernels
from ernie45.config import PRESETS, ModelConfig
from ernie45.engine import Engine
from ernie45.generation import GenerationConfig, generate
from ernie45.greedy_head import GreedyHead
from ernie45.model import build_model, init_random
from ernie45.quant import quantize_model, set_path
from ernie45.sampling import SamplingParams

from test_kernels import INT16_ACTIVATIONS_TOL, needs_kernels  # shared with the kernel tests

# Widths that are multiples of 32 so every projection takes a kernel; 2 shared experts; 1 dense layer.
FAST_CFG = dict(PRESETS["ERNIE-4.5-21B-A3B"], vocab_size=256, hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=8,
                moe_k=3, moe_intermediate_size=32, moe_layer_start_index=1, moe_layer_end_index=2,
                num_nextn_predict_layers=0, max_position_embeddings=512)


@pytest.fixture(autouse=True)
def kernels_on_tiny_weights(monkeypatch):
    """The tiny test weights are below the size where accelerate() calls kernels; lower the bar."""
    monkeypatch.setattr(fast, "MIN_KERNEL_ELEMENTS", 0)
    monkeypatch.setattr(fast, "GREEDY_HEAD_MIN_ELEMENTS", 0)


def tiny_model(dtype=torch.float32, seed=0, **overrides):
    cfg = ModelConfig.from_dict(dict(FAST_CFG, **overrides))
    model = init_random(build_model(cfg, torch.float32), seed=seed, std=0.08)
    with torch.no_grad():  # a nonzero correction bias changes which experts are selected
        for layer in model.model.layers:
            if hasattr(layer.mlp, "moe_statics"):
                layer.mlp.moe_statics.e_score_correction_bias.normal_(0, 0.05)
    return model.to(dtype) if dtype != torch.float32 else model


def _keep_fp32(model):
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            p.data = p.data.float()
    return model


# ---- the screened greedy head ---------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_head_is_the_exact_argmax(dtype):
    torch.manual_seed(9)
    weight = (torch.randn(3000, 64) * 0.1).to(dtype)
    x = torch.randn(40, 64).to(dtype)
    if dtype == torch.bfloat16:  # rounding makes ties real; torch.argmax answers the first index
        weight[2000] = weight[17]
        x[0] = weight[17] * 5
    head = GreedyHead(weight)
    want = torch.argmax(F.linear(x, weight), dim=-1)
    assert torch.equal(head(x), want)
    assert dtype == torch.float32 or want[0] == 17


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_head_rows_share_one_screen(dtype):
    """Several rows screen the int8 head in one pass (64 at a time): the same screen bits as one row alone,
    and the exact argmax of every row (a vocabulary that is not a multiple of 8)."""
    torch.manual_seed(12)
    weight = (torch.randn(1003, 96) * 0.1).to(dtype)
    x = torch.randn(70, 96).to(dtype)
    head = GreedyHead(weight)
    a, b, floors = head.screen_rows(x[:9].float())
    for r in range(9):
        a1, b1, floor = head.screen(x[r].float())
        assert torch.equal(a[r], a1) and torch.equal(b[r], b1) and float(floors[r]) == floor
    assert torch.equal(head(x), torch.argmax(F.linear(x, weight), dim=-1))


def test_greedy_head_falls_back_to_the_full_head(monkeypatch):
    monkeypatch.setattr(greedy_head, "MAX_CANDIDATES", 0)
    weight, x = torch.randn(500, 32), torch.randn(3, 32)
    head = GreedyHead(weight)
    assert torch.equal(head(x), torch.argmax(F.linear(x, weight), dim=-1)) and head.full_heads == 3


@needs_kernels
class _Spy:
    """Counts calls of a greedy head (or of the fused step) and passes everything else through."""

    def __init__(self, head, calls, name):
        self.head, self.calls, self.name = head, calls, name

    def __call__(self, *args):
        self.calls.append(self.name)
        return self.head(*args)

    def __getattr__(self, attr):
        return getattr(self.head, attr)


def test_generation_uses_the_greedy_head_only_at_temperature_zero():
    model = tiny_model(seed=10)
    gcfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    want = generate(model, [7, 7, 8], gcfg)
    fast.accelerate(model)
    calls = []
    model.greedy_head = _Spy(model.greedy_head, calls, "head")
    fused = kernels.available()  # one-token steps: trunk, norm and greedy head in one C call
    if fused:
        model.model.greedy_step = _Spy(model.model.greedy_step, calls, "step")
    assert generate(model, [7, 7, 8], gcfg) == want
    # the prompt step (3 tokens) declines the fused step and runs the modules and the head
    assert calls == (["step", "head"] + ["step"] * 11 if fused else ["head"] * 12)
    n = len(calls)
    generate(model, [7, 7, 8], GenerationConfig(max_new_tokens=3, temperature=0.7, seed=1, stop_token_ids=()))
    assert len(calls) == n


@needs_kernels
@pytest.mark.parametrize("dtype,scheme", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int4")])
def test_fused_greedy_step_chooses_the_tokens_of_the_separate_steps(dtype, scheme, monkeypatch):
    model = _keep_fp32(tiny_model(dtype, seed=18, vocab_size=4096, moe_intermediate_size=64))
    with torch.no_grad():  # unit norm weights would only scale the logits: the argmax could not tell
        model.model.norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(3)) * 2)
    if scheme:
        model = quantize_model(model, scheme)
    fast.accelerate(model)
    assert model.greedy_head.in_c and model.fast_decode_unavailable is None
    gcfg = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    fused = generate(model, [5, 9, 300], gcfg)
    with monkeypatch.context() as m:
        m.setattr(fast_decode.FastErnie45Model, "greedy_step", lambda *args: None)
        assert generate(model, [5, 9, 300], gcfg) == fused
    if dtype == torch.float32:  # and the reference modules' full head
        assert generate(fast.reference(model), [5, 9, 300], gcfg) == fused
        fast.accelerate(model)
    monkeypatch.setattr(fast_decode, "MAX_CANDIDATES", 0)  # every step falls back to the full head on xn
    before = model.greedy_head.full_heads
    assert generate(model, [5, 9, 300], gcfg) == fused
    assert model.greedy_head.full_heads - before == 23


# ---- the module swap ------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_rms_norm_in_c_matches_the_module(dtype):
    from ernie45.layers import RMSNorm

    torch.manual_seed(17)
    norm = RMSNorm(96, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        x = (torch.randn(1, 1, 96) * 3).to(dtype)
        want = norm(x)
        norm.__class__ = fast.FastRMSNorm
        got = norm(x)
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # the same rounding points; rsqrt's last bit may differ: one bf16 ulp at most
            assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs()).all()
        torch.testing.assert_close(norm(x.expand(1, 3, 96)), RMSNorm.forward(norm, x.expand(1, 3, 96)))  # many rows: torch


def test_accelerate_swaps_classes_and_reference_restores():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert not fast.is_accelerated(model)
    fast.accelerate(model)
    assert fast.is_accelerated(model)  # the engine's paged decode attention kernel follows this
    assert isinstance(model.model.layers[0].self_attn.q_proj, fast.FastLinear)
    assert isinstance(model.model.layers[1].mlp.experts, fast.FastExperts)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoint names unchanged
    fast.reference(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "project" not in model.__dict__ and not fast.is_accelerated(model)


@needs_kernels
def test_fast_logits_match_reference_fp32():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 9))
    want = model(ids)
    fast.accelerate(model)
    torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)  # 9 rows: multi-row kernels
    got_step = [model(ids[:, : t + 1])[:, -1] for t in range(3)]  # single-row heads run the kernels
    for t, g in enumerate(got_step):
        torch.testing.assert_close(g, want[:, t], rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_greedy_equals_reference(dtype):
    model = _keep_fp32(tiny_model(dtype, seed=4))
    gcfg = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    want = generate(model, [3, 1, 4, 1, 5], gcfg)
    assert generate(fast.accelerate(model), [3, 1, 4, 1, 5], gcfg) == want


@needs_kernels
def test_fast_prefill_many_rows_bf16_uses_fp32_gemm():
    model = _keep_fp32(tiny_model(torch.bfloat16, seed=5))
    ids = torch.randint(0, 256, (1, 80))  # > KERNEL_MAX_ROWS: fp32 GEMM on up-cast bf16 weights
    want = model(ids).float()
    got = fast.accelerate(model)(ids).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@needs_kernels
@pytest.mark.parametrize("mode", ["native", "fp32"])
def test_bf16_kernel_rows_follow_the_cpu(monkeypatch, mode):
    """With bf16 hardware torch's bf16 GEMM takes over from the kernels at fewer rows; the result of a
    call in between (40 rows) is the reference's either way."""
    monkeypatch.setenv("ERNIE45_BF16_GEMM", mode)
    w = torch.randn(300, 256).to(torch.bfloat16)
    weights = kernels.Weights(torch.bfloat16, w, 256)
    assert fast.kernel_rows(weights) == (fast.NATIVE_BF16_KERNEL_ROWS if mode == "native" else fast.KERNEL_MAX_ROWS)
    assert fast.kernel_rows(weights, experts=True) == (fast.NATIVE_BF16_EXPERT_ROWS if mode == "native"
                                                       else fast.KERNEL_MAX_ROWS)
    assert fast.kernel_rows(kernels.Weights("int8", torch.zeros(4, 256, dtype=torch.int8), 256,
                                            torch.ones(4))) == float("inf")  # tiled: any number of rows
    assert fast.kernel_rows(kernels.Weights("int2", torch.zeros(4, 64, dtype=torch.uint8), 256, torch.ones(4, 4),
                                            torch.zeros(4, 4), 64)) == fast.KERNEL_MAX_ROWS
    lin = nn.Linear(256, 300, bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(w)
    x = torch.randn(40, 256).to(torch.bfloat16)
    want = lin(x).float()
    got = fast.accelerate(lin)(x).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("mode", ["native", "fp32"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bf16_prefill_takes_the_reference_route_on_bf16_hardware(monkeypatch, mode, scheme):
    """Above QUANT_BF16_GEMM_ROWS rows of bf16 activations, with bf16 hardware: the reference route (weight
    dequantized to bf16, torch's bf16 GEMM), so the same bits as the reference; without it the kernels."""
    monkeypatch.setenv("ERNIE45_BF16_GEMM", mode)
    monkeypatch.setattr(fast, "QUANT_BF16_GEMM_ROWS", 8)
    model = quantize_model(tiny_model(torch.bfloat16, seed=17), scheme)
    lin = model.model.layers[0].self_attn.q_proj
    set_path(model, "reference")
    x = torch.randn(2, 6, 64).to(torch.bfloat16)  # 12 rows > 8
    with torch.no_grad():
        want = lin(x)
        fast.accelerate(model)
        got, few = lin(x), lin(x[:1, :4])
    assert isinstance(lin, fast.FastQuantLinear)
    if mode == "native":
        assert torch.equal(got, want)
    else:  # int16-rounded activations in the kernels: close, not equal
        assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()
    assert (few.float() - want[:1, :4].float()).abs().max() <= 2 ** -6 * want.float().abs().max()


@pytest.mark.parametrize("mode", ["native", "fp32"])
def test_prefill_bf16_gemm_follows_the_cpu(monkeypatch, mode):
    """bf16 hardware (or ERNIE45_BF16_GEMM=native): torch's bf16 GEMM; else fp32 GEMM on up-cast weights."""
    monkeypatch.setenv("ERNIE45_BF16_GEMM", mode)
    torch.manual_seed(9)
    x, w = torch.randn(70, 96).to(torch.bfloat16), torch.randn(40, 96).to(torch.bfloat16)
    want = F.linear(x, w) if mode == "native" else F.linear(x.float(), w.float()).to(torch.bfloat16)
    assert fast.native_bf16() == (mode == "native")
    assert torch.equal(fast.prefill_linear(x, w), want)


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
def test_fast_quantized_matches_reference_path(scheme):
    model = quantize_model(tiny_model(seed=6), scheme)
    ids = torch.randint(0, 256, (1, 6))
    set_path(model, "reference")
    gcfg = GenerationConfig(max_new_tokens=16, stop_token_ids=())
    want_logits, want = model(ids), generate(model, ids[0].tolist(), gcfg)
    fast.accelerate(model)
    assert isinstance(model.model.layers[1].mlp.experts, fast.FastQuantExperts)
    got_logits = torch.stack([model(ids[:, : t + 1])[0, -1] for t in range(ids.shape[1])])
    assert (got_logits - want_logits[0]).abs().max() <= INT16_ACTIVATIONS_TOL * want_logits.abs().max()
    assert generate(model, ids[0].tolist(), gcfg) == want


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_fast_path_equals_reference_generate(dtype, monkeypatch):
    """The engine on the fast path (decode steps attend through kernels.paged_attention over the block
    tables, prefill steps through attend_gqa) generates the reference's greedy tokens."""
    model = _keep_fp32(tiny_model(dtype, seed=7))
    prompts = {"a": [5, 6, 7], "b": [9, 8, 7, 6, 5, 4, 3] * 3, "c": [1]}  # "b" spans several 16-slot blocks
    want = {k: generate(model, v, GenerationConfig(max_new_tokens=10, stop_token_ids=())) for k, v in prompts.items()}
    calls = []
    paged = kernels.paged_attention
    monkeypatch.setattr(kernels, "paged_attention", lambda *a: calls.append(a[-1].shape[0]) or paged(*a))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    assert Engine(model, kv_cache_bytes=4 << 20).generate(prompts, params) == want and not calls  # reference modules
    fast.accelerate(model)
    assert Engine(model, kv_cache_bytes=4 << 20).generate(prompts, params) == want
    assert calls and max(calls) == 3  # every layer of every decode step, all three requests together


@needs_kernels
def test_engine_takes_the_greedy_head_for_plain_greedy_rows_only():
    """Greedy rows without logprobs or penalties get their tokens from one screened pass over the head;
    rows that need logits (sampling, logprobs, penalties) go through the sampler. Tokens and logprobs are
    those of the engine without a greedy head."""
    model = tiny_model(seed=8)
    fast.accelerate(model)
    kinds = {"plain": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
             "logprobs": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=2),
             "penalty": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
             "sampled": SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=5)}
    prompts = {f"{k}{i}": [3 + i, 7, 11 + 2 * i] for k in kinds for i in range(2)}

    def run(engine):
        for rid, ids in prompts.items():
            engine.add_request(rid, ids, kinds[rid[:-1]])
        out = {}
        while engine.has_unfinished():
            for e in engine.step():
                out.setdefault(e.request_id, []).append((e.token_id, e.logprobs))
        return out

    rows = []
    head = model.greedy_head
    model.greedy_head = lambda x: rows.append(x.shape[0]) or head(x)
    with_head = run(Engine(model, kv_cache_bytes=4 << 20))
    assert rows and max(rows) == 2  # the two plain rows of a step, together
    model.greedy_head = None
    assert with_head == run(Engine(model, kv_cache_bytes=4 << 20))


def test_without_kernels_accelerate_still_correct(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", "disabled for this test")
    model = _keep_fp32(tiny_model(torch.bfloat16, seed=8))
    gcfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    want = generate(model, [1, 2, 3], gcfg)
    assert generate(fast.accelerate(model), [1, 2, 3], gcfg) == want


# ---- the CLI --------------------------------------------------------------------------------------
def test_bench_cli_json_on_default_model():
    out = subprocess.run([sys.executable, "-m", "ernie45", "bench", "--json", "--threads", "1", "--new-tokens", "4",
                          "--prefill-tokens", "16", "--concurrency", "2", "--concurrent-new-tokens", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_bytes", "throughput_tok_s", "active_weight_bytes"):
        assert key in result
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0 and result["peak_rss_bytes"] > 10 << 20
    assert set(result["throughput_tok_s"]) == {"2"}
    assert len(result["greedy_tokens"]) == 4 and result["greedy_matches_reference"] is True


def test_bench_cli_rejects_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "ernie45", "bench", "--new-tokens", "1"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--new-tokens" in out.stderr
