"""Loader strictness and every loader error, on checkpoints made here in the official layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45 import CheckpointError, ConfigError, load_model, save_checkpoint
from ernie45.config import preset
from ernie45.model import build_model, init_random

IDS = torch.tensor([[1, 5, 9, 14, 77, 3]])


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Apply edit(dict of tensors) to model.safetensors."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_misshaped_named_in_one_error(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("moe_shared_tied")[0], tmp_path)

    def edit(t):
        del t["model.layers.1.mlp.experts.3.up_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 32)
        t["model.layers.9.mlp.surprise.weight"] = torch.zeros(2)

    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing: model.layers.1.mlp.experts.3.up_proj.weight [12, 32]" in msg
    assert "misshaped: model.layers.0.self_attn.k_proj.weight is [3, 32]" in msg and "[16, 32]" in msg
    assert "unexpected: model.layers.9.mlp.surprise.weight" in msg


def test_truncated_file(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("dense_untied")[0], tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="is truncated: tensor .* ends at byte .*Download or copy"):
        load_model(path)


def test_corrupt_header(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("dense_untied")[0], tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid safetensors file: header is not JSON"):
        load_model(path)


def test_tiny_garbage_file(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("dense_untied")[0], tmp_path)
    (path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="shorter than the 8-byte header"):
        load_model(path)


def test_directory_without_config(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("dense_untied")[0], tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(path)


def test_unsupported_model_type(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("dense_untied")[0], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        load_model(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_model(tmp_path / "nowhere")


def test_pickle_only_checkpoint_refused(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("dense_untied")[0], tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pretend pickle")
    with pytest.raises(CheckpointError, match="never loads pickled weights"):
        load_model(path)


def test_missing_shard(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("moe_shared_tied", shard=True)[0], tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard\\(s\\) that are not in .*{shard.name}"):
        load_model(path)


def test_index_pointing_to_wrong_shard(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("moe_shared_tied", shard=True)[0], tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    name = next(k for k, v in index["weight_map"].items() if v != first)
    index["weight_map"][name] = first
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"the index says {name} is in {first}"):
        load_model(path)


def test_redundant_lm_head_in_tied_checkpoint_accepted(hf_checkpoint, tmp_path):
    src, ref = hf_checkpoint("moe_shared_tied")
    path = _copy(src, tmp_path)
    _rewrite(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        assert (model(IDS) - ref(IDS).logits).abs().max() <= 1e-4


def _mtp_checkpoint(tmp_path):
    cfg = preset("mini-300B-A47B").replace(num_hidden_layers=3, moe_layer_end_index=2)
    model = init_random(build_model(cfg), seed=3, std=0.1)
    return save_checkpoint(model, tmp_path / "mtp"), model


def test_mtp_weights_are_loaded(tmp_path):
    path, model = _mtp_checkpoint(tmp_path)
    names = load_file(path / "model.safetensors").keys()
    assert {"model.mtp_emb_norm.0.weight", "model.mtp_hidden_norm.0.weight", "model.mtp_linear_proj.0.weight",
            "model.mtp_block.0.mlp.gate_proj.weight", "model.mtp_block.0.self_attn.q_proj.weight"} <= set(names)
    loaded = load_model(path)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n


def test_transposed_300b_mtp_proj_is_fixed(tmp_path):
    path, model = _mtp_checkpoint(tmp_path)
    key = "model.mtp_linear_proj.0.weight"
    _rewrite(path, lambda t: t.__setitem__(key, t[key].t().contiguous()))  # [2H, H] as in the 300B-PT files
    loaded = load_model(path)
    assert torch.equal(loaded.model.mtp_linear_proj[0].weight, model.model.mtp_linear_proj[0].weight)


def test_save_checkpoint_roundtrip_and_transformers_reads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    path, model = _mtp_checkpoint(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        assert (model(IDS) - ref(IDS).logits).abs().max() <= 1e-4


def test_load_with_progress_bar(hf_checkpoint, capsys):
    path, _ = hf_checkpoint("dense_untied")
    load_model(path, progress=True)
    assert "loading weights" in capsys.readouterr().err


def test_bad_dtype(hf_checkpoint):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_model(hf_checkpoint("dense_untied")[0], dtype="int8")
