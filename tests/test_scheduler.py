"""Token-budget scheduling without a model: budgets, chunked prefill, prefix hits, preemption, abort,
and whole runs through a fake model whose next token is computed from the paged KV cache."""

import random

import pytest
import torch

from ernie45.kv_cache import BlockPool, PagedKVCache, slot_mapping
from ernie45.sampling import SamplingParams
from ernie45.scheduler import Request, RequestStatus, Scheduler

VOCAB = 97
EOS = 0


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, **kw) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, block_size), budget, max_seqs, **kw)


def req(rid, prompt, max_tokens=4, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params))


def step(sched: Scheduler, token: int = 5):
    """Schedule once and 'sample' ``token`` for every request that needs one."""
    out = sched.schedule()
    events = sched.update(out, {s.request.request_id: token for s in out.scheduled if s.needs_sample})
    return out, events


def plan(out) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


# ----------------------------------------------------------------------------- admission

def test_add_rejects_what_can_never_run():
    sched = make(num_blocks=4, block_size=4, max_model_len=20)
    with pytest.raises(ValueError, match=r"needs 18 KV slots .* holds 16 tokens .* at most 13"):
        sched.add(req("big", range(1, 5), max_tokens=15))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(req("long", range(1, 15), max_tokens=10))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(req("empty", []))
    with pytest.raises(ValueError, match="n=2"):
        sched.add(req("n", [1], n=2))
    sched.add(req("fits", range(1, 5), max_tokens=13))  # exactly 16 slots
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(req("fits", [1]))


# ----------------------------------------------------------------------------- budget

def test_token_budget_and_running_first():
    sched = make(budget=16)
    for i in range(3):
        sched.add(req(f"r{i}", range(10 * i + 1, 10 * i + 11)))  # distinct: no prefix hits
    out, _ = step(sched)
    assert plan(out) == {"r0": 10, "r1": 6} and out.total_num_tokens == 16
    assert [s.needs_sample for s in out.scheduled] == [True, False]
    out, _ = step(sched)
    assert plan(out) == {"r0": 1, "r1": 4, "r2": 10}  # decode first, then r1 catches up, then r2 joins
    out, _ = step(sched)
    assert plan(out) == {"r0": 1, "r1": 1, "r2": 1}


def test_max_num_seqs():
    sched = make(max_seqs=2)
    for i in range(3):
        sched.add(req(f"r{i}", [1, 2]))
    out, _ = step(sched)
    assert list(plan(out)) == ["r0", "r1"] and len(sched.waiting) == 1


def test_chunked_prefill_over_several_steps():
    sched = make(budget=16, block_size=4)
    prompt = list(range(1, 41))
    sched.add(req("long", prompt, max_tokens=2))
    chunks = []
    for _ in range(3):
        out, events = step(sched)
        (item,) = out.scheduled
        chunks.append((item.start, item.token_ids, item.needs_sample, len(item.block_ids)))
        assert events == [] or item.needs_sample
    assert chunks == [(0, tuple(prompt[:16]), False, 4), (16, tuple(prompt[16:32]), False, 8),
                      (32, tuple(prompt[32:]), True, 10)]
    out, events = step(sched)
    assert out.scheduled[0].start == 40 and events[0].finish_reason == "length"


# ----------------------------------------------------------------------------- prefix cache

def test_prefix_hit_skips_computed_full_blocks():
    sched = make(block_size=4)
    shared = list(range(1, 13))  # three full blocks
    sched.add(req("a", shared + [50, 51], max_tokens=1))
    step(sched)
    sched.add(req("b", shared + [60], max_tokens=1))
    out, _ = step(sched)
    (item,) = out.scheduled
    assert item.start == 12 and item.token_ids == (60,) and item.request.num_prefix_hit_tokens == 12


def test_full_prompt_hit_still_computes_one_token():
    sched = make(block_size=4)
    prompt = list(range(1, 9))  # exactly two blocks
    sched.add(req("a", prompt, max_tokens=1))
    step(sched)
    sched.add(req("b", prompt, max_tokens=1))
    out, _ = step(sched)
    assert out.scheduled[0].start == 4 and out.scheduled[0].num_new_tokens == 4  # last block recomputed


def test_concurrent_requests_share_prefix_blocks():
    sched = make(block_size=4)
    sched.add(req("a", range(1, 10), max_tokens=8))
    step(sched)
    sched.add(req("b", list(range(1, 9)) + [70], max_tokens=8))
    out, _ = step(sched)
    a, b = (s.block_ids for s in out.scheduled)
    assert a[:2] == b[:2] and sched.pool.ref_count(a[0]) == 2 and a[2] != b[2]


# ----------------------------------------------------------------------------- memory pressure

def test_preemption_of_newest_and_later_completion():
    sched = make(num_blocks=4, block_size=4, budget=64)
    sched.add(req("old", range(1, 9), max_tokens=5))  # up to 12 slots = 3 blocks
    sched.add(req("new", range(20, 28), max_tokens=4))
    out, _ = step(sched)
    assert plan(out) == {"old": 8, "new": 8} and sched.pool.num_free_blocks == 0
    out, _ = step(sched)  # old needs a third block: the pool is empty, so "new" is preempted
    assert out.preempted_ids == ["new"] and plan(out) == {"old": 1}
    new = sched.waiting[0]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.output_token_ids == [5] and new.num_preemptions == 1 and not new.block_table.blocks
    while sched.has_unfinished:
        step(sched)
    assert new.finish_reason == "length" and new.output_token_ids == [5] * 4
    assert sched.pool.num_free_blocks == 4


def test_oldest_request_always_progresses():
    sched = make(num_blocks=3, block_size=4, budget=64)
    a = req("a", range(1, 9), max_tokens=5)  # up to 12 slots: the whole pool
    b = req("b", range(1, 3), max_tokens=3)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert plan(out) == {"a": 8, "b": 2} and sched.pool.num_free_blocks == 0
    out, _ = step(sched)  # a's 9th token needs a third block
    assert out.preempted_ids == ["b"] and plan(out) == {"a": 1}
    out, _ = step(sched)
    assert plan(out) == {"a": 1} and sched.waiting[0] is b  # b waits for blocks, first in line
    while sched.has_unfinished:
        step(sched)
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert a.output_token_ids == [5] * 5 and b.output_token_ids == [5] * 3


def test_abort_returns_blocks_everywhere():
    sched = make(num_blocks=8, block_size=4, max_seqs=1)
    sched.add(req("run", range(1, 10), max_tokens=20))
    sched.add(req("wait", range(1, 5)))
    step(sched)
    assert sched.pool.num_free_blocks == 5
    assert sched.abort("run") and sched.abort("wait") and not sched.abort("nope")
    assert sched.pool.num_free_blocks == 8 and not sched.has_unfinished
    assert sched.schedule().is_empty


def test_abort_between_schedule_and_update_is_skipped():
    sched = make()
    sched.add(req("a", [1, 2, 3]))
    out = sched.schedule()
    sched.abort("a")
    assert sched.update(out, {"a": 9}) == []


def test_update_twice_is_an_error_and_missing_sample_is_named():
    sched = make()
    sched.add(req("a", [1, 2, 3]))
    out = sched.schedule()
    with pytest.raises(KeyError, match="'a'"):
        sched.update(out, {})
    sched2 = make()
    sched2.add(req("a", [1, 2, 3]))
    out = sched2.schedule()
    sched2.update(out, {"a": 9})
    with pytest.raises(RuntimeError, match="once per schedule"):
        sched2.update(out, {"a": 9})


# ----------------------------------------------------------------------------- finishing

def test_stop_token_eos_and_finish_for_stop_strings():
    sched = make(eos_token_ids=(EOS,))
    sched.add(req("eos", [1], max_tokens=10))
    sched.add(req("stopid", [1], max_tokens=10, stop_token_ids=(7,)))
    sched.add(req("ignore", [1], max_tokens=2, ignore_eos=True))
    sched.add(req("text", [1], max_tokens=10))
    out = sched.schedule()
    events = sched.update(out, {"eos": EOS, "stopid": 7, "ignore": EOS, "text": 3})
    assert [(e.request_id, e.token_id, e.finish_reason) for e in events] == [
        ("eos", EOS, "stop"), ("stopid", 7, "stop"), ("ignore", EOS, None), ("text", 3, None)]
    assert sched.finish("text", "stop")  # the engine saw a stop string in the text
    assert set(sched.requests) == {"ignore"}


# ----------------------------------------------------------------------------- whole runs

def next_token(context: list[int]) -> int:
    """The fake model: a position-weighted sum of the context."""
    return sum((i + 1) * t for i, t in enumerate(context)) % VOCAB


def solo(prompt: list[int], max_tokens: int) -> list[int]:
    context, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(next_token(context))
        context.append(out[-1])
        if out[-1] == EOS:
            break
    return out


def run(sched: Scheduler, cache: PagedKVCache, max_steps: int = 2000) -> int:
    """Drive the scheduler; the fake model reads its whole context back from the paged cache."""
    steps = 0
    while sched.has_unfinished:
        out = sched.schedule()
        assert not out.is_empty and out.total_num_tokens <= sched.max_num_batched_tokens
        sampled = {}
        for item in out.scheduled:
            slots = slot_mapping(item.block_ids, item.positions, cache.block_size)
            k = torch.tensor(item.token_ids, dtype=torch.float64).view(-1, 1, 1)  # [T, 1, 1] token id
            v = torch.tensor(item.positions, dtype=torch.float64).view(-1, 1, 1) + 1  # [T, 1, 1] position + 1
            cache.write(0, slots, k, v)
            if item.needs_sample:
                ks, vs = cache.gather(0, item.block_ids, item.start + item.num_new_tokens)
                sampled[item.request.request_id] = int((ks * vs).sum().item()) % VOCAB
        sched.update(out, sampled)
        steps += 1
        assert steps < max_steps, "the scheduler stopped making progress"
    return steps


@pytest.mark.parametrize("seed", range(10))
def test_batched_run_equals_solo_runs(seed):
    rng = random.Random(seed)
    block_size, num_blocks = rng.choice([(2, 16), (4, 8), (4, 40)])
    pool = BlockPool(num_blocks, block_size, enable_prefix_caching=seed % 3 != 0)
    sched = Scheduler(pool, rng.choice([3, 8, 32]), rng.choice([3, 16]), eos_token_ids=(EOS,))
    cache = PagedKVCache(1, num_blocks, block_size, 1, 1, dtype=torch.float64)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    requests = []
    for i in range(12):
        prompt = rng.choice(prefixes) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 10))]
        max_tokens = rng.randint(1, min(12, num_blocks * block_size - len(prompt) + 1))
        requests.append(req(f"r{i}", prompt, max_tokens=max_tokens))
        sched.add(requests[-1])
    run(sched, cache)
    for r in requests:
        assert r.output_token_ids == solo(r.prompt_token_ids, r.params.max_tokens), r.request_id
    assert sched.pool.num_free_blocks == num_blocks


def test_run_under_pressure_preempts_and_hits_the_prefix_cache():
    sched = Scheduler(BlockPool(10, 2), 6, 8)
    cache = PagedKVCache(1, 10, 2, 1, 1, dtype=torch.float64)
    shared = [11, 12, 13, 14, 15, 16]
    requests = [req(f"r{i}", shared + [20 + i], max_tokens=12) for i in range(4)]
    for r in requests:
        sched.add(r)
    run(sched, cache)
    assert any(r.num_preemptions for r in requests)
    assert any(r.num_prefix_hit_tokens for r in requests)
    for r in requests:
        assert r.output_token_ids == solo(r.prompt_token_ids, 12)
