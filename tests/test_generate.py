from __future__ import annotations

import pytest
import torch

from ernie45 import GenerationConfig, generate, load_model
from ernie45.generation import sample_token


def test_cached_decode_equals_full_recompute(hf_checkpoint):
    model = load_model(hf_checkpoint("moe_shared_tied")[0], dtype=torch.float32)
    prompt = [1, 5, 9]
    out = generate(model, prompt, GenerationConfig(max_new_tokens=10, stop_token_ids=()))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_seeded_sampling_reproducible_and_varied(hf_checkpoint):
    model = load_model(hf_checkpoint("dense_untied")[0], dtype=torch.float32)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop_token_ids=())
    a, b = generate(model, [1, 2, 3], cfg), generate(model, [1, 2, 3], cfg)
    c = generate(model, [1, 2, 3], GenerationConfig(**{**cfg.__dict__, "seed": 8}))
    assert a == b and a != c


def test_stops_at_eos(hf_checkpoint):
    model = load_model(hf_checkpoint("dense_untied")[0], dtype=torch.float32)
    free = generate(model, [1, 5], GenerationConfig(max_new_tokens=8, stop_token_ids=()))
    stop = free[3]
    out = generate(model, [1, 5], GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,)))
    assert out == free[:free.index(stop) + 1]


def test_top_k_and_top_p_masks():
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, GenerationConfig(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert draws == {1, 2}
    p = torch.softmax(logits, 0)  # [0.032, 0.644, 0.237, 0.087]
    top_p = float(p[1]) + 0.01  # needs tokens 1 and 2
    draws = {sample_token(logits, GenerationConfig(temperature=1.0, top_p=top_p), gen) for _ in range(200)}
    assert draws == {1, 2}
    assert {sample_token(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen) for _ in range(50)} == {1}


@pytest.mark.parametrize("kw,msg", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                    (dict(top_k=-2), "top_k")])
def test_bad_generation_config(hf_checkpoint, kw, msg):
    model = load_model(hf_checkpoint("dense_untied")[0], dtype=torch.float32)
    with pytest.raises(ValueError, match=msg):
        generate(model, [1], GenerationConfig(**kw))


def test_bad_prompts(hf_checkpoint):
    model = load_model(hf_checkpoint("dense_untied")[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [1, 500])
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [1], GenerationConfig(max_new_tokens=10_000))


def test_mtp_logits_shape_and_semantics():
    """MTP uses the pre-norm trunk output and the *next* token's embedding, embedding first."""
    from ernie45.config import preset
    from ernie45.model import build_model, init_random

    cfg = preset("mini-300B-A47B").replace(num_hidden_layers=2, moe_layer_end_index=1)
    model = init_random(build_model(cfg), seed=1, std=0.1)
    ids = torch.tensor([[1, 7, 9, 30, 2]])
    pos = torch.arange(5)[None]
    with torch.no_grad():
        h = model.model(ids, pos)
        logits = model.mtp_logits(h[:, :-1], ids[:, 1:], pos[:, :-1])
        m = model.model
        u = m.mtp_linear_proj[0](torch.cat([m.mtp_emb_norm[0](m.embed_tokens(ids[:, 1:])),
                                            m.mtp_hidden_norm[0](h[:, :-1])], -1))
        from ernie45.layers import rope_cos_sin
        cos, sin = rope_cos_sin(pos[:, :-1], m.inv_freq)
        expected = model.logits(m.mtp_block[0](u, cos, sin, pos[:, :-1]))
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.allclose(logits, expected)
