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


def test_prompt_text_streams_and_chat(tmp_path):
    """--prompt with tokenizer files: the streamed text equals decoding the --json token ids."""
    from test_tokenizer import CORPUS

    from ernie45.config import preset
    from ernie45.model import build_model, init_random
    from ernie45.tokenizer_train import train_sentencepiece
    from ernie45.weights import save_checkpoint

    ckpt = tmp_path / "ckpt"
    tok = train_sentencepiece(CORPUS, 400, ckpt)
    cfg = preset("mini-300B-A47B").replace(vocab_size=len(tok), num_hidden_layers=3, moe_layer_end_index=2)
    save_checkpoint(init_random(build_model(cfg), seed=2, std=0.3), ckpt)
    common = ["--model", str(ckpt), "--max-new-tokens", "10", "--ignore-eos"]
    text = run("generate", "--prompt", "The river", *common).stdout
    ids = json.loads(run("generate", "--prompt-ids", ",".join(map(str, tok.encode("The river"))), "--json",
                         *common).stdout)["token_ids"]
    assert text == tok.decode(ids, skip_special_tokens=True) + "\n"
    chat_ids = tok.encode_chat([{"role": "user", "content": "The river"}])
    chat = json.loads(run("generate", "--prompt-ids", ",".join(map(str, chat_ids)), "--json", *common).stdout)
    assert run("generate", "--prompt", "The river", "--chat", *common).stdout == \
        tok.decode(chat["token_ids"], skip_special_tokens=True) + "\n"
