"""Where one batch-1 decoded token's time goes on the fast path, and how fast each part reads its bytes.

    python bench/decode_profile.py [--model DIR] [--dtype bf16] [--quant int4] [--threads 2]
                                   [--tokens 64] [--out bench/results]

writes decode_profile[_QUANT].json and .md. Per decoded token (mean over --tokens greedy steps after a
16-token prompt and a warm-up):
- the trunk, split into the phases of the one-call decode step (kernels.DECODE_PHASES, measured inside C by
  decode.c's phase clock: thread 0's wall time between the barriers that end each phase, summed over layers);
- the head, part by part as greedy_head.GreedyHead runs it: final norm, int8 screen (one C pass), candidate
  pick, exact recompute of the candidates;
- the rest: Python and torch around those calls (a generate loop's per-token time, with trunk, norm and head
  as separate calls like the split loop, minus trunk and head);
- the same generate loop with trunk, norm and head in one C call (Decoder.greedy_step, what generation uses),
  and how much faster that is.
The split loop and both generate loops run back to back --rounds times and the fastest run of each is kept,
so `rest` is the difference of two least-disturbed runs (it can come out negative on a noisy host).
Each part that streams weights lists the bytes it reads per token (as stored: codes, scales, zeros; routed
experts: the selected ones, counted per token from the router's choices) and its read rate, next to
torch.sum's fp32 read rate measured in the same run (bench/bandwidth.py). A part far below that rate is
where the time is lost. Shared machines are noisy: compare the parts of one run, not runs.
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from bandwidth import read_bandwidth  # noqa: E402
from speed import cpu_info  # noqa: E402

from ernie45 import fast, kernels  # noqa: E402
from ernie45.cache import KVCache  # noqa: E402
from ernie45.fast_decode import weights_of  # noqa: E402
from ernie45.layers import MLP  # noqa: E402
from ernie45.weights import load_model  # noqa: E402

SCRATCH = Path(os.environ.get("ERNIE45_BENCH_DIR", "/tmp/ernie45-bench"))
PROMPT = 16
HEAD_PARTS = ("final_norm", "head_screen", "head_candidates", "head_exact")


def phase_bytes(model, pos: int, experts_per_token: dict[int, int]) -> dict[str, float]:
    """Bytes each trunk phase reads for one token at position `pos` (weights as stored, K/V read by
    attention). experts_per_token: layer -> routed experts run (top-k)."""
    cfg, out = model.config, dict.fromkeys(kernels.DECODE_PHASES, 0.0)
    act = model.model.embed_tokens.weight.element_size()
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        out["norm_qkv"] += sum(weights_of(getattr(attn, n)).nbytes for n in ("q_proj", "k_proj", "v_proj"))
        out["attention"] += 2 * (pos + 1) * cfg.kv_dim * act
        out["o_proj_norm"] += weights_of(attn.o_proj).nbytes
        if isinstance(mlp, MLP):
            out["dense_gate_up"] += weights_of(mlp.gate_proj).nbytes + weights_of(mlp.up_proj).nbytes
            out["dense_down"] += weights_of(mlp.down_proj).nbytes
            continue
        E, k = mlp.gate.weight.shape[0], experts_per_token[i]
        out["router"] += mlp.gate.weight.numel() * 4
        ex = mlp.experts
        out["experts_gate_up"] += k * (weights_of(ex, "gate_proj").nbytes + weights_of(ex, "up_proj").nbytes) / E
        out["experts_down"] += k * weights_of(ex, "down_proj").nbytes / E
        if mlp.shared_experts is not None:
            sh = mlp.shared_experts
            out["shared_gate_up"] += weights_of(sh.gate_proj).nbytes + weights_of(sh.up_proj).nbytes
            out["shared_down"] += weights_of(sh.down_proj).nbytes
    return out


@torch.no_grad()
def profile(model, tokens: int) -> dict:
    """Mean seconds per token of every part (trunk phases, head parts, the rest) over `tokens` steps."""
    trunk, head = model.model, model.greedy_head
    decoder = trunk.__dict__.get("_decoder")
    if decoder is None or head is None or head.rows is None:
        raise SystemExit("the fast decode step or the C greedy head is not installed here "
                         f"(kernels: {kernels.unavailable_reason() or 'available'}); nothing to profile")
    cfg, dtype = model.config, trunk.embed_tokens.weight.dtype
    cache = KVCache(cfg, 1, PROMPT + tokens + 1, dtype, "cpu", num_layers=cfg.num_hidden_layers)
    hidden = trunk(torch.arange(100, 100 + PROMPT)[None], torch.arange(PROMPT)[None], cache)
    token = int(head(trunk.norm(hidden[0, -1:]))[0])
    prof = torch.zeros(len(kernels.DECODE_PHASES), dtype=torch.float64)
    parts = dict.fromkeys(HEAD_PARTS, 0.0)
    candidates = 0
    for pos in range(PROMPT, PROMPT + tokens):
        h = decoder.step(token, pos, cache, prof)[0, 0]
        t1 = time.perf_counter()
        x = trunk.norm(h[None])[0]
        t2 = time.perf_counter()
        a, b, floor = head.screen(x.float())
        t3 = time.perf_counter()
        cand = kernels.head_candidates(a, b, floor, out=head._buffers[2])
        t4 = time.perf_counter()
        token = kernels.head_exact(head.rows, cand, x)
        t5 = time.perf_counter()
        for name, dt in zip(HEAD_PARTS, (t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[name] += dt
        candidates += cand.numel()
    out = {name: float(v) / tokens for name, v in zip(kernels.DECODE_PHASES, prof)}
    out.update({name: v / tokens for name, v in parts.items()})
    out["mean_candidates"] = candidates / tokens
    return out


def whole_token_seconds(model, tokens: int, fused: bool = True) -> float:
    """Per-token seconds of the real generate loop (greedy, same prompt), the first token excluded. fused=False
    declines the one-call greedy step (Decoder.greedy_step), so trunk, norm and head run as separate calls."""
    from ernie45.bench import decode_run

    if not fused:
        model.model.greedy_step = lambda *args: None  # an instance attribute: generate finds it first
    try:
        out, _, rest = decode_run(model, list(range(100, 100 + PROMPT)), tokens + 1)
    finally:
        if not fused:
            del model.model.greedy_step
    return rest / (len(out) - 1)


def routed_experts(model) -> dict[int, int]:
    return {i: layer.mlp.k for i, layer in enumerate(model.model.layers) if not isinstance(layer.mlp, MLP)}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], progress=False)
    if args.quant:
        from ernie45.quant import quantize_model

        quantize_model(model, args.quant, "rtn", progress=False)
    fast.accelerate(model)
    bw_before = read_bandwidth(args.threads, args.bw_gbytes)["read_gb_s"]
    whole_token_seconds(model, 4)  # warm-up: kernel build, caches, allocator
    profile(model, 4)
    # alternate the split loop and the real generate loop; keep the least disturbed run of each
    runs = [(profile(model, args.tokens), whole_token_seconds(model, args.tokens),
             whole_token_seconds(model, args.tokens, fused=False)) for _ in range(args.rounds)]
    times = min((r[0] for r in runs), key=lambda t: sum(v for k, v in t.items() if k != "mean_candidates"))
    fused = min(r[1] for r in runs)
    whole = min(r[2] for r in runs)  # the split loop makes the separate calls: `rest` is taken against them
    fused_ratio = statistics.median(r[2] / r[1] for r in runs)  # per round: both loops back to back
    bw = max(bw_before, read_bandwidth(args.threads, args.bw_gbytes)["read_gb_s"])
    nbytes = phase_bytes(model, PROMPT + args.tokens // 2, routed_experts(model))
    head = model.greedy_head
    nbytes["head_screen"] = head.q.numel() + 4 * (3 * head.scale.numel())  # codes, scale, sum|q|; a and b written
    nbytes["head_exact"] = times.pop("mean_candidates") * head.weight.shape[1] * head.weight.element_size()
    rows = []
    for name, sec in times.items():
        b = nbytes.get(name, 0.0)
        rows.append({"part": name, "ms": sec * 1e3, "share": sec / whole, "bytes": b,
                     "gb_s": b / sec / 1e9 if b and sec else None,
                     "of_read_rate": b / sec / 1e9 / bw if b and sec else None})
    rest = whole - sum(times.values())
    rows.append({"part": "rest (Python, torch)", "ms": rest * 1e3, "share": rest / whole, "bytes": 0.0,
                 "gb_s": None, "of_read_rate": None})
    cpu, family, features = cpu_info()
    total_bytes = sum(r["bytes"] for r in rows)
    return {"command": "python bench/decode_profile.py " + " ".join(args.argv), "model": str(args.model),
            "dtype": args.dtype, "quant": args.quant, "threads": args.threads, "tokens": args.tokens,
            "rounds": args.rounds,
            "isa": kernels.isa(), "cpu": cpu, "cpu_family": family, "cpu_features": features,
            "torch": torch.__version__, "loadavg": [round(v, 2) for v in os.getloadavg()],
            "read_gb_s": bw, "token_ms": whole * 1e3, "decode_tok_s": 1 / whole, "bytes_per_token": total_bytes,
            "fused_token_ms": fused * 1e3, "fused_decode_tok_s": 1 / fused, "fused_speedup_median": fused_ratio,
            "token_read_rate_gb_s": total_bytes / whole / 1e9,
            "mean_head_candidates": nbytes["head_exact"] / (head.weight.shape[1] * head.weight.element_size()),
            "parts": rows}


def report(res: dict) -> str:
    lines = [f"# Where a decoded token's time goes ({res['dtype']}{', ' + res['quant'] if res['quant'] else ''})", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['cpu']} ({res['cpu_family']}; {', '.join(res['cpu_features'])}); kernels built for "
             f"{res['isa']}; {res['threads']} threads; torch {res['torch']}; load average {res['loadavg']} at the end "
             "(a shared machine: compare the parts of one run, not runs).", "",
             f"Model: `{res['model']}`. {res['tokens']} greedy tokens after a {PROMPT}-token prompt: "
             f"{res['token_ms']:.2f} ms per token ({res['decode_tok_s']:.1f} tok/s; separate calls), "
             f"{res['bytes_per_token'] / 1e6:.1f} MB read per token ({res['token_read_rate_gb_s']:.1f} GB/s overall) "
             f"against torch.sum's fp32 read rate of {res['read_gb_s']:.1f} GB/s; "
             f"{res['mean_head_candidates']:.1f} head rows recomputed exactly per token.", "",
             f"The generate loop with trunk, final norm and greedy head as separate calls (the split below): "
             f"{res['token_ms']:.2f} ms per token; with them in one C call (`Decoder.greedy_step`, what generate "
             f"uses): {res['fused_token_ms']:.2f} ms ({res['fused_decode_tok_s']:.1f} tok/s). Speed of the one "
             f"call over the separate calls: {res['token_ms'] / res['fused_token_ms']:.2f}x on the best runs, "
             f"{res['fused_speedup_median']:.2f}x as the median of {res['rounds']} rounds (the two loops back to "
             "back in each).", "",
             "| part | ms/token | share | MB/token | GB/s | of read rate |", "|---|---|---|---|---|---|"]
    for r in res["parts"]:
        if r["ms"] < 1e-4 and not r["bytes"]:
            continue  # phases this model does not have
        gb = f"{r['gb_s']:.1f}" if r["gb_s"] else "-"
        of = f"{r['of_read_rate']:.0%}" if r["of_read_rate"] else "-"
        lines.append(f"| {r['part']} | {r['ms']:.3f} | {r['share']:.1%} | {r['bytes'] / 1e6:.2f} | {gb} | {of} |")
    lines += ["", "Trunk phases are timed inside the one-call decode step (decode.c's phase clock: each phase "
              "ends with a barrier, so a phase's time includes waiting for the slower thread); head parts around "
              "each C call from Python; `rest` is the separate-calls generate loop's per-token time minus all of them. Bytes: "
              "weights as stored (codes, scales, zeros), routed experts the selected ones, the router in fp32, "
              "attention the K/V cache read at the middle position, the screen its int8 codes plus three fp32 "
              "per-row arrays, the exact part the recomputed head rows."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=SCRATCH / "bench-medium-std0.08",
                   help="checkpoint (default: bench/speed.py's random bench-medium one; create it with "
                        "`python -m ernie45 random-checkpoint DIR --like bench-medium --std 0.08`)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--quant", choices=("int8", "int4", "int2"), help="quantize in memory (round-to-nearest) first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of the split loop and generate; the "
                   "fastest of each is reported")
    p.add_argument("--bw-gbytes", type=float, default=1.5, help="size of the bandwidth probe's tensor")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)
    args.argv = argv
    if not args.model.is_dir():
        p.error(f"{args.model} is not a checkpoint directory; create one with `python -m ernie45 random-checkpoint "
                f"{args.model} --like bench-medium --std 0.08`")
    res = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "decode_profile" + (f"_{args.quant}" if args.quant else f"_{args.dtype}")
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
