"""GPTQ, layer-by-layer streaming quantization of checkpoints, the CLI, and bytes against the planner."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from ernie45.config import ModelConfig
from ernie45.model import build_model, init_random
from ernie45.quant import quantize_model
from ernie45.quant.formats import FORMATS, dequantize, quantize_rtn
from ernie45.quant.gptq import collect_hessians, gptq_quantize, output_error
from ernie45.quant.stream import LayerInputs, calibration_windows, quantize_checkpoint
from ernie45.safetensors_mmap import SafetensorsFile
from ernie45.weights import load_model, save_checkpoint

from test_quant import TINY, one_thread, tiny_model  # noqa: F401  (one_thread: autouse fixture)


def correlated_inputs(rows: int, dim: int, sample_seed: int) -> torch.Tensor:
    """Activations with correlated features and a few large channels, as in transformer layers; one fixed
    feature mixing, samples drawn with `sample_seed`."""
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)) / dim ** 0.5 + torch.eye(dim)
    scale = torch.ones(dim)
    scale[:4] = 8.0
    return (torch.randn(rows, dim, generator=torch.Generator().manual_seed(sample_seed)) @ mix) * scale


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_gptq_output_error_is_below_round_to_nearest(fmt):
    """On a fixed layer, GPTQ's output error beats RTN's on calibration *and* on held-out inputs."""
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    x_cal, x_test = correlated_inputs(1024, 256, sample_seed=1), correlated_inputs(1024, 256, sample_seed=2)
    h_cal, h_test = x_cal.double().T @ x_cal.double(), x_test.double().T @ x_test.double()
    rtn = dequantize(quantize_rtn(w, FORMATS[fmt]))
    gptq = dequantize(gptq_quantize(w, h_cal, FORMATS[fmt], quantize_rtn(w, FORMATS[fmt]).group_size))
    for h in (h_cal, h_test):
        assert output_error(w, gptq, h) < 0.8 * output_error(w, rtn, h)


def test_expert_hessians_see_exactly_the_routed_tokens():
    model = tiny_model()
    layer = model.model.layers[1]
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    calib = LayerInputs(model.config, ids, model.model.embed_tokens.weight)
    routed = []
    hook = layer.mlp.experts.register_forward_pre_hook(lambda _m, args: routed.append(args[2]))
    hess = calib.hessians(layer, ["mlp.experts", "self_attn.q_proj"])
    hook.remove()
    counts = torch.bincount(torch.cat(routed).flatten(), minlength=4)
    assert [h.rows for h in hess["mlp.experts"].gate_up] == counts.tolist()
    assert hess["self_attn.q_proj"].rows == 30


def test_collect_hessians_rejects_other_modules():
    with pytest.raises(TypeError, match="RMSNorm"):
        collect_hessians(tiny_model().model.layers[0], ["input_layernorm"], lambda: None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    model = tiny_model()
    save_checkpoint(model, path)
    return path, model


@pytest.mark.parametrize("scheme,method", [("int4", "rtn"), ("mixed-2bit", "gptq")])
def test_streaming_equals_in_memory_quantization(tmp_path, checkpoint, scheme, method):
    src, model = checkpoint
    calib = calibration_windows(np.arange(500) % 97, 4, 24)
    summary = quantize_checkpoint(src, tmp_path, scheme, method, calib, int4_moe_layers=1, progress=False)
    ref = quantize_model(load_model(src), scheme, method, calib_ids=calib, int4_moe_layers=1)
    streamed = load_model(tmp_path)
    assert streamed.config.quantization_config == json.loads(json.dumps(ref.config.quantization_config))
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(streamed(ids), ref(ids))
    assert any("group 32" in line for line in summary["group_fallbacks"])  # expert width 32 < 64
    assert summary["tensor_bytes"] == sum(p.numel() * p.element_size() for p in streamed.parameters())


def test_streaming_refuses_mismatched_and_already_quantized_checkpoints(tmp_path, checkpoint):
    src, _ = checkpoint
    quantize_checkpoint(src, tmp_path / "q", "int8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", "int8", progress=False)
    cfg = json.loads((src / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(Exception, match="misshaped"):
        quantize_checkpoint(bad, tmp_path / "out", "int8", progress=False)


def test_cli_quantize_with_calibration_tokens(tmp_path, checkpoint, capsys):
    from ernie45.quant.cli import register_cli

    src, _ = checkpoint
    np.save(tmp_path / "train.tokens.npy", (np.arange(2000) % 97).astype(np.int32))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize", "--model", str(src), "--scheme", "int2", "--method", "gptq", "--calib",
                              str(tmp_path), "--calib-samples", "4", "--calib-seq-len", "32", "--out",
                              str(tmp_path / "out"), "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "group size fallback" in out and "wrote int2/gptq" in out
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["calibration"] == {"sequences": 4, "seq_len": 32}
    assert qcfg["modules"]["model.layers.0.self_attn.q_proj"]["method"] == "gptq"
    assert qcfg["modules"]["model.mtp_block.0.self_attn.q_proj"]["method"] == "rtn"  # no MTP calibration
    args = parser.parse_args(["quantize", "--model", str(src), "--scheme", "int4", "--method", "gptq",
                              "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="needs --calib"):
        args.func(args)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "mixed-2bit", "fp8"])
def test_bytes_on_disk_agree_with_the_planner(tmp_path, scheme):
    from ernie45 import plan

    cfg = ModelConfig.from_dict({**TINY, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
                                 "num_attention_heads": 4, "torch_dtype": "bfloat16"})
    save_checkpoint(init_random(build_model(cfg)), tmp_path / "src", dtype=torch.bfloat16)
    summary = quantize_checkpoint(tmp_path / "src", tmp_path / "q", scheme, progress=False, int4_moe_layers=1)
    planned = plan.weight_bytes(cfg, scheme, mtp=True, int4_moe_layers=1)
    with SafetensorsFile(tmp_path / "q" / "model.safetensors") as f:
        on_disk = sum(t.nbytes for t in f.tensors.values())
    assert on_disk == summary["tensor_bytes"] == sum(planned.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reference_path_matches_cpu():
    from ernie45.quant import QuantLinear

    for fmt in FORMATS:
        layer = QuantLinear.from_quantized(quantize_rtn(torch.randn(128, 256) * 0.05, FORMATS[fmt]))
        x = torch.randn(5, 256, dtype=torch.bfloat16)
        layer.path = "reference"
        cpu = layer(x)
        gpu = layer.cuda()(x.cuda()).cpu()
        assert (gpu.float() - cpu.float()).norm() / cpu.float().norm() < 1e-2
