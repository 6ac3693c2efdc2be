"""How fast the decode kernels (ernie45/kernels/gemv.c) turn weights into dot products, per format.

Two figures per format, each through `kernels.gemv` with one activation row:
- compute: a 4096 x 1024 weight (2-8 MB, cache-resident after the first pass), best of many calls, in
  G weights/s, with 1 thread and with --threads: what the inner loops can do when memory is not the limit;
- stream: a weight of --stream-mb MB (far above the last-level cache) read once per call, best of a few
  calls, in GB/s of stored bytes next to torch.sum's fp32 read rate measured in the same run: how close a
  single big GEMV comes to the machine's read bandwidth.
A decode step's linears are small and many, so the whole-model figures (bench/speed.py) are lower.

    python bench/kernel_throughput.py [--threads 2] [--stream-mb 256] [--out bench/results]
writes kernel_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ernie45 import kernels  # noqa: E402
from ernie45.quant.formats import get_format, quantize_rtn  # noqa: E402

FORMATS = (("bf16", None), ("int8", None), ("int4", 128), ("int2", 64))  # (format, group)
K = 1024


def weights(fmt: str, group: int | None, rows: int) -> kernels.Weights:
    """Random rows [rows, K] in `fmt`, built in slices so the fp32 source never exists whole."""
    if fmt == "bf16":
        return kernels.Weights(torch.bfloat16, torch.randn(rows, K).to(torch.bfloat16), K)
    parts = [quantize_rtn(torch.randn(min(8192, rows - r), K), get_format(fmt), group) for r in range(0, rows, 8192)]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    zeros = cat("zeros") if getattr(parts[0], "zeros", None) is not None else None
    return kernels.Weights(fmt, cat("qweight"), K, cat("scales"), zeros, parts[0].group_size)


def best_seconds(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(threads: int, stream_mb: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, K)
    rows = {}
    for fmt, group in FORMATS:
        small = weights(fmt, group, 4096)
        compute = {}
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            compute[t] = 4096 * K / best_seconds(lambda: kernels.gemv(small, x), 200) / 1e9
        torch.set_num_threads(threads)
        per_row = small.nbytes / 4096
        big = weights(fmt, group, int(stream_mb * 1e6 / per_row))
        stream = big.nbytes / best_seconds(lambda w=big: kernels.gemv(w, x), 5) / 1e9
        rows[fmt if group is None else f"{fmt} g{group}"] = {"compute_g_weights_s": compute, "stream_gb_s": stream,
                                                              "stream_bytes": big.nbytes}
        del big
    torch.set_num_threads(threads)
    ones = torch.ones(int(stream_mb * 1e6) // 4)
    sum_gb_s = ones.numel() * 4 / best_seconds(lambda: ones.sum(), 5) / 1e9
    return {"formats": rows, "torch_sum_gb_s": sum_gb_s}


def report(res: dict) -> str:
    t = res["threads"]
    lines = ["# Decode kernel throughput (ernie45/kernels/gemv.c)", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['cpu']}; flags {', '.join(res['cpu_features'])}; kernels built for {res['isa']}; "
             f"torch {res['torch']}; load average "
             f"{res['loadavg']} at start (a shared machine: compare rows of one run, not runs).", "",
             f"| format | compute, 1 thread (G weights/s) | compute, {t} threads | stream, {t} threads (GB/s of stored "
             f"bytes) | stream / torch.sum fp32 ({res['torch_sum_gb_s']:.1f} GB/s) |", "|---|---|---|---|---|"]
    for name, r in res["formats"].items():
        c = r["compute_g_weights_s"]
        lines.append(f"| {name} | {c['1']:.1f} | {c[str(t)]:.1f} | {r['stream_gb_s']:.1f} | "
                     f"{r['stream_gb_s'] / res['torch_sum_gb_s']:.0%} |")
    lines += ["", "compute: 4096 x 1024 weight, one activation row, best of 200 calls (cache-resident); stream: "
              f"one GEMV over {res['stream_mb']} MB of stored weights, best of 5. Integer formats round the "
              "activations to int16 first (gemv.c's header); the figures include that."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stream-mb", type=int, default=256)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    if not kernels.available():
        sys.exit(f"the decode kernels are unavailable: {kernels.unavailable_reason()}")
    from speed import cpu_info  # bench/speed.py, beside this file

    cpu, family, features = cpu_info()
    res = {"command": "python bench/kernel_throughput.py " + " ".join(sys.argv[1:]), "cpu": f"{cpu} ({family})",
           "cpu_features": features, "isa": kernels.isa(), "torch": torch.__version__, "threads": args.threads,
           "stream_mb": args.stream_mb, "loadavg": [round(v, 2) for v in os.getloadavg()]}
    res.update(measure(args.threads, args.stream_mb))
    res = json.loads(json.dumps(res))  # int thread keys -> str, as in the file
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_throughput.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "kernel_throughput.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
