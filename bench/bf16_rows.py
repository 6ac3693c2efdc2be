"""bf16 weights against a few activation rows: the decode kernels (`kernels.gemv`) or torch's bf16 GEMM?

    python bench/bf16_rows.py [--threads 2] [--rows 1,2,4,8,16,32] [--quant int8|int4] [--out DIR]

With --quant the weights are int8/int4 (round to nearest) and the torch side is the reference route of
`QuantWeight.matmul` for bf16 activations: dequantize the weight (torch), cast it to bf16, torch's bf16 GEMM
(the evidence for `fast.QUANT_BF16_GEMM_ROWS`); results go to bf16_rows_{quant}.{json,md}.

Times both on the bench model's shapes (the tied 103,424 x 1024 head, q/k/v rows 2560 x 1024, an expert's
gate 256 x 1024 and down 1024 x 256), best of 7 sweeps each over cold copies of the weight, alternating
the two. On a CPU with bf16 hardware (AVX512_BF16, AMX) torch's GEMM runs native bf16 dot products; without
it, it is several times slower (field-notes) and `fast.prefill_linear` uses fp32 instead, so the ratio
decides `fast.NATIVE_BF16_KERNEL_ROWS` / `NATIVE_BF16_EXPERT_ROWS` only where `fast.native_bf16()`.
Writes bf16_rows.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ernie45 import fast, kernels  # noqa: E402
from ernie45.quant.formats import dequantize, get_format, quantize_rtn  # noqa: E402

SHAPES = {"head 103424 x 1024": (103424, 1024), "q/k/v 2560 x 1024": (2560, 1024),
          "expert gate 256 x 1024": (256, 1024), "expert down 1024 x 256": (1024, 256)}


def best(f, rounds: int = 7) -> float:
    f()
    t = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    return min(t)


def measure(N: int, K: int, M: int, quant: str | None = None, sweep_bytes: float = 64e6) -> dict:
    copies = max(1, int(sweep_bytes // (N * K * 2)))  # enough weights that a sweep reads from memory
    x = torch.randn(M, K).bfloat16()
    if quant:
        qs = [quantize_rtn(torch.randn(N, K) * 0.05, get_format(quant)) for _ in range(copies)]
        kw = [kernels.Weights(quant, q.qweight, K, q.scales, getattr(q, "zeros", None), q.group_size) for q in qs]
        torch_side = lambda: [F.linear(x, dequantize(q).to(torch.bfloat16)) for q in qs]  # noqa: E731
    else:
        ws = [torch.randn(N, K).bfloat16() for _ in range(copies)]
        kw = [kernels.Weights(torch.bfloat16, w, K) for w in ws]
        torch_side = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
    tk = best(lambda: [kernels.gemv(k, x).bfloat16() for k in kw]) / copies
    tt = best(torch_side) / copies
    return {"kernel_ms": tk * 1e3, "torch_ms": tt * 1e3, "torch_over_kernel_time": tt / tk}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=lambda v: [int(r) for r in v.split(",")], default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--quant", choices=("int8", "int4"), help="quantized weights against dequantize + bf16 GEMM")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if not kernels.available():
        raise SystemExit(f"the decode kernels are unavailable: {kernels.unavailable_reason()}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = {name: {str(M): measure(N, K, M, args.quant) for M in args.rows} for name, (N, K) in SHAPES.items()}
    res = {"command": " ".join(["python bench/bf16_rows.py", *(argv or sys.argv[1:])]), "threads": args.threads,
           "native_bf16": fast.native_bf16(), "cpu_bf16_flags": sorted(set(fast.NATIVE_BF16_FLAGS) & kernels.cpu_flags()),
           "results": results}
    what = (f"{args.quant} weights: decode kernels vs dequantize + torch's bf16 GEMM" if args.quant else
            "bf16 weights: decode kernels vs torch's bf16 GEMM")
    lines = [f"# {what} by activation rows", "",
             f"Command: `{res['command']}`; {args.threads} threads; bf16 hardware: "
             f"{', '.join(res['cpu_bf16_flags']) or 'none'} (`fast.native_bf16()` = {res['native_bf16']}).", "",
             "| weight | " + " | ".join(f"{M} rows" for M in args.rows) + " |", "|---|" + "---|" * len(args.rows)]
    for name, by_rows in results.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{r['kernel_ms']:.3f} / {r['torch_ms']:.3f} ({r['torch_over_kernel_time']:.2f})" for r in by_rows.values())
            + " |")
    lines += ["", "Cells: kernel ms / torch ms (torch time over kernel time: below 1, torch's GEMM is faster), best of "
              "7 sweeps over enough copies of the weight to read it from memory."]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bf16_rows_{args.quant}" if args.quant else "bf16_rows"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
