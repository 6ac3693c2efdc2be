"""Per-rank peak RSS while loading a sharded model under torchrun, against the planner's per-GPU weights.

Writes the ~1.6 GB bf16 checkpoint of bench/load_memory.py once, then for each plan launches
`torchrun --nproc-per-node TPxEP` with a worker that loads its shard with `load_model(transform=plan)`
and reports VmHWM (its address space's peak RSS) before and after loading, and its weight bytes. The
planner's prediction is `Placement(cfg, Workload(SCHEME)).stage_weights(Layout(tp, ep))`.
`--scheme int4` (or int8, int2, fp8, mixed-2bit) first quantizes that checkpoint round-to-nearest
(`ernie45 quantize`, streamed) into DIR/SCHEME and measures the quantized shards instead.
Output: bench/results/dist_load_memory.json and .md (`dist_load_memory_SCHEME.*` for a quantized scheme).

    python bench/dist_load_memory.py [--dir /tmp/ernie45-load-bench] [--scheme int4] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load_memory import make_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PLANS = [(2, 1), (1, 2), (2, 2)]

WORKER = """
import json, os, sys, torch
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
from ernie45.distributed import init_parallel
from ernie45.weights import load_model
tp, ep = int(sys.argv[2]), int(sys.argv[3])
plan = init_parallel(tp, ep, 600)
before = status("VmHWM")
model = load_model(sys.argv[1], dtype=torch.bfloat16, transform=plan, progress=False)
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
with open(f"{sys.argv[4]}/rank{plan.rank}.json", "w") as f:
    json.dump({"rank": plan.rank, "rss_before_load": before, "rss_peak": peak, "weight_bytes": weights}, f)
"""


def run_plan(path: Path, tp: int, ep: int, scheme: str = "bf16") -> list[dict]:
    from ernie45.config import ModelConfig
    from ernie45.plan_parallel import Layout, Placement, Workload

    (stage,) = Placement(ModelConfig.from_file(path), Workload(scheme=scheme)).stage_weights(Layout(tp=tp, ep=ep))
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "worker.py"
        script.write_text(WORKER)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * ep),
                        "--master-addr", "127.0.0.1", "--master-port", "29517", str(script), str(path), str(tp),
                        str(ep), out], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(tp * ep)]
    for r in rows:
        r.update(tp=tp, ep=ep, planner_weight_bytes=sum(stage.gpu.values()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ernie45-load-bench"))
    ap.add_argument("--scheme", default="bf16", choices=("bf16", "int8", "int4", "int2", "fp8", "mixed-2bit"),
                    help="bf16 (as written) or a quantization scheme to quantize it to and shard instead")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = ap.parse_args()
    if not (args.dir / "model.safetensors").exists():
        make_checkpoint(args.dir)
    path, name, quant_s = args.dir, "dist_load_memory", None
    if args.scheme != "bf16":
        from ernie45.quant.stream import quantize_checkpoint

        path, name = args.dir / args.scheme, f"dist_load_memory_{args.scheme}"
        if not (path / "config.json").exists():
            quant_s = quantize_checkpoint(args.dir, path, args.scheme, progress=False)["seconds"]
    file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rows = [r for tp, ep in PLANS for r in run_plan(path, tp, ep, args.scheme)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"checkpoint_bytes": file_bytes, "scheme": args.scheme,
                                                      "quantize_seconds": quant_s, "ranks": rows}, indent=2))
    what = ("bf16 (bench/load_memory.py config), loaded as bf16." if args.scheme == "bf16" else
            f"{args.scheme}, round-to-nearest from the bf16 checkpoint of bench/load_memory.py (quantized "
            "tensors sliced as stored; embeddings, head, norms and router as bf16/fp32).")
    lines = [f"Checkpoint: {file_bytes / 1e9:.3f} GB {what}", "",
             "| tp | ep | rank | weights on rank | planner per-GPU weights | peak RSS growth during load | growth / weights |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        growth = r["rss_peak"] - r["rss_before_load"]
        lines.append(f"| {r['tp']} | {r['ep']} | {r['rank']} | {r['weight_bytes'] / 1e6:.1f} MB | "
                     f"{r['planner_weight_bytes'] / 1e6:.1f} MB | {growth / 1e6:.1f} MB | {growth / r['weight_bytes']:.3f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
