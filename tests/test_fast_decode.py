"""The one-call decode step (fast_decode.py, kernels/decode.c) and the experts' batch kernel, against the
reference modules. Shares test_fast.py's tiny models and its fixture that lets their small weights reach
the kernels."""

from __future__ import annotations

import pytest
import torch

from ernie45 import fast, fast_decode, kernels
from ernie45.cache import KVCache
from ernie45.generation import GenerationConfig, generate
from ernie45.quant import quantize_model, set_path

from test_fast import _keep_fp32, kernels_on_tiny_weights, tiny_model  # noqa: F401 (the fixture applies here too)
from test_kernels import INT16_ACTIVATIONS_TOL, needs_kernels

# ---- the one-call decode step ---------------------------------------------------------------------
def _decode_hidden(model, ids, prefill):
    """Prefill `prefill` tokens through the modules, then one-token steps; hidden [T-prefill, D] fp32."""
    cache = KVCache(model.config, 1, ids.shape[1] + 2, model.model.embed_tokens.weight.dtype,
                    num_layers=model.config.num_hidden_layers)
    model.model(ids[:, :prefill], torch.arange(prefill)[None], cache)
    return torch.cat([model.model(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0].float()
                      for t in range(prefill, ids.shape[1])])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_matches_modules(dtype):
    model = _keep_fp32(tiny_model(dtype, seed=11))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = model.model(ids, torch.arange(12)[None])[0, 5:].float()
        fast.accelerate(model)
        assert model.fast_decode_unavailable is None and model.model._decoder is not None
        got = _decode_hidden(model, ids, 5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the reference's rounding points: equal up to summation order (one bf16 ulp at most)
        assert (got - want).abs().max() <= 2 ** -7 * want.abs().max()


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "mixed-2bit"])
def test_decode_step_quantized_matches_reference_path(scheme):
    # expert width 64: int2's 64-column groups (a 32-wide int2 group splits the kernels' 16-byte chunk)
    model = quantize_model(tiny_model(seed=12, moe_intermediate_size=64), scheme)
    ids = torch.randint(0, 256, (1, 9))
    set_path(model, "reference")
    with torch.no_grad():
        want = model.model(ids, torch.arange(9)[None])[0, 3:]
        fast.accelerate(model)
        assert model.fast_decode_unavailable is None
        got = _decode_hidden(model, ids, 3)
    assert (got - want).abs().max() <= INT16_ACTIVATIONS_TOL * want.abs().max()


@needs_kernels
def test_decode_step_rope_table_equals_per_position_values():
    from ernie45.layers import rope_cos_sin

    model = fast.accelerate(tiny_model(seed=16))
    dec = model.model._decoder
    for pos in (0, 1, 255, 256, 300, 511):  # across table blocks
        cos, sin = rope_cos_sin(torch.tensor([[pos]]), dec.inv_freq)
        got = dec._rope(pos)
        assert torch.equal(got[0], cos[0, 0]) and torch.equal(got[1], sin[0, 0])


@needs_kernels
def test_decode_step_phase_clock_times_the_phases_without_changing_the_result():
    model = fast.accelerate(tiny_model(seed=17))  # layer 0 dense, layers 1-2 routed + shared experts
    dec, cfg = model.model._decoder, model.config
    outs = []
    for prof in (None, torch.zeros(len(kernels.DECODE_PHASES), dtype=torch.float64)):
        cache = KVCache(cfg, 1, 8, torch.float32, num_layers=cfg.num_hidden_layers)
        with torch.no_grad():
            outs.append(torch.cat([dec.step(t, t, cache, prof) for t in range(4)]))
    assert torch.equal(outs[0], outs[1])
    times = dict(zip(kernels.DECODE_PHASES, prof.tolist()))
    assert all(v > 0 for v in times.values()), times  # every phase of this model ran and was timed
    with pytest.raises(ValueError, match="float64"):
        kernels.decode(None, None, torch.zeros(1), 0, torch.zeros(1), torch.zeros(1), torch.zeros(1),
                       torch.zeros(len(kernels.DECODE_PHASES)))


def test_decode_step_refuses_what_it_cannot_run():
    model = tiny_model(seed=13, moe_intermediate_size=24)  # expert width 24: not a multiple of 16
    fast.accelerate(model)
    if kernels.available():
        assert "not kernel-shaped" in model.fast_decode_unavailable
    assert type(model.model) is not fast_decode.FastErnie45Model
    ids = torch.randint(0, 256, (1, 6))
    fast.reference(model)
    want = generate(model, ids[0].tolist(), GenerationConfig(max_new_tokens=6, stop_token_ids=()))
    assert generate(fast.accelerate(model), ids[0].tolist(), GenerationConfig(max_new_tokens=6, stop_token_ids=())) == want


@needs_kernels
def test_decode_step_position_beyond_the_cache_is_an_error():
    model = fast.accelerate(tiny_model(seed=14))
    cache = KVCache(model.config, 1, 3, torch.float32, num_layers=model.config.num_hidden_layers)
    with torch.no_grad(), pytest.raises(ValueError, match="beyond this cache"):
        model.model(torch.tensor([[5]]), torch.tensor([[3]]), cache)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [None, "int4"])
def test_grouped_experts_for_a_decode_batch_match_reference(dtype, scheme):
    model = _keep_fp32(tiny_model(dtype, seed=15))
    if scheme:
        model = quantize_model(model, scheme)
        set_path(model, "reference")
    block = model.model.layers[1].mlp
    x = torch.randn(6, 64).to(dtype)
    with torch.no_grad():
        _, w, idx = block.route(x)
        want = block.experts(x, w, idx)
        fast.accelerate(model)
        got = block.experts(x, w, idx)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # bf16 rounding (and, quantized, the reference's bf16-rounded dequantized weights)
        assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_grouped_experts_of_a_prefill_run_in_the_kernels_token_by_token_exact(dtype, scheme):
    """A prefill's experts (int8/int4) go through one moe_tokens call even with more than MAX_ROWS rows per
    expert (taken MAX_ROWS at a time): each token's output is bit for bit what it gets alone."""
    # experts 64 wide: int4 down rows in whole 64-column groups, which the tiles take (32 would not)
    model = quantize_model(_keep_fp32(tiny_model(dtype, seed=16, moe_intermediate_size=64)), scheme)
    fast.accelerate(model)
    experts = model.model.layers[1].mlp.experts
    T, k = kernels.MAX_ROWS + 30, 6
    x = torch.randn(T, 64).to(dtype)
    idx = torch.stack([torch.randperm(8)[:k] for _ in range(T)])  # 8 experts share 564 pairs: > 64 rows each
    w = torch.softmax(torch.randn(T, k), -1).to(dtype)
    calls = []
    real = kernels.moe_tokens
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "moe_tokens", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        got = experts(x, w, idx)
    assert calls == [1]
    with torch.no_grad():
        alone = torch.cat([experts(x[t:t + 1], w[t:t + 1], idx[t:t + 1]) for t in range(T)])
    assert torch.equal(got, alone)
