"""The planner's arithmetic, checked against numbers derivable by hand from the spec's shapes.

Expected byte counts below are written out from the formats (payload + scales + zeros per block), not
computed with the planner's own helpers, so a wrong format constant or a missed tensor shows up.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from contextlib import redirect_stdout

import pytest

from ernie45.config import preset
from ernie45.plan import (active_weight_bytes, activation_bytes, kv_cache_bytes, param_counts, tensors,
                          weight_bytes)
from ernie45.plan_cli import main as cli_main
from ernie45.plan_cli import register_cli
from ernie45.plan_gpus import DEFAULT_GPU_MEMORY_UTILIZATION, catalogue, find_gpu, memory_label
from ernie45.plan_parallel import (Layout, Placement, Workload, best_layout, candidate_layouts, decode_bound,
                                   max_context, min_gpus, peak_bytes, stage_memory)
from ernie45.plan_report import PlanRequest, build_report

B300, B21, B03 = "ERNIE-4.5-300B-A47B", "ERNIE-4.5-21B-A3B", "ERNIE-4.5-0.3B"
GiB = 1 << 30


# ---- parameter counts (spec section 4) -----------------------------------------------------------
@pytest.mark.parametrize("name, total, active, mtp", [
    (B300, 299_484_163_264, 47_079_337_152, 989_888_512),
    (B21, 21_825_437_888, 3_352_150_208, 123_217_920),
    (B03, 360_748_032, 360_748_032, 0),
])
def test_param_counts_match_spec(name, total, active, mtp):
    assert param_counts(preset(name)) == {"total": total, "active": active, "mtp": mtp}


@pytest.mark.parametrize("name, layers", [(B300, 5), (B21, 3), (B03, 2)])
def test_inventory_matches_the_model_parameters(name, layers):
    """Every tensor the planner counts is a parameter of the (meta-device) model, and vice versa."""
    from ernie45.model import build_model
    cfg = preset(name).replace(num_hidden_layers=layers)
    if cfg.is_moe:
        cfg = cfg.replace(moe_layer_end_index=layers - 1)
    model_shapes = Counter()
    for _, p in build_model(cfg).named_parameters():
        shape = tuple(p.shape) if p.dim() > 1 else (1, p.shape[0])
        model_shapes[shape[-2:]] += shape[0] if p.dim() == 3 else 1  # stacked experts [E, out, in]
    planned = Counter()
    for t in tensors(cfg, mtp=True):
        planned[(t.rows, t.cols)] += t.count
    assert planned == model_shapes


# ---- weight bytes per scheme, by hand ------------------------------------------------------------
def _int8(r, c): return r * c + r * 2                                  # one bf16 scale per output row
def _int4(r, c): return r * c // 2 + r * (c // 128) * 4                # bf16 scale + bf16 zero per 128
def _int2(r, c): return r * c // 4 + r * (c // 64) * 4                 # bf16 scale + bf16 zero per 64
def _fp8(r, c): return r * c + -(-r // 128) * -(-c // 128) * 4         # fp32 scale per 128x128 block
def _bf16(r, c): return r * c * 2


def _linears_300b(fmt, expert_fmt=None):
    """Attention, dense FFN and experts of 300B: H 8192, q 8192, kv 1024, I 28672, Im 3584, 3+51 layers."""
    expert_fmt = expert_fmt or (lambda i: fmt)
    attn = 54 * (2 * fmt(8192, 8192) + 2 * fmt(1024, 8192))
    dense = 3 * (2 * fmt(28672, 8192) + fmt(8192, 28672))
    experts = sum(64 * (2 * expert_fmt(i)(3584, 8192) + expert_fmt(i)(8192, 3584)) for i in range(51))
    return attn, dense, experts


FIXED_300B = {"embed": 103424 * 8192 * 2, "lm_head": 103424 * 8192 * 2, "norms": (54 * 2 + 1) * 8192 * 2,
              "router": 51 * (64 * 8192 + 64) * 4}


@pytest.mark.parametrize("scheme, fmt", [("bf16", _bf16), ("fp16", _bf16), ("int8", _int8), ("int4", _int4),
                                         ("int2", _int2), ("fp8", _fp8)])
def test_300b_weight_bytes_by_hand(scheme, fmt):
    attn, dense, experts = _linears_300b(fmt)
    expected = dict(FIXED_300B, attention=attn, dense_mlp=dense, experts=experts)
    assert weight_bytes(preset(B300), scheme) == expected


def test_300b_weight_totals_spelled_out():
    cfg = preset(B300)
    # bf16: 2 bytes per parameter, except router + bias (fp32): 2 x total + 2 x router params
    assert sum(weight_bytes(cfg, "bf16").values()) == 2 * 299_484_163_264 + 2 * 51 * (64 * 8192 + 64) \
        == 599_021_810_432
    assert sum(weight_bytes(cfg, "int4").values()) == 161_683_829_504
    assert weight_bytes(cfg, "int4")["experts"] == 51 * 64 * 46_792_704  # 3 x (3584*8192/2 + 3584*64*4)


def test_mixed_2bit_recipe_300b():
    expert_fmt = lambda i: _int4 if i < 4 else _int2  # noqa: E731 (first 4 MoE layers = layers 3-6)
    attn, dense, _ = _linears_300b(_int8)
    _, _, experts = _linears_300b(_int8, expert_fmt)
    expected = dict(FIXED_300B, attention=attn, dense_mlp=dense, experts=experts)
    assert weight_bytes(preset(B300), "mixed-2bit") == expected
    assert sum(expected.values()) == 108_542_284_544
    fewer = weight_bytes(preset(B300), "mixed-2bit", int4_moe_layers=0)["experts"]
    assert fewer == 51 * 64 * (2 * _int2(3584, 8192) + _int2(8192, 3584))


def test_21b_int4_and_mtp_by_hand():
    cfg = preset(B21)  # H 2560, q 2560, kv 512, I 12288, Im 1536, shared 3072, 1 dense + 27 MoE, tied
    w = weight_bytes(cfg, "int4", mtp=True)
    assert w["embed"] == 103424 * 2560 * 2 and "lm_head" not in w
    assert w["attention"] == 28 * (2 * _int4(2560, 2560) + 2 * _int4(512, 2560))
    assert w["dense_mlp"] == 2 * _int4(12288, 2560) + _int4(2560, 12288)
    assert w["experts"] == 27 * 64 * (2 * _int4(1536, 2560) + _int4(2560, 1536))
    assert w["shared_experts"] == 27 * (2 * _int4(3072, 2560) + _int4(2560, 3072))
    assert w["router"] == 27 * (64 * 2560 + 64) * 4
    assert w["norms"] == (28 * 2 + 1) * 2560 * 2
    mtp_block = 2 * _int4(2560, 2560) + 2 * _int4(512, 2560) + 2 * _int4(12288, 2560) + _int4(2560, 12288)
    assert w["mtp"] == 4 * 2560 * 2 + _int4(2560, 5120) + mtp_block
    assert "mtp" not in weight_bytes(cfg, "int4")


def test_03b_fp8_by_hand():
    cfg = preset(B03)  # H 1024, q 2048, kv 256, I 3072, 18 layers, tied
    w = weight_bytes(cfg, "fp8")
    assert w["attention"] == 18 * (_fp8(2048, 1024) + 2 * _fp8(256, 1024) + _fp8(1024, 2048))
    assert w["dense_mlp"] == 18 * (2 * _fp8(3072, 1024) + _fp8(1024, 3072))
    assert sum(weight_bytes(cfg, "bf16").values()) == 2 * 360_748_032


def test_active_bytes_bf16_equal_twice_active_params_plus_router():
    cfg = preset(B300)
    assert active_weight_bytes(cfg, "bf16") == 2 * 47_079_337_152 + 2 * 51 * (64 * 8192 + 64)


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown weight scheme"):
        weight_bytes(preset(B03), "int3")


# ---- KV cache and activations --------------------------------------------------------------------
def test_kv_cache_formula():
    cfg = preset(B300)
    assert kv_cache_bytes(cfg, 131072) == 2 * 54 * 8 * 128 * 2 * 131072 == 28_991_029_248
    assert kv_cache_bytes(cfg, 131072, batch=4, kv_dtype="fp8") == 2 * 54 * 8 * 128 * 1 * 131072 * 4
    assert kv_cache_bytes(cfg, 1000, kv_dtype="int8", mtp=True) == 2 * 55 * 8 * 128 * 1 * 1000
    assert kv_cache_bytes(preset(B03), 4096) == 2 * 18 * 2 * 128 * 2 * 4096


def test_activations_dense_by_hand():
    cfg = preset(B03)  # chunk T: 4 hidden buffers + max(attention, ffn) + fp32 logits
    t = 2048
    hidden = 4 * t * 1024 * 2
    attention = t * (2 * 2048 + 2 * 256) * 2
    ffn = t * 3 * 3072 * 2
    assert activation_bytes(cfg, t, logit_rows=3) == hidden + max(attention, ffn) + 3 * 103424 * 4


# ---- parallel layouts ----------------------------------------------------------------------------
def _stages(name, scheme, layout, **work):
    place = Placement(preset(name), Workload(scheme=scheme, **work))
    return place, stage_memory(place, layout)


def test_tp_shards_and_kv_heads_replicate_past_tp8():
    tokens = 10_000
    _, (s8,) = _stages(B300, "bf16", Layout(tp=8), context=tokens)
    _, (s16,) = _stages(B300, "bf16", Layout(tp=16), context=tokens)
    assert s8.kv_cache == 2 * 54 * 1 * 128 * 2 * tokens  # 8 KV heads / tp 8
    assert s16.kv_cache == s8.kv_cache  # one KV head each: replicated, not split further
    assert s16.weights["experts"] * 16 == weight_bytes(preset(B300), "bf16")["experts"]
    assert s8.weights["attention"] == 54 * (2 * _bf16(1024, 8192) + 2 * _bf16(128, 8192))


def test_expert_parallel_keeps_experts_whole():
    _, (st,) = _stages(B300, "int4", Layout(tp=1, ep=8))
    assert st.weights["experts"] == 51 * 8 * (2 * _int4(3584, 8192) + _int4(8192, 3584))
    assert st.gpus == 8
    _, (st,) = _stages(B300, "int4", Layout(tp=2, ep=4))  # 16 experts per EP rank, each split 2 ways
    assert st.weights["experts"] == 51 * 16 * (2 * _int4(1792, 8192) + _int4(8192, 1792))
    assert st.gpus == 8


def test_group_divisibility_of_expert_widths():
    cfg = preset(B300)
    int4 = Placement(cfg, Workload(scheme="int4"))
    errors = int4.errors(Layout(tp=8))
    assert len(errors) == 1 and "down_proj: 3584 / 8 = 448" in errors[0] and "int4 groups of 128" in errors[0]
    assert int4.errors(Layout(tp=1, ep=8)) == [] and int4.errors(Layout(tp=4)) == []
    assert int4.errors(Layout(tp=8, ep=8)) == errors  # experts are still split tp ways inside each EP rank
    fp8 = Placement(cfg, Workload(scheme="fp8")).errors(Layout(tp=8))
    assert any("gate_proj: 3584 / 8 = 448" in e and "fp8 blocks of 128" in e for e in fp8)
    assert Placement(cfg, Workload(scheme="int8")).errors(Layout(tp=8)) == []
    assert Placement(cfg, Workload(scheme="int2")).errors(Layout(tp=8)) == []  # 448 = 7 x 64
    heads = Placement(preset(B21), Workload(scheme="bf16")).errors(Layout(tp=8))
    assert any("20 attention heads" in e for e in heads)


def test_pipeline_stages_partition_the_layers():
    cfg = preset(B300)
    whole = weight_bytes(cfg, "int8")
    _, stages = _stages(B300, "int8", Layout(pp=4))
    assert [s.layers for s in stages] == [(0, 13), (14, 26), (27, 40), (41, 53)]
    assert sum(s.weights_total for s in stages) == sum(whole.values())
    assert "embed" in stages[0].weights and "lm_head" in stages[-1].weights
    # a tied table is needed on the first and the last stage
    _, tied = _stages(B21, "bf16", Layout(pp=2))
    assert tied[1].weights["lm_head"] == tied[0].weights["embed"] == 103424 * 2560 * 2


def test_offload_moves_routed_experts_to_host():
    place, (st,) = _stages(B21, "int4", Layout(), offload_experts=True)
    assert "experts" not in st.weights
    assert st.host_weights == weight_bytes(preset(B21), "int4")["experts"]


def test_min_gpus_is_minimal():
    cfg = preset(B300)
    place = Placement(cfg, Workload(scheme="int4", context=32768))
    usable = find_gpu("H100").usable_bytes
    layout, stages = min_gpus(place, usable)
    assert peak_bytes(stages) <= usable
    for n in range(1, layout.num_gpus):
        found = best_layout(place, n)
        assert found is None or peak_bytes(found[1]) > usable
    assert all(lay.num_gpus == 6 for lay in candidate_layouts(cfg, 6))


def test_mixed_2bit_300b_fits_one_h200():
    place = Placement(preset(B300), Workload(scheme="mixed-2bit", context=32768))
    layout, _ = min_gpus(place, find_gpu("h200").budget_bytes())
    assert layout == Layout()


def test_gpu_budget_is_usable_memory_times_utilization():
    h100, mac = find_gpu("H100"), find_gpu("M2 Ultra")
    assert DEFAULT_GPU_MEMORY_UTILIZATION == 0.9  # vLLM's default gpu_memory_utilization
    assert h100.budget_bytes() == int(81559 * 2**20 * 0.9) and h100.budget_bytes(1.0) == h100.memory_bytes
    assert mac.budget_bytes(1.0) == 192 * GiB * 3 // 4  # macOS's GPU wired-memory limit comes first
    assert mac.budget_bytes() == int(192 * GiB * 3 // 4 * 0.9)
    for bad in (0, 1.01, -0.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            h100.budget_bytes(bad)


def test_report_plans_against_the_budget():
    """The verdict, fewest GPUs and capacity answers all move with gpu_memory_utilization."""
    whole = build_report(PlanRequest(model=B300, quant="int4", context=1024, gpu="H100", gpu_memory_utilization=1.0,
                                     recommendations=False))
    served = build_report(PlanRequest(model=B300, quant="int4", context=1024, gpu="H100", recommendations=False))
    assert served["request"]["gpu_memory_utilization"] == 0.9
    assert served["gpu"]["budget_bytes"] == find_gpu("H100").budget_bytes(0.9)
    assert whole["gpu"]["budget_bytes"] == find_gpu("H100").memory_bytes
    assert whole["min_gpus"]["count"] == 2 and served["min_gpus"]["count"] == 3
    two = dict(model=B300, quant="int4", context=1024, gpu="H100", num_gpus=2, recommendations=False)
    assert build_report(PlanRequest(**two, gpu_memory_utilization=1.0))["fit"] == "yes"
    assert build_report(PlanRequest(**two))["fit"] == "no"
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        build_report(PlanRequest(model=B03, context=1, gpu_memory_utilization=1.5))


def test_max_context_is_the_boundary():
    place = Placement(preset(B21), Workload(scheme="bf16", context=1, batch=8))
    usable = find_gpu("A100-80GB").usable_bytes
    n = max_context(place, Layout(), usable)
    assert 0 < n < 131072
    fits = lambda tokens: peak_bytes(stage_memory(place, Layout(), Workload(  # noqa: E731
        scheme="bf16", context=tokens, batch=8))) <= usable
    assert fits(n) and not fits(n + 1)


def test_decode_bound_by_hand():
    """0.3B bf16, one GPU, batch 1: every weight (the tied table read as the head) plus the KV cache."""
    place = Placement(preset(B03), Workload(scheme="bf16", context=4096))
    bound = decode_bound(place, Layout(), bandwidth_gbs=1000)
    step = 2 * 360_748_032 + 2 * 18 * 2 * 128 * 2 * 4096
    assert bound.bytes_per_step == step
    assert bound.per_sequence == pytest.approx(1000e9 / step)


# ---- GPU catalogue -------------------------------------------------------------------------------
@pytest.mark.parametrize("written, name", [
    ("H100", "H100-SXM"), ("h100 sxm", "H100-SXM"), ("H100-PCIe", "H100-PCIe"), ("h100nvl", "H100-NVL"),
    ("H200", "H200"), ("h20", "H20"), ("B200", "B200"), ("A100-80GB", "A100-80GB"), ("a100 40gb", "A100-40GB"),
    ("L40S", "L40S"), ("A6000", "RTX-A6000"), ("RTX3090", "RTX-3090"), ("rtx 4090", "RTX-4090"),
    ("NVIDIA GeForce RTX 5090", "RTX-5090"), ("mi300x", "MI300X"), ("M2 Ultra", "M2-Ultra-192GB"),
    ("m4-max", "M4-Max-128GB"),
])
def test_gpu_names_as_users_write_them(written, name):
    assert find_gpu(written).name == name


def test_ambiguous_and_unknown_gpu_names():
    with pytest.raises(ValueError, match="ambiguous.*A100-80GB.*A100-40GB"):
        find_gpu("A100")
    with pytest.raises(ValueError, match="not in the catalogue"):
        find_gpu("Z9000")


def test_catalogue_entries_are_complete_and_consistent():
    import re
    for g in catalogue():
        assert g.bandwidth_gbs > 0 and g.source and "GB" in g.vendor_memory
        mib = re.search(r"total (\d+) MiB", g.memory_basis)
        if mib:
            assert g.memory_bytes == int(mib.group(1)) << 20
    assert memory_label(find_gpu("H100").memory_bytes) == "79.65 GiB (85.52 GB)"
    assert find_gpu("A100-80GB").memory_bytes == 80 * GiB


# ---- report and CLI ------------------------------------------------------------------------------
def _cli(*argv):
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(list(argv))
    return code, out.getvalue()


def test_cli_json_matches_the_python_api():
    args = ["--model", B300, "--quant", "int4", "--context", "131072", "--gpu", "H100", "--json"]
    code, out = _cli(*args)
    report = json.loads(out)
    assert code == 0
    assert report == json.loads(json.dumps(build_report(PlanRequest(model=B300, quant="int4", context=131072,
                                                                    gpu="H100"))))
    assert report["whole_model"]["weights_total"] == 161_683_829_504
    assert report["whole_model"]["kv_cache"] == 28_991_029_248
    assert report["fit"] == "yes" and report["min_gpus"]["count"] == report["layout"]["num_gpus"]
    assert {r["gpu"] for r in report["recommendations"]} == {g.name for g in catalogue()}
    for key in ("per_gpu", "max_context", "max_sequences", "decode_bound"):
        assert report[key]


def test_cli_explicit_layout_and_exit_codes():
    code, out = _cli("--model", B300, "--quant", "int4", "--context", "8192", "--gpu", "h100", "--num-gpus", "8",
                     "--tp", "8", "--json", "--no-recommend")
    report = json.loads(out)
    assert code == 1 and report["fit"] == "invalid" and "448" in report["layout_errors"][0]
    code, out = _cli("--model", B300, "--quant", "int4", "--context", "8192", "--gpu", "h100", "--tp", "2",
                     "--ep", "4", "--json", "--no-recommend")
    assert code == 0 and json.loads(out)["layout"] == {"num_gpus": 8, "tp": 2, "ep": 4, "pp": 1}
    code, _ = _cli("--model", B300, "--context", "8192", "--gpu", "RTX4090", "--num-gpus", "1", "--no-recommend")
    assert code == 1
    code, _ = _cli("--model", B300, "--context", "8192", "--gpu", "A100")
    assert code == 2


def test_cli_table_is_readable():
    code, out = _cli("--model", B21, "--quant", "int4", "--context", "32768", "--gpu", "RTX4090",
                     "--offload-experts", "--no-recommend")
    assert code == 0
    assert "experts in host RAM" in out and "10,829,168,640 B" in out and "fits: yes" in out


def test_register_cli_adds_the_plan_subcommand():
    parser = argparse.ArgumentParser(prog="ernie45")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", B03, "--context", "4096", "--json", "--no-recommend"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    assert json.loads(out.getvalue())["whole_model"]["weights_total"] == 2 * 360_748_032


def test_report_warns_about_inputs_that_change_nothing():
    report = build_report(PlanRequest(model=B03, context=200_000, mtp=True, recommendations=False))
    assert any("exceeds the model's max_position_embeddings 131,072" in w for w in report["warnings"])
    assert any("no MTP block" in w for w in report["warnings"])
    assert report["whole_model"]["kv_cache"] == 2 * 18 * 2 * 128 * 2 * 200_000


def test_known_300b_anchors():
    """Issue 4's sanity anchors for ERNIE-4.5-300B-A47B, at the default GPU budget (0.9 of the card)."""
    cfg = preset(B300)
    assert kv_cache_bytes(cfg, 1) == 221_184  # bf16 KV per token
    h200, h100 = find_gpu("H200"), find_gpu("H100")
    mixed = Placement(cfg, Workload(scheme="mixed-2bit", context=1024))
    assert min_gpus(mixed, h200.budget_bytes())[0].num_gpus == 1  # 2-bit on one 141 GB card
    bf16 = Placement(cfg, Workload(scheme="bf16", context=1))
    layout, stages = best_layout(bf16, 8)
    # Eight 80 GB cards: even the whole card leaves under 10 GiB per GPU for the KV cache, and a 0.9
    # budget leaves none (only the low overhead estimate fits: verdict "tight").
    assert 0 < h100.budget_bytes(1.0) - peak_bytes(stages) < 10 * GiB
    assert peak_bytes(stages, high=False) <= h100.budget_bytes() < peak_bytes(stages)


def test_int4_300b_needs_more_than_two_h100():
    """At 1k context two H100s hold int4 300B only by filling 78.7 of 79.65 GiB (tp 2, high overhead):
    more than any serving engine lets itself use. Any utilization up to 0.98 asks for a third card."""
    int4 = Placement(preset(B300), Workload(scheme="int4", context=1024))
    h100 = find_gpu("H100")
    assert min_gpus(int4, h100.budget_bytes())[0].num_gpus == 3
    assert min_gpus(int4, h100.budget_bytes(0.98))[0].num_gpus > 2
    assert min_gpus(int4, h100.budget_bytes(1.0))[0].num_gpus == 2
