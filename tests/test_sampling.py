"""Sampling params, each logits processor against a plain-loop reference, the seeded draw, logprobs."""

import math

import pytest
import torch

from ernie45.sampling import (SamplingParams, Sampler, apply_min_p, apply_penalties, apply_temperature,
                              apply_top_k, apply_top_p, compute_logprobs, derive_seed, sample, token_counts)

NEG_INF = float("-inf")


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


# ----------------------------------------------------------------------------- params

def test_params_defaults_and_normalisation():
    p = SamplingParams(stop="END", stop_token_ids=[5, 6])
    assert p.stop == ("END",) and p.stop_token_ids == (5, 6)
    assert hash(p) == hash(SamplingParams(stop=["END"], stop_token_ids=(5, 6)))
    assert SamplingParams().top_k == 0 and not SamplingParams().greedy and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=2.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.1), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(seed=1.0), "seed"), (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(n=0), "n"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(top_logprobs=3), "top_logprobs"),
])
def test_params_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}=.*allowed"):
        SamplingParams(**kwargs)


def test_params_edges_are_allowed():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   logprobs=True, top_logprobs=20, seed=0)


def test_derive_seed():
    assert derive_seed(123, 0) == 123
    seeds = {derive_seed(s, i) for s in range(5) for i in range(5)}
    assert len(seeds) == 25  # seed + index would collide here


# ----------------------------------------------------------------------------- processors

def test_token_counts():
    counts = token_counts([[1, 1, 3], []], 4, "cpu")
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0]]


def naive_penalties(row, prompt, output, rep, pres, freq):
    out = list(row)
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / rep if out[tok] > 0 else out[tok] * rep
    for tok in set(output):
        out[tok] -= pres + freq * output.count(tok)
    return out


def test_apply_penalties_matches_reference():
    logits = random_logits(3, 10)
    prompts, outputs = [[1, 2, 2], [], [9]], [[2, 3, 3, 3], [0, 0], []]
    rep, pres, freq = [1.3, 0.7, 2.0], [0.5, -1.0, 2.0], [0.25, 1.5, -2.0]
    got = apply_penalties(logits, prompts, outputs, rep, pres, freq)
    for b in range(3):
        want = naive_penalties(logits[b].tolist(), prompts[b], outputs[b], rep[b], pres[b], freq[b])
        assert got[b].tolist() == pytest.approx(want, rel=1e-6)
    assert torch.equal(apply_penalties(logits, prompts, outputs), logits)  # neutral defaults


def test_apply_temperature_per_row_and_greedy_rows_untouched():
    logits = random_logits(3, 5)
    got = apply_temperature(logits, [0.5, 0.0, 2.0])
    assert torch.allclose(got[0], logits[0] / 0.5) and torch.equal(got[1], logits[1])
    assert torch.allclose(got[2], logits[2] / 2.0)


@pytest.mark.parametrize("k", [1, 3, 9, 10, 0, -1, 50])
def test_apply_top_k_matches_reference(k):
    logits = random_logits(4, 10, seed=k + 5)
    got = apply_top_k(logits, k)
    for b in range(4):
        kept = sorted(range(10), key=lambda i: -logits[b, i].item())[:k if 0 < k <= 10 else 10]
        want = [logits[b, i].item() if i in kept else NEG_INF for i in range(10)]
        assert got[b].tolist() == want


def test_apply_top_k_per_row():
    logits = random_logits(3, 6)
    got = apply_top_k(logits, torch.tensor([1, 0, 4]))
    assert [int(torch.isfinite(r).sum()) for r in got] == [1, 6, 4]


def naive_top_p(row, p):
    probs = [math.exp(x) for x in row]
    total = sum(probs)
    kept, mass = [], 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):  # best first, until the mass reaches p
        if kept and mass >= p:
            break
        kept.append(i)
        mass += probs[i] / total
    return [row[i] if i in kept or p >= 1.0 else NEG_INF for i in range(len(row))]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_apply_top_p_matches_reference(p):
    logits = random_logits(5, 12, seed=int(p * 1000))
    got = apply_top_p(logits, p)
    for b in range(5):
        assert got[b].tolist() == pytest.approx(naive_top_p(logits[b].tolist(), p))


def test_apply_top_p_keeps_best_token_and_per_row():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    got = apply_top_p(logits, [1e-6, 0.5])
    assert got[0].tolist() == [10.0, NEG_INF, NEG_INF]
    assert int(torch.isfinite(got[1]).sum()) == 2  # 1/3 < 0.5 <= 2/3


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_apply_min_p_matches_reference(min_p):
    logits = random_logits(4, 9, seed=3)
    got = apply_min_p(logits, min_p)
    for b in range(4):
        row = logits[b].tolist()
        top = max(row)  # p_i >= min_p * p_max  <=>  exp(x_i - x_max) >= min_p
        want = [x if math.exp(x - top) >= min_p * (1 - 1e-6) else NEG_INF for x in row]
        assert got[b].tolist() == pytest.approx(want)


def test_processors_do_not_modify_their_input():
    logits = random_logits(2, 8)
    before = logits.clone()
    apply_penalties(logits, [[1], [1]], [[2], [2]], 1.5, 1.0, 1.0)
    for fn, arg in [(apply_temperature, 0.5), (apply_top_k, 2), (apply_top_p, 0.5), (apply_min_p, 0.2)]:
        fn(logits, arg)
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------- drawing

def test_greedy_is_argmax():
    logits = random_logits(6, 50)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5)] * 6
    assert torch.equal(sample(logits, params), logits.argmax(-1))


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    p = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    out = Sampler()(logits, ["r"], [p], [[]], [[0]])
    assert out.token_ids.tolist() == [1]


def test_seeded_request_is_reproducible_regardless_of_batch():
    logits = random_logits(4, 30, seed=11)  # row 0 is the seeded request's
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def stream(batch_logits, batch_params, row: int) -> list[int]:
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in batch_params]
        return [sample(batch_logits, batch_params, gens)[row].item() for _ in range(20)]

    alone = stream(logits[:1], [target], 0)
    crowd = [SamplingParams(seed=9), SamplingParams(), target, SamplingParams(temperature=0.7, top_k=5)]
    moved = torch.stack([logits[1], logits[2], logits[0], logits[3]])  # the request now sits in row 2
    assert stream(moved, crowd, 2) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_sample_matches_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20000, 4)
    params = [SamplingParams()] * 20000
    tokens = sample(logits, params, default_generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)


def test_sample_respects_truncation():
    logits = random_logits(1, 40).expand(500, 40)
    params = [SamplingParams(top_k=3)] * 500
    tokens = sample(logits, params, default_generator=torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) <= set(logits[0].topk(3).indices.tolist())


def test_sampler_keeps_generator_state_per_request():
    logits = random_logits(1, 30)
    p = SamplingParams(seed=5)
    sampler = Sampler()
    first = [sampler(logits, ["a"], [p], [[]], [[]]).token_ids.item() for _ in range(10)]
    sampler.release("a")
    again = [sampler(logits, ["a"], [p], [[]], [[]]).token_ids.item() for _ in range(10)]
    assert first == again


# ----------------------------------------------------------------------------- logprobs

def test_compute_logprobs():
    logits = random_logits(3, 15)
    tokens = torch.tensor([0, 7, 14])
    chosen, top_ids, top_lp = compute_logprobs(logits, tokens, 4)
    ref = torch.log_softmax(logits.double(), -1)
    for b in range(3):
        assert chosen[b].item() == pytest.approx(ref[b, tokens[b]].item(), abs=1e-5)
        order = sorted(range(15), key=lambda i: -ref[b, i].item())[:4]
        assert top_ids[b].tolist() == order
        assert top_lp[b].tolist() == pytest.approx([ref[b, i].item() for i in order], abs=1e-5)


def test_sampler_logprobs_are_raw_and_only_where_asked():
    logits = random_logits(3, 10)
    params = [SamplingParams(temperature=0.3, logprobs=True, top_logprobs=2, repetition_penalty=1.8),
              SamplingParams(), SamplingParams(temperature=0.0, logprobs=True)]
    out = Sampler(seed=0)(logits, ["a", "b", "c"], params, [[1, 2]] * 3, [[3]] * 3)
    raw = torch.log_softmax(logits, -1)
    first, second, third = out.logprobs
    assert second is None and third.top == ()
    assert first.token_id == out.token_ids[0].item()
    assert first.logprob == pytest.approx(raw[0, first.token_id].item(), abs=1e-6)
    assert [t for t, _ in first.top] == raw[0].topk(2).indices.tolist()


def test_per_row_parameter_of_wrong_length_is_named():
    with pytest.raises(ValueError, match=r"shape \(2,\); expected \(3,\)"):
        apply_top_k(random_logits(3, 5), [1, 2])
