"""The default model shipped inside the package (trained here; configs/default_model.json, README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ernie45 import GenerationConfig, generate, load_model
from ernie45.config import ModelConfig
from ernie45.tokenizer import Tokenizer
from ernie45.weights import DEFAULT_MODEL_DIR

IDS = torch.tensor([[1, 2145, 20, 377, 5, 912, 44, 3001, 8000, 17, 2]])


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL_DIR, dtype=torch.float32)


def test_structure_mirrors_300b_in_miniature():
    cfg = ModelConfig.from_file(DEFAULT_MODEL_DIR)
    assert cfg.is_moe and cfg.moe_num_experts == 64 and cfg.moe_k == 8 and cfg.moe_num_shared_experts == 0
    assert cfg.moe_layers[0] is False and any(cfg.moe_layers)  # leading dense layer(s), then MoE
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 8  # GQA groups of 8, as 64/8
    assert not cfg.tie_word_embeddings and cfg.num_nextn_predict_layers == 1
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 20_000_000, f"{size} bytes on disk"


def test_transformers_loads_it_with_the_same_logits(model):
    from transformers import AutoModelForCausalLM, Ernie4_5_MoeForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32,
                                               experts_implementation="eager").eval()
    assert isinstance(ref, Ernie4_5_MoeForCausalLM)
    with torch.no_grad():
        assert (model(IDS) - ref(IDS).logits).abs().max().item() <= 1e-4


def test_generates_text(model):
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    out = generate(model, tok.encode("ROMEO:"), GenerationConfig(max_new_tokens=20))
    assert len(out) >= 1 and tok.decode(out).strip()


def test_cli_needs_no_model_flag():
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "ernie45", *a], capture_output=True, text=True,  # noqa: E731
                                          timeout=300, **kw)
    out = run("generate", "--prompt", "ROMEO:", "--max-new-tokens", "12")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    ids = json.loads(run("generate", "--prompt-ids", "1,5,9", "--max-new-tokens", "4", "--json").stdout)
    assert len(ids["token_ids"]) >= 1
    chat = run("chat", "--max-new-tokens", "8", "--seed", "0", input="Who art thou?\n/exit\n")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "mixed-2bit", "fp8"])
def test_quantized_bytes_on_disk_equal_the_planner(tmp_path, scheme):
    """Its widths (160, 40) are not multiples of the int4/int2 groups: the fallback groups must agree too."""
    from ernie45.plan import weight_bytes
    from ernie45.quant.stream import quantize_checkpoint
    from ernie45.safetensors_mmap import SafetensorsFile

    quantize_checkpoint(DEFAULT_MODEL_DIR, tmp_path, scheme, "rtn", None, int4_moe_layers=1, progress=False)
    on_disk = 0
    for f in tmp_path.glob("*.safetensors"):
        with SafetensorsFile(f) as r:
            on_disk += sum(t.nbytes for t in r.tensors.values())
    cfg = ModelConfig.from_file(DEFAULT_MODEL_DIR)
    assert on_disk == sum(weight_bytes(cfg, scheme, mtp=True, int4_moe_layers=1).values())
    assert torch.isfinite(load_model(tmp_path, dtype=torch.float32)(IDS)).all()
