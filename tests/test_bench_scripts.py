"""bench/speed.py end to end in its --quick smoke mode: it runs and writes every result key.

Timings are never asserted (bench/ owns numbers; tests own correctness). The smoke run uses the tiny
mini-300B-A47B random checkpoint, ernie45 fp32 + int8 through the real `ernie45 bench` CLI, and
transformers fp32, each in its own process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_KEYS = {"decode_tok_s", "prefill_tok_s", "throughput_tok_s", "peak_rss_bytes", "greedy_tokens"}


def test_speed_quick_writes_every_result(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), "--quick", "--threads", "1",
           "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    res = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert {"command", "machine", "params", "bandwidth", "runs", "greedy_agreement", "ratios"} <= set(res)
    assert res["bandwidth"]["read_gb_s"] > 0
    assert set(res["runs"]) == {"ernie45 fp32", "ernie45 int8", "transformers fp32"}
    for label, run in res["runs"].items():
        assert RUN_KEYS <= set(run), (label, sorted(run))
        assert set(run["throughput_tok_s"]) == {"8", "32"}
        assert len(run["greedy_tokens"]) == res["workload"]["new_tokens"]
        assert run["roofline_tok_s"] > 0
    assert {"ernie45 fp32", "ernie45 int8"} <= set(res["greedy_agreement"])
    assert "transformers fp32" in [r["peer"] for r in res["ratios"]]
    assert (tmp_path / "out" / "speed.md").read_text().startswith("# Decode speed")
    assert (tmp_path / "out" / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_throughput_writes_every_format(tmp_path):
    from ernie45 import kernels

    if not kernels.available() and not os.environ.get("CI"):
        pytest.skip(f"decode kernels unavailable: {kernels.unavailable_reason()}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "kernel_throughput.py"), "--threads", "1", "--stream-mb", "8",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "kernel_throughput.json").read_text())
    assert set(res["formats"]) == {"bf16", "int8", "int4 g128", "int2 g64"}
    for row in res["formats"].values():
        assert row["stream_gb_s"] > 0 and row["compute_g_weights_s"]["1"] > 0
    assert "| int4 g128 |" in (tmp_path / "kernel_throughput.md").read_text()


def test_gpu_speed_smoke_runs_every_part_on_cpu(tmp_path):
    """bench/gpu_speed.py's code paths (minus the graph capture) on a tiny model, so a GPU lease is never
    spent on a Python error: every part must finish without recording an error."""
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--device", "cpu", "--quick",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu_speed.json").read_text())
    for part in ("hbm", "medium", "layer300b"):
        assert "error" not in res[part], res[part].get("error")
    m = res["medium"]
    assert {"eager_decode_tok_s", "graph_decode_tok_s", "prefill_tok_s", "greedy_prefix_agreement"} <= set(m)
    assert len(m["greedy_tokens"]) == m["new_tokens"] and "error" not in m["transformers"]
    assert m["int4"]["graph_decode_tok_s"] > 0 and m["int4"]["greedy_prefix_agreement"] >= 0
    assert m["transformers"]["device"] == "cpu" and m["transformers"]["decode_tok_s"] > 0
    assert res["layer300b"]["bytes_per_step"] > 0 and res["layer300b"]["extrapolated"]["tok_s"] > 0
    assert (tmp_path / "out" / "gpu_speed.md").read_text().startswith("# ernie45 on a CUDA GPU")


def _kernels_or_skip():
    from ernie45 import kernels

    if not kernels.available() and not os.environ.get("CI"):
        pytest.skip(f"decode kernels unavailable: {kernels.unavailable_reason()}")


def _screened_head_model(path: Path) -> None:
    """A small bf16 checkpoint whose every weight takes the kernels and whose head is big enough for the
    int8 screen (32768 x 128 = GREEDY_HEAD_MIN_ELEMENTS)."""
    import torch

    from ernie45.config import PRESETS, ModelConfig
    from ernie45.model import build_model, init_random
    from ernie45.weights import save_checkpoint

    cfg = ModelConfig.from_dict(dict(PRESETS["ERNIE-4.5-21B-A3B"], vocab_size=32768, hidden_size=128,
                                     intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=32, moe_num_experts=8, moe_k=2,
                                     moe_intermediate_size=64, moe_layer_start_index=1, moe_layer_end_index=2,
                                     num_nextn_predict_layers=0, max_position_embeddings=512))
    save_checkpoint(init_random(build_model(cfg, torch.bfloat16), std=0.08), path)


def test_serve_ab_times_the_engine_with_and_without_its_fast_paths(tmp_path):
    _kernels_or_skip()
    _screened_head_model(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "serve_ab.py"), "--model", str(tmp_path / "model"), "--configs",
           "bf16,int4", "--concurrency", "3", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "serve_ab.json").read_text())
    assert [(c["part"], c["config"]) for c in res["cases"]] == [("head", "bf16"), ("attention", "bf16"),
                                                                ("head", "int4"), ("attention", "int4")]
    for case in res["cases"]:
        assert case["ratio_median"] > 0 and min(case["tok_s_median"].values()) > 0
    assert "| paged decode attention kernel | int4 | 3 |" in (tmp_path / "serve_ab.md").read_text()


def test_decode_profile_splits_a_token_into_every_part(tmp_path):
    """bench/decode_profile.py on the small model of `_screened_head_model`."""
    _kernels_or_skip()
    _screened_head_model(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "decode_profile.py"), "--model", str(tmp_path / "model"),
           "--quant", "int4", "--tokens", "4", "--rounds", "1", "--threads", "1", "--bw-gbytes", "0.05", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "decode_profile_int4.json").read_text())
    parts = {r["part"]: r for r in res["parts"]}
    from ernie45.kernels import DECODE_PHASES

    assert set(DECODE_PHASES) | {"final_norm", "head_screen", "head_candidates", "head_exact"} < set(parts)
    for name in ("norm_qkv", "experts_gate_up", "experts_down", "shared_down", "dense_gate_up", "head_screen"):
        assert parts[name]["ms"] > 0 and parts[name]["bytes"] > 0 and parts[name]["gb_s"] > 0, name
    assert parts["head_screen"]["bytes"] >= 32768 * 128  # the int8 codes at least
    assert res["decode_tok_s"] > 0 and res["read_gb_s"] > 0 and res["fused_decode_tok_s"] > 0
    assert "| experts_down |" in (tmp_path / "decode_profile_int4.md").read_text()


def test_kernel_ab_times_two_kernel_versions(tmp_path):
    """bench/kernel_ab.py with the committed kernels against the working tree's (bit-identical unless a
    change is in flight), on tiny sweeps."""
    _kernels_or_skip()
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                                     capture_output=True).returncode:
        pytest.skip("not a git checkout (kernel_ab.py reads the base sources with git)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "kernel_ab.py"), "--rounds", "2", "--sweep-mb", "1", "--threads", "1",
           "--rows", "1,3", "--float", "--allow-different", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "kernel_ab.json").read_text())
    assert len(res["cases"]) == 12  # gemv int4: two shapes x two row counts; int8 at 3 rows; moe_token(s); bf16
    assert "gemv bf16 2560 x 1024, 3 rows" in res["cases"]  # and fp32 at both row counts, bf16 moe_tokens (--float)
    assert "moe_tokens bf16, 3 tokens x top-6 of 64, 7 layers" in res["cases"]
    for case in res["cases"].values():
        assert case["speed_ratio_median"] > 0 and case["gb_s"]["base"]["median"] > 0


def test_bf16_rows_compares_kernels_with_torch(tmp_path):
    """bench/bf16_rows.py at two rows: both timings and their ratio for every shape."""
    _kernels_or_skip()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bf16_rows.py"), "--rows", "2", "--threads", "1",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bf16_rows.py"), "--rows", "2", "--threads", "1",
                           "--quant", "int4", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stem in ("bf16_rows", "bf16_rows_int4"):
        res = json.loads((tmp_path / f"{stem}.json").read_text())
        assert len(res["results"]) == 4
        for by_rows in res["results"].values():
            r = by_rows["2"]
            assert r["kernel_ms"] > 0 and r["torch_ms"] > 0 and r["torch_over_kernel_time"] > 0
