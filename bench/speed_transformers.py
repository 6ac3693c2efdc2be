"""transformers' `Ernie4_5_MoeForCausalLM` timed on a checkpoint: the peer measurement of bench/speed.py.

Run once per dtype in its own process (bench/speed.py does), so `peak_rss_bytes` is this configuration's
alone. Prints one JSON line with the keys `ernie45 bench --json` prints, measured the same way:
- decode_tok_s: batch-1 greedy `generate` of prompt ids 100..100+P-1, N new tokens (`min_new_tokens` = N,
  so it never stops at eos). A logits processor stamps the clock as each token is chosen; decode speed is
  (N - 1) tokens over the time from the first stamp (after the prefill forward) to the last, so the prompt
  is not counted. `greedy_tokens` are the N ids generated.
- prefill_tok_s: one forward over L prompt tokens (ids (100 + i) mod vocab) with `logits_to_keep=1`, as
  `generate` runs its prefill; best of two after a short warm-up.
- throughput_tok_s: C same-length prompts (ids 100 + (i*7 + j) mod 1000, as `ernie45 bench` builds them; no
  padding) through one batched greedy `generate` of M new tokens each; C * M generated tokens over the
  whole call's wall time (prefill included). `decode_throughput_tok_s` leaves the prefill out.
transformers runs with its defaults (sdpa attention, its default experts implementation), which is
how a user meets it; both are recorded in the output.

    python bench/speed_transformers.py --model DIR --dtype fp32|bf16 [--threads 2] [--concurrency 8,32]
(the workload flags and their defaults are `ernie45 bench`'s).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class StepClock:
    """A logits processor that only records when each new token's scores arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def prompt(length: int, vocab: int) -> torch.Tensor:
    """[1, P]: ids 100, 101, ... (mod vocab): the batch-1 decode and the prefill prompt."""
    return ((100 + torch.arange(length)) % vocab)[None]


def concurrent_prompts(n: int, length: int, vocab: int) -> torch.Tensor:
    """[C, P]: request i is ids 100 + (i*7 + j) mod 1000, j < P (ernie45 bench's throughput prompts)."""
    i, j = torch.arange(n)[:, None], torch.arange(length)[None]
    return (100 + (i * 7 + j) % 1000) % vocab


def greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, list[float]]:
    """-> (new ids [B, N], wall seconds of the call, per-token clock stamps relative to the call's start)."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    ids = ids.to(model.device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([clock]))
    return out[:, ids.shape[1]:], time.perf_counter() - t0, [t - t0 for t in clock.times]


def decode_rate(batch: int, stamps: list[float]) -> float:
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def measure(args: argparse.Namespace) -> dict:
    from transformers import Ernie4_5_MoeForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = Ernie4_5_MoeForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval().to(args.device)
    load_s = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    vocab = model.config.vocab_size
    greedy(model, prompt(args.prompt_tokens, vocab), 2)  # warm-up: thread pool, allocator, kernels
    tokens, _, stamps = greedy(model, prompt(args.prompt_tokens, vocab), args.new_tokens)
    long = prompt(args.prefill_tokens, vocab).to(args.device)
    model(long[:, :32], logits_to_keep=1)
    prefill = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(long, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()
        prefill.append(time.perf_counter() - t)
    throughput, decode_throughput = {}, {}
    for c in args.concurrency:
        _, wall, cstamps = greedy(model, concurrent_prompts(c, args.prompt_tokens, vocab), args.concurrent_new_tokens)
        throughput[str(c)] = c * args.concurrent_new_tokens / wall
        decode_throughput[str(c)] = decode_rate(c, cstamps)
    return {"system": "transformers", "dtype": args.dtype, "decode_tok_s": decode_rate(1, stamps),
            "prefill_tok_s": args.prefill_tokens / min(prefill), "throughput_tok_s": throughput,
            "decode_throughput_tok_s": decode_throughput, "greedy_tokens": tokens[0].tolist(),
            "first_token_s": stamps[0],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "load_s": load_s,
            "attn_implementation": model.config._attn_implementation,
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "threads": torch.get_num_threads(), "device": args.device,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",") if c.strip()], default=[8, 32])
    p.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_speed.py)")
    p.add_argument("--concurrent-new-tokens", type=int, default=32)
    print(json.dumps(measure(p.parse_args())))


if __name__ == "__main__":
    main()
