"""A/B of two versions of the decode kernels in one process, alternating call by call.

On a shared machine the same measurement moves by +-30% from one minute to the next, so two versions timed
in separate runs cannot be told apart by less than that. Here both libraries are loaded side by side and
every round times one sweep of each, back to back, over the same weights (far more than the last-level
cache, so every sweep reads them from memory); the median of the per-round ratios is robust to the drift.
Outputs must be bit-identical between the versions (checked) unless --allow-different.

    python bench/kernel_ab.py [--base REV] [--other DIR] [--rounds 15] [--threads 2] [--rows 1] [--float] [--out DIR]

base: the kernel sources at git revision REV (default HEAD); other: a kernels directory (default the
working tree's ernie45/kernels). Measured: `ernie45_gemv` on cold int4 weights of the bench model's
shapes (q/k/v rows 2560 x 1024, an expert's down 1024 x 256) for each count of activation rows in --rows
(1: decode; 32: a serving batch; 512: a prefill; above 1 also int8 2560 x 1024; with --float bf16 and fp32
2560 x 1024 at up to 64 rows, and bf16 experts in the batches below), `ernie45_moe_token`, one token through top-6 of 64 int4
experts (1024 x 256 each) per layer, over 7 layers, and for each of --rows from 2 to 64 `ernie45_moe_tokens`,
a decode batch of that many tokens through the same experts. Writes kernel_ab.json and .md; rates are weight
bytes per second (with many rows the kernels are bound by compute, not by the weights' bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ernie45 import kernels  # noqa: E402
from ernie45.quant.formats import get_format, quantize_rtn  # noqa: E402

GEMV_SHAPES = ((2560, 1024), (1024, 256))  # (N, K)
MOE = dict(E=64, D=1024, F=256, k=6, layers=7)


def build(src: Path, out: Path) -> ctypes.CDLL:
    flags = kernels.ISA_FLAGS[kernels.isa()][1]
    cmd = ["gcc", "-O3", *flags, "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", str(src / "decode.c"),
           "-o", str(out), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"compiling {src}: {done.stderr[:800]}")
    lib = ctypes.CDLL(str(out))
    lib.ernie45_gemv.restype = lib.ernie45_moe_token.restype = lib.ernie45_moe_tokens.restype = None
    lib.moe_tokens_takes_max_rows = "int max_rows" in (src / "moe.c").read_text()
    return lib


def sources_at(rev: str, into: Path) -> Path:
    for f in ("decode.c", "gemv.c", "moe.c", "head.c"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:ernie45/kernels/{f}"], capture_output=True,
                              text=True, check=True).stdout
        (into / f).write_text(text)
    return into


FLOATS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def int4(rows: int, cols: int, lead: int | None = None, fmt: str = "int4") -> kernels.Weights:
    """Random weights in `fmt` (int4 g128 by default; int8; or the float kinds bf16 / fp32)."""
    if fmt in FLOATS:
        w = torch.randn((lead or 1) * rows, cols).to(FLOATS[fmt])
        return kernels.Weights(FLOATS[fmt], w.view(lead, rows, cols) if lead else w, cols)
    q = quantize_rtn(torch.randn((lead or 1) * rows, cols), get_format(fmt), 128 if fmt == "int4" else None)
    view = (lambda t: t.view(lead, rows, -1)) if lead else (lambda t: t)
    zeros = view(q.zeros) if getattr(q, "zeros", None) is not None else None
    return kernels.Weights(fmt, view(q.qweight), cols, view(q.scales), zeros, q.group_size)


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def gemv_case(N: int, K: int, threads: int, sweep_bytes: float, M: int = 1, fmt: str = "int4"):
    """(sweep(lib) -> output, bytes per sweep) for enough N x K int4 (int8, bf16, fp32) weights to fill
    sweep_bytes (divided by M: many rows make a sweep compute-bound), each times M activation rows."""
    if fmt in FLOATS:  # float weights stay memory-bound up to 4 rows: size the sweep by their own bytes
        count = int(sweep_bytes / min(M, 4) // (N * K * FLOATS[fmt].itemsize))
    else:
        count = int(sweep_bytes / M // (N * K // 2))
    ws = [int4(N, K, fmt=fmt) for _ in range(max(2, count))]
    x, y = torch.randn(len(ws), M, K), torch.empty(len(ws), M, N)
    xp, xs = torch.empty(M * K), torch.empty(M * K)

    def sweep(lib):
        for i, w in enumerate(ws):
            lib.ernie45_gemv(ctypes.byref(w.view), _p(x[i]), M, K, N, _p(y[i]), _p(xp), _p(xs), threads)
        return y.clone()
    return sweep, sum(w.nbytes for w in ws)


def moe_tokens_case(threads: int, tokens: int = 32, fmt: str = "int4"):
    """A decode batch: `tokens` tokens through top-k experts of each layer's int4 (or `fmt`) stacks (at most 64
    rows per expert, so versions before moe_tokens took a row limit run it too); bytes = the experts it reads,
    each layer's distinct ones."""
    E, D, F, k, L = (MOE[n] for n in ("E", "D", "F", "k", "layers"))
    stacks = [(int4(F, D, E, fmt), int4(F, D, E, fmt), int4(D, F, E, fmt)) for _ in range(L)]
    gen = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(L):
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)])  # [T, k]
        tok = torch.arange(tokens).repeat_interleave(k)
        order = torch.argsort(ids.flatten(), stable=True)
        pairs.append((ids.flatten()[order].contiguous(), tok[order].contiguous()))
    coef, x = torch.rand(tokens * k, generator=gen), torch.randn(tokens, D, generator=gen)
    y = torch.zeros(L, tokens, D)
    R = tokens * k  # scratch for every pair (enough for versions that asked for 64 rows of one expert)
    X, Y, G, U = torch.empty(R * D), torch.empty(R * D), torch.empty(R * F), torch.empty(R * F)
    xp, xs = torch.empty(R * max(D, F)), torch.empty(R * max(D, F))
    (wgu, sgu), (wd, sd) = stacks[0][0].expert_strides(), stacks[0][2].expert_strides()

    def sweep(lib):
        y.zero_()
        for i, (g, u, d) in enumerate(stacks):
            ids, tok = pairs[i]
            rows = (64,) if lib.moe_tokens_takes_max_rows else ()
            lib.ernie45_moe_tokens(ctypes.byref(g.view), ctypes.byref(u.view), ctypes.byref(d.view), ctypes.c_long(wgu),
                                   ctypes.c_long(sgu), ctypes.c_long(wd), ctypes.c_long(sd), _p(ids), _p(tok), _p(coef),
                                   len(ids), *rows, _p(x), D, F, _p(y[i]), _p(X), _p(G), _p(U), _p(Y), _p(xp), _p(xs),
                                   1, threads)
        return y.clone()
    used = sum(len(ids.unique()) for ids, _ in pairs)  # each layer reads its own distinct experts
    return sweep, used * sum(w.nbytes for w in stacks[0]) // E


def moe_case(threads: int):
    """One token through top-k experts of each layer's int4 stacks; bytes = the selected experts'."""
    E, D, F, k, L = (MOE[n] for n in ("E", "D", "F", "k", "layers"))
    stacks = [(int4(F, D, E), int4(F, D, E), int4(D, F, E)) for _ in range(L)]
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randperm(E, generator=gen)[:k].sort().values for _ in range(L)]
    coef, x, y = torch.rand(k, generator=gen), torch.randn(D, generator=gen), torch.zeros(L, D)
    h, xp, xs = torch.empty(k * F), torch.empty(max(D, F) + k * F), torch.empty(max(D, F) + k * F)
    (wgu, sgu), (wd, sd) = stacks[0][0].expert_strides(), stacks[0][2].expert_strides()

    def sweep(lib):
        y.zero_()
        for i, (g, u, d) in enumerate(stacks):
            lib.ernie45_moe_token(ctypes.byref(g.view), ctypes.byref(u.view), ctypes.byref(d.view), ctypes.c_long(wgu),
                                  ctypes.c_long(sgu), ctypes.c_long(wd), ctypes.c_long(sd), _p(ids[i]), _p(coef), k,
                                  _p(x), D, F, _p(y[i]), _p(h), _p(xp), _p(xs), 1, threads)
        return y.clone()
    per_expert = sum(w.nbytes for w in stacks[0]) // E
    return sweep, L * k * per_expert


def compare(sweep, nbytes: int, libs: dict, rounds: int, allow_different: bool) -> dict:
    outs = {name: sweep(lib) for name, lib in libs.items()}  # also the warm-up
    base, other = outs.values()
    identical = torch.equal(base, other)
    if not identical and not allow_different:
        raise SystemExit("the two kernel versions give different results (--allow-different to time them anyway)")
    times = {name: [] for name in libs}
    for _ in range(rounds):
        for name, lib in libs.items():
            t0 = time.perf_counter()
            sweep(lib)
            times[name].append(time.perf_counter() - t0)
    a, b = (times[n] for n in libs)
    ratios = [ta / tb for ta, tb in zip(a, b)]  # > 1: other is faster
    return {"bytes": nbytes, "bit_identical": identical,
            "ms_median": {n: 1e3 * statistics.median(t) for n, t in times.items()},
            "gb_s": {n: {"best": nbytes / min(t) / 1e9, "median": nbytes / statistics.median(t) / 1e9}
                     for n, t in times.items()},
            "speed_ratio_median": statistics.median(ratios), "speed_ratio_min": min(ratios),
            "speed_ratio_max": max(ratios)}


def report(res: dict) -> str:
    lines = ["# Kernel A/B in one process", "", f"Command: `{res['command']}`", "",
             f"base = `{res['base']}`, other = `{res['other']}`; kernels built for {res['isa']}; {res['threads']} "
             f"threads; {res['rounds']} alternating rounds; load average {res['loadavg']} at the end.", "",
             "| case | MB per sweep | base ms (GB/s), median | other ms (GB/s), median | other / base speed, median "
             "(min-max) | bit-identical |", "|---|---|---|---|---|---|"]
    for name, r in res["cases"].items():
        g, ms = r["gb_s"], r["ms_median"]
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {ms['base']:.2f} ({g['base']['median']:.2f}) | "
                     f"{ms['other']:.2f} ({g['other']['median']:.2f}) | "
                     f"{r['speed_ratio_median']:.3f} ({r['speed_ratio_min']:.2f}-{r['speed_ratio_max']:.2f}) | "
                     f"{'yes' if r['bit_identical'] else 'no'} |")
    lines += ["", "Each round times one sweep of base, then one of other, over the same cold weights; the ratio is "
              "base time / other time per round (> 1: other is faster)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD", help="git revision of the base kernel sources (default HEAD)")
    p.add_argument("--other", type=Path, default=ROOT / "ernie45" / "kernels",
                   help="directory of the other kernel sources (default: the working tree's)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep-mb", type=float, default=64, help="int4 bytes per gemv sweep (default 64: twice a large "
                   "last-level cache, so every sweep reads from memory)")
    p.add_argument("--rows", type=lambda v: [int(r) for r in v.split(",")], default=[1],
                   help="comma-separated activation rows per gemv call (default 1: decode; e.g. 1,32,512)")
    p.add_argument("--float", action="store_true", help="also bf16 and fp32 weights (2560 x 1024) at each of --rows "
                   "up to 64")
    p.add_argument("--allow-different", action="store_true", help="time versions whose outputs differ")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        libs = {"base": build(sources_at(args.base, tmp / "base"), tmp / "base.so"),
                "other": build(args.other, tmp / "other.so")}
        cases = {f"gemv int4 {N} x {K}" + (f", {M} rows" if M > 1 else ""):
                 gemv_case(N, K, args.threads, args.sweep_mb * 1e6, M) for M in args.rows for N, K in GEMV_SHAPES}
        cases[f"moe_token int4 top-{MOE['k']} of {MOE['E']} ({MOE['D']} x {MOE['F']}), {MOE['layers']} layers"] = \
            moe_case(args.threads)
        for M in (m for m in args.rows if m > 1):  # int8 in tiles too
            N, K = GEMV_SHAPES[0]
            cases[f"gemv int8 {N} x {K}, {M} rows"] = gemv_case(N, K, args.threads, args.sweep_mb * 1e6, M, "int8")
        for M in (m for m in args.rows if args.float and m <= kernels.MAX_ROWS):  # bf16 and fp32 weights
            N, K = GEMV_SHAPES[0]
            for fmt in FLOATS:
                cases[f"gemv {fmt} {N} x {K}, {M} rows"] = gemv_case(N, K, args.threads, args.sweep_mb * 1e6, M, fmt)
        for M in (m for m in args.rows if 1 < m <= 64):  # a decode batch of M tokens through the experts
            for fmt in ("int4", "bf16") if args.float else ("int4",):
                cases[f"moe_tokens {fmt}, {M} tokens x top-{MOE['k']} of {MOE['E']}, {MOE['layers']} layers"] = \
                    moe_tokens_case(args.threads, M, fmt)
        results = {name: compare(sweep, nbytes, libs, args.rounds, args.allow_different)
                   for name, (sweep, nbytes) in cases.items()}
    res = {"command": "python bench/kernel_ab.py " + " ".join(argv), "base": args.base, "other": str(args.other),
           "isa": kernels.isa(), "threads": args.threads, "rounds": args.rounds,
           "loadavg": [round(v, 2) for v in os.getloadavg()], "cases": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_ab.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "kernel_ab.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
