"""Per-rank peak RSS while loading a sharded model under torchrun, against the planner's per-GPU weights.

Writes the ~1.6 GB bf16 checkpoint of bench/load_memory.py once, then for each plan launches
`torchrun --nproc-per-node TPxEP` with a worker that loads its shard with `load_model(transform=plan)`
and reports VmHWM (its address space's peak RSS) before and after loading, and its weight bytes. The
planner's prediction is `Placement(cfg, Workload("bf16")).stage_weights(Layout(tp, ep))`.
Output: bench/results/dist_load_memory.json and .md.

    python bench/dist_load_memory.py [--dir /tmp/ernie45-load-bench] [--keep]
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


def run_plan(path: Path, tp: int, ep: int) -> list[dict]:
    from ernie45.config import ModelConfig
    from ernie45.plan_parallel import Layout, Placement, Workload

    (stage,) = Placement(ModelConfig.from_file(path), Workload(scheme="bf16")).stage_weights(Layout(tp=tp, ep=ep))
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
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = ap.parse_args()
    if not (args.dir / "model.safetensors").exists():
        make_checkpoint(args.dir)
    file_bytes = (args.dir / "model.safetensors").stat().st_size
    rows = [r for tp, ep in PLANS for r in run_plan(args.dir, tp, ep)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dist_load_memory.json").write_text(json.dumps({"checkpoint_bytes": file_bytes, "ranks": rows}, indent=2))
    lines = [f"Checkpoint: {file_bytes / 1e9:.3f} GB bf16 (bench/load_memory.py config), loaded as bf16.", "",
             "| tp | ep | rank | weights on rank | planner per-GPU weights | peak RSS growth during load | growth / weights |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        growth = r["rss_peak"] - r["rss_before_load"]
        lines.append(f"| {r['tp']} | {r['ep']} | {r['rank']} | {r['weight_bytes'] / 1e6:.1f} MB | "
                     f"{r['planner_weight_bytes'] / 1e6:.1f} MB | {growth / 1e6:.1f} MB | {growth / r['weight_bytes']:.3f} |")
    (RESULTS / "dist_load_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
