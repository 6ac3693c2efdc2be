"""The `ernie45` console script as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from ernie45 import GenerationConfig, generate, load_model


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "ernie45", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info_json_preset():
    out = json.loads(run("info", "ERNIE-4.5-300B-A47B", "--json").stdout)
    assert out["params_total"] == 299_484_163_264 and out["params_active"] == 47_079_337_152
    assert out["params_mtp"] == 989_888_512
    assert out["config"]["moe_layer_end_index"] == 53 and out["config"]["moe_layers"][0] == 3


def test_info_on_checkpoint_dir(hf_checkpoint):
    path, ref = hf_checkpoint("moe_shared_tied")
    out = json.loads(run("info", str(path), "--json").stdout)
    assert out["params_total"] == sum(p.numel() for p in ref.parameters())
    assert "params_total" in run("info", str(path)).stdout


def test_generate_json_equals_python_api(hf_checkpoint):
    path, _ = hf_checkpoint("moe_noshared_untied_bias")
    out = json.loads(run("generate", "--model", str(path), "--prompt-ids", "1,5,9", "--max-new-tokens", "12",
                         "--temperature", "0", "--ignore-eos", "--json").stdout)
    model = load_model(path, dtype=torch.float32)
    assert out == {"token_ids": generate(model, [1, 5, 9], GenerationConfig(max_new_tokens=12, stop_token_ids=()))}


def test_random_checkpoint_then_generate(tmp_path):
    run("random-checkpoint", str(tmp_path / "mini"))
    out = json.loads(run("generate", "--model", str(tmp_path / "mini"), "--prompt-ids", "1,2", "--max-new-tokens",
                         "4", "--json", "--ignore-eos").stdout)
    assert len(out["token_ids"]) == 4


def test_user_errors_exit_2_with_message(tmp_path):
    proc = run("info", "ERNIE-9", check=False)
    assert proc.returncode == 2 and "unknown model 'ERNIE-9'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("generate", "--model", str(tmp_path), "--prompt-ids", "1", check=False)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = run("generate", "--model", str(tmp_path), "--prompt", "hi", check=False)
    assert proc.returncode == 2
