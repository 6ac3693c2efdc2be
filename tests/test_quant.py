"""Quantized weight formats, modules and checkpoints (ernie45.quant), on tiny random models.

Every fast path is checked against the slow reference (dequantize, then nn.Linear math); the reference
path is checked to be *exactly* a float model holding the dequantized weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from ernie45.config import ModelConfig
from ernie45.generation import GenerationConfig, generate
from ernie45.model import build_model, init_random
from ernie45.quant import (QuantLinear, QuantWeight, apply_quant_config, dequantize_model, quantize_model, set_path)
from ernie45.quant.formats import (FORMATS, dequantize, group_size_for, pack, quantize_rtn, slice_rows, unpack)
from ernie45.quant.modules import KERNEL_MAX_ROWS, QuantExperts
from ernie45.weights import load_model, save_checkpoint

TINY = dict(model_type="ernie4_5_moe", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
            moe_num_shared_experts=1, moe_layer_start_index=1, tie_word_embeddings=False,
            num_nextn_predict_layers=1, torch_dtype="float32")
SCHEMES_METHODS = [("int8", "rtn"), ("int4", "rtn"), ("int2", "rtn"), ("fp8", "rtn"), ("mixed-2bit", "gptq")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine are ~40x slower with 2 spinning OpenMP threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, **overrides) -> nn.Module:
    cfg = ModelConfig.from_dict({**TINY, **overrides})
    model = init_random(build_model(cfg), seed=seed, std=0.2)  # peaked logits: greedy ties are unlikely
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "moe_statics"):
                bias = torch.randn(1, cfg.moe_num_experts, generator=torch.Generator().manual_seed(seed)) * 0.3
                layer.mlp.moe_statics.e_score_correction_bias.copy_(bias)
    return model


def quantized(scheme: str, method: str = "rtn", seed: int = 0) -> nn.Module:
    calib = torch.randint(0, TINY["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(1))
    return quantize_model(tiny_model(seed), scheme, method, calib_ids=calib, int4_moe_layers=1)


# ---- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)  # leading dims like stacked experts
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)
    assert pack(torch.tensor([[1, 2, 3, 0]]), 2).item() == 1 | 2 << 2 | 3 << 4  # little-end first


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
def test_stored_shapes_dtypes_and_bytes(fmt):
    N, K = 256, 384
    qw = quantize_rtn(torch.randn(N, K), FORMATS[fmt])
    per_weight = {"int8": 1, "int4": 0.5, "int2": 0.25, "fp8": 1}[fmt]
    meta = {"int8": N * 2, "int4": N * 3 * 4, "int2": N * 6 * 4, "fp8": 2 * 3 * 4}[fmt]
    assert qw.nbytes() == N * K * per_weight + meta
    assert qw.qweight.shape[0] == N  # output channels are rows


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_integer_dequantization_error_is_half_a_step(fmt):
    w = torch.randn(64, 256) * torch.logspace(-2, 0, 64)[:, None]  # rows of very different scale
    f = FORMATS[fmt]
    qw = quantize_rtn(w, f)
    g = qw.group_size
    step = (qw.scales.float()[:, None] if f.symmetric else qw.scales.float()).repeat_interleave(
        g if not f.symmetric else 1, -1).expand(64, 256)
    centre = 0 if f.symmetric else qw.zeros.float().repeat_interleave(g, -1).abs()
    # half a step, plus the shift that rounding scale and zero to bf16 can add at the range edges
    bound = 0.5 * step + 2 ** -8 * (centre + f.qmax * step) + 1e-7
    assert ((dequantize(qw) - w).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(200, 300), (256, 384)])  # partial edge blocks / whole blocks
def test_fp8_dequantization_error_is_relative(shape):
    w = torch.randn(shape) * torch.logspace(-3, 0, shape[0])[:, None]
    err = (dequantize(quantize_rtn(w, FORMATS["fp8"])) - w).abs()
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4); values far below their block's maximum fall
    # into the subnormal range, where the step is 2^-9 of the block scale.
    assert (err <= 2 ** -4 * w.abs() + 2 ** -9 * w.abs().max() / 448).all()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
def test_quantizing_a_row_slice_equals_slicing_the_quantized_tensor(fmt):
    w = torch.randn(2, 384, 256)  # two stacked experts
    full = quantize_rtn(w, FORMATS[fmt])
    for start, stop in [(0, 128), (128, 384), (256, 384)]:
        part = quantize_rtn(w[:, start:stop], FORMATS[fmt])
        cut = slice_rows(full, start, stop)
        for name, t in part.tensors().items():
            assert torch.equal(t.view(torch.uint8), cut.tensors()[name].contiguous().view(torch.uint8)), name
    expert = quantize_rtn(w[1], FORMATS[fmt])  # expert parallelism slices dim 0
    assert all(torch.equal(t.view(torch.uint8), getattr(full, n)[1].view(torch.uint8))
               for n, t in expert.tensors().items())


def test_group_size_fallback_is_the_largest_byte_aligned_divisor():
    assert group_size_for(FORMATS["int4"], 4096) == 128
    assert group_size_for(FORMATS["int4"], 96) == 96 and group_size_for(FORMATS["int2"], 96) == 48
    assert group_size_for(FORMATS["int4"], 200) == 100 and group_size_for(FORMATS["int8"], 37) == 37
    with pytest.raises(ValueError, match="multiple of 4"):
        group_size_for(FORMATS["int2"], 37)


# ---- modules: fast paths vs reference ------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("rows", [3, KERNEL_MAX_ROWS["int4"] + 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_paths_match_the_dequantized_reference(fmt, rows, dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    layer = QuantLinear.from_quantized(quantize_rtn(w, FORMATS[fmt]))
    x = torch.randn(2, rows, 256).to(dtype)
    dense = nn.Linear(256, 64, bias=False)
    dense.weight = nn.Parameter(layer.dequantize().to(dtype))
    fast = layer(x)
    layer.path = "reference"
    assert torch.equal(layer(x), dense(x))  # the reference is exactly the dequantized float layer
    assert fast.dtype == dtype and fast.shape == (2, rows, 64)
    rel = (fast.float() - dense(x).float()).norm() / dense(x).float().norm()
    assert rel < 1e-2  # kernels round activations to bf16


def test_kernel_routes_are_taken_where_expected():
    x_small, x_big = torch.randn(4, 256), torch.randn(KERNEL_MAX_ROWS["int8"] + 1, 256)
    routes = {f: QuantLinear.from_quantized(quantize_rtn(torch.randn(64, 256), FORMATS[f])) for f in FORMATS}
    assert routes["int8"].route(x_small) == "int8" and routes["int4"].route(x_small) == "int4"
    assert routes["int2"].route(x_small) == "int4" and routes["int8"].route(x_big) == "fp32"
    assert routes["fp8"].route(x_small) == "fp32"
    odd = QuantLinear.from_quantized(quantize_rtn(torch.randn(24, 96), FORMATS["int4"]))  # N % 16 != 0
    assert odd.route(x_small[:, :96]) == "fp32"


@pytest.mark.parametrize("in_features", [56, 72])  # the mini-300B expert width 56 crashed the aten kernel
def test_int8_in_features_the_aten_kernel_mishandles_take_the_fp32_route(in_features):
    layer = QuantLinear.from_quantized(quantize_rtn(torch.randn(32, in_features) * 0.05, FORMATS["int8"]))
    x = torch.randn(4, in_features)  # several rows: _weight_int8pack_mm segfaulted here on AVX-512 CPUs
    assert layer.route(x) == "fp32"
    layer_ref = copy.deepcopy(layer)
    layer_ref.path = "reference"
    assert torch.allclose(layer(x), layer_ref(x), atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_quant_experts_match_dequantized_experts(fmt):
    model = tiny_model()
    experts = model.model.layers[1].mlp.experts
    E, F_, D = experts.gate_proj.shape
    q = {p: QuantWeight.from_quantized(quantize_rtn(torch.randn(getattr(experts, p).shape) * 0.1, FORMATS[fmt]))
         for p in ("gate_proj", "up_proj", "down_proj")}
    qe = QuantExperts(**q, act=experts.act)
    for p in ("gate_proj", "up_proj", "down_proj"):
        setattr(experts, p, nn.Parameter(q[p].dequantize()))
    x = torch.randn(5, D)
    w = torch.softmax(torch.randn(5, 2), -1)
    idx = torch.tensor([[0, 1], [1, 3], [3, 0], [2, 1], [0, 2]])
    fast = qe(x, w, idx)
    set_path(qe, "reference")
    assert torch.equal(qe(x, w, idx), experts(x, w, idx))
    assert (fast - experts(x, w, idx)).norm() / experts(x, w, idx).norm() < 1e-2


# ---- whole models --------------------------------------------------------------------------------
def test_recipe_record_and_what_stays_float():
    model = quantized("mixed-2bit")
    qcfg = model.config.quantization_config
    mods = qcfg["modules"]
    assert qcfg["scheme"] == "mixed-2bit" and qcfg["int4_moe_layers"] == 1
    assert mods["model.layers.0.self_attn.q_proj"]["format"] == "int8"
    assert mods["model.layers.0.mlp.down_proj"]["format"] == "int8"
    assert mods["model.layers.1.mlp.experts.up_proj"]["format"] == "int4"
    assert mods["model.layers.2.mlp.experts.up_proj"]["format"] == "int2"
    assert mods["model.layers.2.mlp.shared_experts.gate_proj"]["format"] == "int8"
    assert mods["model.mtp_block.0.mlp.up_proj"]["format"] == "int8"
    assert mods["model.layers.2.mlp.experts.down_proj"]["group_size"] == 32  # 32 < 64: explicit fallback
    assert not any(k.endswith(("gate", "embed_tokens", "lm_head", "norm")) for k in mods)
    mlp = model.model.layers[1].mlp
    assert mlp.gate.weight.dtype == torch.float32 and mlp.moe_statics.e_score_correction_bias.dtype == torch.float32
    assert isinstance(model.lm_head, nn.Linear) and isinstance(mlp.experts, QuantExperts)


@pytest.mark.parametrize("scheme,method", SCHEMES_METHODS)
def test_save_load_gives_identical_logits(tmp_path, scheme, method):
    model = quantized(scheme, method)
    ids = torch.randint(0, 97, (2, 12))
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["scheme"] == scheme
    loaded = load_model(tmp_path)
    assert torch.equal(loaded(ids), model(ids))
    h, pos = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0)), torch.arange(3)[None]
    assert torch.equal(loaded.mtp_logits(h, ids[:1, :3], pos), model.mtp_logits(h, ids[:1, :3], pos))


@pytest.mark.parametrize("scheme", ["int4", "mixed-2bit"])
def test_quantized_model_generates_the_dequantized_reference_tokens(scheme):
    model = quantized(scheme)
    reference = dequantize_model(copy.deepcopy(model))
    assert reference.config.quantization_config is None
    prompt, gcfg = [5, 17, 3, 44], GenerationConfig(max_new_tokens=12, stop_token_ids=())
    expected = generate(reference, prompt, gcfg)
    set_path(model, "reference")
    assert generate(model, prompt, gcfg) == expected
    # The auto path (int8/int4 decode kernels) rounds activations to bf16, which may flip a near tie:
    # teacher-force the reference tokens and require each to be in the auto path's top 2 (STYLE habit 9).
    set_path(model, "auto")
    ids = torch.tensor([prompt + expected])
    logits = model(ids)[0, len(prompt) - 1:-1]  # [12, V] predictions of the generated tokens
    top2 = logits.topk(2, dim=-1).indices
    assert all(tok in top2[i].tolist() for i, tok in enumerate(expected))
    assert (logits.argmax(-1) == torch.tensor(expected)).float().mean() >= 0.75


def test_apply_quant_config_names_every_misfit():
    model = quantized("int4")
    qcfg = json.loads(json.dumps(model.config.quantization_config))
    qcfg["modules"]["model.layers.9.self_attn.q_proj"] = {"format": "int4", "group_size": 64, "method": "rtn"}
    qcfg["modules"]["model.layers.0.input_layernorm"] = {"format": "int8", "group_size": 64, "method": "rtn"}
    del qcfg["modules"]["model.layers.1.mlp.experts.up_proj"]
    with pytest.raises(ValueError) as err:
        apply_quant_config(build_model(model.config), qcfg)
    msg = str(err.value)
    assert "layers.9.self_attn.q_proj" in msg and "input_layernorm" in msg and "layers.1.mlp.experts" in msg
    with pytest.raises(ValueError, match="quant_method"):
        apply_quant_config(build_model(model.config), {**qcfg, "quant_method": "gptq"})
