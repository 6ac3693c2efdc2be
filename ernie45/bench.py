"""`ernie45 bench`: how fast this machine runs a checkpoint with ernie45 alone, as JSON a script can compare.

One process, one configuration (so `peak_rss_bytes` belongs to it): load (optionally quantize in memory
with round-to-nearest), switch to the fast path (`fast.accelerate`), then measure
- decode: batch-1 greedy, a fixed prompt of ids 100.. (default 16 tokens), N new tokens (default 64);
  `decode_tok_s` counts the tokens after the first, whose time is the prompt's prefill;
- prefill: one forward over `--prefill-tokens` (default 512) tokens into a fresh KV cache, best of two
  (the first also pays one-time weight repacking; transformers and llama.cpp are timed the same way);
- throughput: the serving engine with C concurrent greedy requests (default 8 and 32), generated
  tokens / wall time, prompts and queueing included;
- the reference check: the same greedy decode on the slow reference modules (`fast.reference`);
  `greedy_matches_reference` says whether every token agrees.
`active_weight_bytes` is the planner's bytes read per decoded token, for rooflines. Timings are wall
clock on a possibly shared machine: compare runs of the same script, never assert them in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.no_grad()
def touch(model) -> None:
    """Read every weight once: weights the loader left on the checkpoint's mmap (a same-dtype load) would
    otherwise be paged in during the timed runs (seconds per GB from disk)."""
    for p in model.parameters():
        p.detach().contiguous().view(-1).view(torch.uint8).max()  # the bytes, whatever the dtype


def decode_run(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(greedy tokens, seconds to the first token, seconds for the rest)."""
    from .generation import GenerationConfig, generate_stream

    stream = generate_stream(model, prompt, GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=()))
    t0 = time.perf_counter()
    tokens = [next(stream)]
    t1 = time.perf_counter()
    tokens += list(stream)
    return tokens, t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def prefill_seconds(model, n: int) -> float:
    """One forward of n tokens into a fresh cache, head on the last row only (what generate does)."""
    from .cache import KVCache

    cfg, w = model.config, model.model.embed_tokens.weight
    ids = (torch.arange(n) % (cfg.vocab_size - 100) + 100)[None]
    cache = KVCache(cfg, 1, n, w.dtype, w.device, num_layers=cfg.num_hidden_layers)
    t0 = time.perf_counter()
    model.logits(model.model(ids, torch.arange(n)[None], cache)[:, -1:])
    return time.perf_counter() - t0


def throughput(model, concurrency: int, prompt_tokens: int, new_tokens: int) -> float:
    """Generated tokens per second with `concurrency` greedy requests served together by the engine."""
    from .engine import Engine
    from .sampling import SamplingParams

    from .plan import kv_bytes_per_token

    need = concurrency * (prompt_tokens + new_tokens) * kv_bytes_per_token(model.config)
    per_token_dtype = model.model.embed_tokens.weight.element_size() / 2  # the planner counts bf16 KV
    engine = Engine(model, max_num_seqs=concurrency, kv_cache_bytes=max(16 << 20, int(2 * need * per_token_dtype)))
    prompts = {f"r{i}": [100 + (i * 7 + j) % 1000 for j in range(prompt_tokens)] for i in range(concurrency)}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return sum(map(len, out.values())) / (time.perf_counter() - t0)


@torch.no_grad()
def divergence(model, context: list[int], ref_token: int, fast_token: int) -> dict:
    """Where the fast path first chose another token: how close the reference's own logits were there.

    A near-tie (the fast token second in the reference's ranking, a gap of a few bf16 ulps) is rounding
    noise between two correct implementations; a large gap would be a bug.
    """
    logits = model(torch.tensor([context]))[0, -1].float()
    gap = float(logits[ref_token] - logits[fast_token])
    return {"index": len(context), "reference_token": ref_token, "fast_token": fast_token,
            "reference_logit_gap": gap, "reference_logit_spread": float(logits.max() - logits.min()),
            "fast_token_rank_in_reference": int((logits > logits[fast_token]).sum())}


def active_bytes(model, dtype: str) -> int:
    from .plan import active_weight_bytes

    q = model.config.quantization_config
    if q:
        return active_weight_bytes(model.config, q.get("scheme", "int8"))
    return active_weight_bytes(model.config, "bf16") * (2 if dtype == "fp32" else 1)


def run(args: argparse.Namespace) -> dict:
    from . import fast, kernels
    from .config import resolve_model_dir
    from .weights import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=DTYPES[args.dtype], progress=not args.json)
    if args.quant:
        from .quant import quantize_model

        quantize_model(model, args.quant, "rtn", progress=not args.json)
    load_s = time.perf_counter() - t0
    touch(model)
    if not args.reference:
        fast.accelerate(model)
    prompt = list(range(100, 100 + args.prompt_tokens))
    decode_run(model, prompt, 4)  # warm-up: caches, kernel build, allocator
    tokens, first_s, rest_s = decode_run(model, prompt, args.new_tokens)
    prefill_seconds(model, min(64, args.prefill_tokens))  # warm-up
    # best of two, as bench/ measures the peers: the first full-length forward also pays one-time work
    # that a 64-token warm-up does not reach (torch's int4 weight repacking of experts with many rows)
    prefill_s = min(prefill_seconds(model, args.prefill_tokens) for _ in range(2))
    result = {
        "model": str(model_dir), "dtype": args.dtype, "quant": args.quant, "threads": torch.get_num_threads(),
        "path": "reference" if args.reference else "fast",
        "kernels": kernels.available(), "kernels_unavailable_reason": kernels.unavailable_reason(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "decode_tok_s": (len(tokens) - 1) / rest_s if len(tokens) > 1 else None,
        "first_token_s": first_s, "prefill_tokens": args.prefill_tokens,
        "prefill_tok_s": args.prefill_tokens / prefill_s, "load_s": load_s,
        "active_weight_bytes": active_bytes(model, args.dtype), "greedy_tokens": tokens,
        "throughput_tok_s": {str(c): throughput(model, c, args.prompt_tokens, args.concurrent_new_tokens)
                             for c in args.concurrency},
    }
    if args.check and not args.reference:
        fast.reference(model)
        ref, _, ref_s = decode_run(model, prompt, args.new_tokens)
        result["reference_decode_tok_s"] = (len(ref) - 1) / ref_s if len(ref) > 1 else None
        result["greedy_matches_reference"] = ref == tokens
        agree = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), len(ref))
        result["greedy_prefix_agreement"] = agree
        if agree < len(ref):  # judged on the reference modules
            result["first_divergence"] = divergence(model, prompt + ref[:agree], ref[agree], tokens[agree])
        fast.accelerate(model)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["torch"] = torch.__version__
    result["machine"] = platform.machine()
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.prefill_tokens < 1:
        raise ValueError("--prompt-tokens and --prefill-tokens must be >= 1 and --new-tokens >= 2")
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']} ({args.dtype}{', ' + args.quant if args.quant else ''}, {result['path']} path, "
          f"{result['threads']} threads)")
    print(f"  decode   {result['decode_tok_s']:8.2f} tok/s  (batch 1, {args.new_tokens} new tokens)")
    print(f"  prefill  {result['prefill_tok_s']:8.2f} tok/s  ({args.prefill_tokens} tokens)")
    for c, v in result["throughput_tok_s"].items():
        print(f"  serve    {v:8.2f} tok/s  ({c} concurrent sequences)")
    print(f"  peak RSS {result['peak_rss_bytes'] / 2**20:8.1f} MiB")
    if "greedy_matches_reference" in result:
        print(f"  reference path decode {result['reference_decode_tok_s']:.2f} tok/s; greedy tokens "
              f"{'match' if result['greedy_matches_reference'] else 'DIFFER from'} the reference "
              f"(first {result['greedy_prefix_agreement']} agree)")
    if "first_divergence" in result:
        d = result["first_divergence"]
        print(f"  first divergence: the fast token is #{d['fast_token_rank_in_reference'] + 1} in the reference's "
              f"ranking, {d['reference_logit_gap']:.4g} below its top logit (logit spread {d['reference_logit_spread']:.3g})")
    return 0


def _concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency wants comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("--concurrency values must be >= 1")
    return values


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill/serving speed and peak RSS of a checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights/activations dtype (default bf16)")
    p.add_argument("--quant", choices=["int8", "int4", "int2", "mixed-2bit", "fp8"],
                   help="quantize the loaded weights in memory with round-to-nearest first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--concurrency", type=_concurrency, default=[8, 32],
                   help="comma-separated concurrent sequence counts for the serving throughput (default 8,32; '' = skip)")
    p.add_argument("--concurrent-new-tokens", type=int, default=32, help="new tokens per concurrent request")
    p.add_argument("--reference", action="store_true", help="measure the slow reference modules instead")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the greedy comparison with the reference path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

