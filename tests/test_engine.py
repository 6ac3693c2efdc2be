"""Engine (paged KV, continuous batching) against the reference generate loop, token for token."""

from __future__ import annotations

import pytest
import torch

from ernie45 import GenerationConfig, generate, load_model
from ernie45.engine import Engine
from ernie45.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("moe_noshared_untied_bias")[0], dtype=torch.float32)


def reference(model, prompt, n=16):
    return generate(model, prompt, GenerationConfig(max_new_tokens=n, stop_token_ids=()))


def run_with_arrivals(engine, arrivals):
    """arrivals: list of (step, request_id, prompt). Returns request_id -> tokens; requests in engine.added."""
    out, step, engine.added = {rid: [] for _, rid, _ in arrivals}, 0, []
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt = pending.pop(0)
            engine.added.append(engine.add_request(rid, prompt, GREEDY))
        for e in engine.step():
            out[e.request_id].append(e.token_id)
        step += 1
    return out


def test_mixed_lengths_and_arrival_times_match_reference(model):
    gen = torch.Generator().manual_seed(0)
    arrivals = [(s, f"r{i}", torch.randint(3, 99, (n,), generator=gen).tolist())
                for i, (s, n) in enumerate([(0, 5), (0, 23), (2, 1), (3, 40), (7, 9), (12, 17)])]
    engine = Engine(model, block_size=4, num_blocks=128, max_num_batched_tokens=24, max_num_seqs=8)
    out = run_with_arrivals(engine, arrivals)
    for _, rid, prompt in arrivals:
        assert out[rid] == reference(model, prompt), rid
    assert engine.pool.num_free_blocks == 128  # everything returned


def test_preemption_under_a_small_pool_still_matches(model):
    prompts = {f"p{i}": [1 + i, 5, 9, 14, 20 + i, 3, 7] * 2 for i in range(5)}
    engine = Engine(model, block_size=4, num_blocks=16, max_num_batched_tokens=32, max_num_seqs=8)
    out = run_with_arrivals(engine, [(0, rid, p) for rid, p in prompts.items()])
    assert sum(r.num_preemptions for r in engine.added) > 0
    for rid, p in prompts.items():
        assert out[rid] == reference(model, p), rid


def test_prefix_cache_hits_give_identical_tokens(model):
    shared = list(range(10, 42))  # 8 full blocks of 4
    engine = Engine(model, block_size=4, num_blocks=64, max_num_batched_tokens=64)
    first = engine.generate({"a": shared + [5]}, GREEDY)["a"]
    request = engine.add_request("b", shared + [6], GREEDY)
    second = []
    while engine.has_unfinished():
        second += [e.token_id for e in engine.step()]
    assert request.num_prefix_hit_tokens >= 28
    assert first == reference(model, shared + [5]) and second == reference(model, shared + [6])


def test_seeded_sampling_independent_of_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True)
    alone = Engine(model, block_size=4, num_blocks=64).generate({"x": [1, 2, 3]}, params)["x"]
    engine = Engine(model, block_size=4, num_blocks=64)
    engine.add_request("noise", [4, 5, 6, 7], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    together = engine.generate({"x": [1, 2, 3]}, params)["x"]
    assert alone == together


def test_oversized_request_rejected_and_abort_frees_blocks(model):
    engine = Engine(model, block_size=4, num_blocks=8)
    with pytest.raises(ValueError):
        engine.add_request("big", list(range(1, 40)), GREEDY)
    engine.add_request("a", [1, 2, 3, 4, 5], GREEDY)
    engine.step()
    assert engine.pool.num_free_blocks < 8
    assert engine.abort("a") and engine.pool.num_free_blocks == 8 and not engine.has_unfinished()


def test_bad_prompt_ids(model):
    engine = Engine(model, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [1, 1000], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)


def test_kv_bytes_accounting(model):
    cfg = model.config
    engine = Engine(model, block_size=16, kv_cache_bytes=1 << 20)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert engine.kv_bytes_total == engine.pool.num_blocks * 16 * per_token <= 1 << 20
