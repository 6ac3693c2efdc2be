"""Two serving-engine fast paths, each against the engine without it, alternating in one process.

    python bench/serve_ab.py [--model DIR] [--configs bf16,int4,fp32] [--concurrency 8,32] [--rounds 5]
                             [--parts head,attention] [--threads 2] [--out DIR]

- head: an engine step whose greedy rows need no logits (temperature 0, no logprobs, no penalties) picks their
  tokens with one pass of the int8 screen over the head for all of them (`Engine.sample`,
  `GreedyHead.screen_rows`); without it, full logits and the sampler.
- attention: decode steps (one new token per request) attend in one C call over the block tables
  (`kernels.paged_attention`); without it, each request's blocks gathered into padded tensors and
  `attend_gqa` (what prefill steps always use).
Each part times the same greedy batch (C requests of a 16-token prompt and 32 new tokens, all added at once,
as `ernie45 bench` measures throughput) with and without it on one loaded model, round by round, so the
host's drift hits both alike. Tokens must be equal for the head (checked: the screen is exact). Writes
serve_ab.json and .md; the ratio is the median over rounds of tokens/s with the part over tokens/s without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ernie45 import engine as engine_module  # noqa: E402
from ernie45 import fast  # noqa: E402
from ernie45.bench import DTYPES, touch  # noqa: E402
from ernie45.engine import Engine  # noqa: E402
from ernie45.fast import is_accelerated  # noqa: E402
from ernie45.sampling import SamplingParams  # noqa: E402
from ernie45.weights import load_model  # noqa: E402

DEFAULT_MODEL = Path("/tmp/ernie45-bench/bench-medium-std0.08")
PARTS = {"head": "screened greedy head", "attention": "paged decode attention kernel"}


def run(model, concurrency: int) -> tuple[dict[str, list[int]], float]:
    """Generated tokens per request and tokens/s of one greedy batch through a fresh engine."""
    engine = Engine(model, max_num_seqs=concurrency, kv_cache_bytes=64 << 20)
    prompts = {f"r{i}": [100 + (i * 7 + j) % 1000 for j in range(16)] for i in range(concurrency)}
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return out, sum(map(len, out.values())) / (time.perf_counter() - t0)


def _toggle(model, part: str):
    """set(on) for one part: the screened head (model.greedy_head) or the paged decode kernel (the engine
    asks fast.is_accelerated whether to take it)."""
    head = model.greedy_head

    def set_head(on: bool) -> None:
        model.greedy_head = head if on else None

    def set_attention(on: bool) -> None:
        engine_module.is_accelerated = is_accelerated if on else (lambda m: False)
    return {"head": set_head, "attention": set_attention}[part]


def measure(model, concurrency: int, rounds: int, part: str) -> dict:
    switch = _toggle(model, part)
    rates = {"with": [], "without": []}
    tokens = {}
    for _ in range(rounds + 1):  # the first round warms both up and is not counted
        for name in rates:
            switch(name == "with")
            tokens[name], rate = run(model, concurrency)
            rates[name].append(rate)
    switch(True)
    if part == "head" and tokens["with"] != tokens["without"]:
        raise SystemExit(f"the screened head chose other tokens than full logits at concurrency {concurrency}")
    rates = {n: r[1:] for n, r in rates.items()}
    ratios = [a / b for a, b in zip(rates["with"], rates["without"])]
    return {"part": part, "tok_s_median": {n: statistics.median(r) for n, r in rates.items()}, "tok_s": rates,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def report(res: dict) -> str:
    lines = ["# Serving engine: its fast paths against the engine without them", "", f"Command: `{res['command']}`",
             "", f"Model `{res['model']}`; {res['threads']} threads; {res['rounds']} alternating rounds after a "
             f"warm-up; load average {res['loadavg']} at the end.", "",
             "| part | configuration | concurrent sequences | without tok/s (median) | with tok/s (median) | "
             "speed ratio, median (min-max) |", "|---|---|---|---|---|---|"]
    for r in res["cases"]:
        t = r["tok_s_median"]
        lines.append(f"| {PARTS[r['part']]} | {r['config']} | {r['concurrency']} | {t['without']:.1f} | "
                     f"{t['with']:.1f} | {r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    lines += ["", "Each round runs the same greedy batch (16-token prompts, 32 new tokens each, all requests added at "
              "once) without the part, then with it; with and without the screened head the tokens were identical "
              "in every case."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--configs", default="bf16,int4,fp32", help="comma-separated: fp32, bf16, int8, int4")
    p.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[8, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parts", default="head,attention", help="comma-separated: head, attention")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = []
    for config in args.configs.split(","):
        quant = config if config.startswith("int") else None
        model = load_model(args.model, dtype=DTYPES["bf16" if quant else config], progress=False)
        if quant:
            from ernie45.quant import quantize_model

            quantize_model(model, quant, "rtn", progress=False)
        touch(model)
        fast.accelerate(model)
        if getattr(model, "greedy_head", None) is None:
            raise SystemExit("this model has no screened greedy head (kernels unavailable or a small head)")
        for part in args.parts.split(","):
            for c in args.concurrency:
                cases.append({"config": config, "concurrency": c, **measure(model, c, args.rounds, part)})
                print(part, config, c, f"{cases[-1]['ratio_median']:.2f}x", flush=True)
        del model
    res = {"command": " ".join(["python bench/serve_ab.py", *argv]), "model": str(args.model),
           "threads": args.threads, "rounds": args.rounds, "loadavg": [round(v, 2) for v in os.getloadavg()],
           "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_ab.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "serve_ab.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
