"""Tiny ERNIE 4.5 checkpoints written by transformers' save_pretrained (the official -PT layout).

Each config is small enough to build in milliseconds; together they cover the structural variants the
loader and the forward pass must get right.
"""

from __future__ import annotations

import pytest
import torch

COMMON = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.3, max_position_embeddings=512)

CONFIGS = {
    # dense, head_dim (16) != hidden/heads (8), tied (the 0.3B pattern)
    "dense_headdim_tied": ("dense", dict(COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)),
    "dense_untied": ("dense", dict(COMMON, num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=False)),
    # MoE with shared experts, tied (the 21B pattern)
    "moe_shared_tied": ("moe", dict(COMMON, num_hidden_layers=3, moe_num_experts=8, moe_k=2, moe_intermediate_size=12,
                                    moe_num_shared_experts=2, moe_layer_start_index=1, tie_word_embeddings=True)),
    # MoE without shared experts, untied, correction bias that changes selection (the 300B pattern)
    "moe_noshared_untied_bias": ("moe", dict(COMMON, num_hidden_layers=3, moe_num_experts=8, moe_k=3,
                                             moe_intermediate_size=12, moe_num_shared_experts=0,
                                             moe_layer_start_index=1, tie_word_embeddings=False)),
    "moe_interval2": ("moe", dict(COMMON, num_hidden_layers=4, moe_num_experts=6, moe_k=2, moe_intermediate_size=12,
                                  moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=2,
                                  tie_word_embeddings=True)),
    "moe_end_before_last": ("moe", dict(COMMON, num_hidden_layers=4, moe_num_experts=4, moe_k=2,
                                        moe_intermediate_size=12, moe_num_shared_experts=0, moe_layer_start_index=1,
                                        moe_layer_end_index=2, tie_word_embeddings=False)),
}

# Widths divisible by 2 so TP=2 / EP=2 plans apply (tests/test_distributed.py).
PARALLEL = {
    "moe_shared_parallel": ("moe", dict(COMMON, initializer_range=0.1, intermediate_size=64, num_hidden_layers=3, moe_num_experts=8, moe_k=3,
                                        moe_intermediate_size=12, moe_num_shared_experts=2, moe_layer_start_index=1,
                                        tie_word_embeddings=False)),
    "dense_kv1_parallel": ("dense", dict(COMMON, initializer_range=0.1, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=1,
                                         tie_word_embeddings=True)),
}


def make_hf_model(name: str, seed: int = 0):
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    kind, kw = {**CONFIGS, **PARALLEL}[name]
    torch.manual_seed(seed)
    if kind == "dense":
        return Ernie4_5ForCausalLM(Ernie4_5Config(**kw)).eval()
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**kw)).eval()
    with torch.no_grad():  # a fresh model has a zero correction bias; make it matter (see test_bias_changes...)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.moe_statics.e_score_correction_bias.copy_(torch.randn(1, kw["moe_num_experts"]) * 0.3)
    return model


def load_reference(path, dtype=torch.float32):
    """transformers' model read back from the checkpoint, with its eager (reference) kernels."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                experts_implementation="eager").eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (directory, transformers model) written once per session."""
    cache = {}

    def get(name: str, dtype: torch.dtype = torch.float32, shard: bool = False):
        key = (name, dtype, shard)
        if key not in cache:
            model = make_hf_model(name).to(dtype)
            path = tmp_path_factory.mktemp(f"{name}-{str(dtype)[6:]}{'-sharded' if shard else ''}")
            model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
            cache[key] = (path, load_reference(path, dtype))
        return cache[key]

    return get
