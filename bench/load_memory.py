"""Peak host RAM while loading a >= 1 GB checkpoint, against the bytes of the loaded weights.

Writes a random ERNIE-4.5-MoE checkpoint (official layout, bf16, ~1.6 GB) once, then loads it in a
fresh child process per dtype and reads the child's peak RSS (ru_maxrss) before and after
`ernie45.load_model`. Output: bench/results/load_memory.json and .md.

    python bench/load_memory.py [--dir /tmp/ernie45-load-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CONFIG = dict(model_type="ernie4_5_moe", vocab_size=32000, hidden_size=1024, intermediate_size=3072,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=2, moe_num_experts=64, moe_k=8,
              moe_intermediate_size=512, moe_num_shared_experts=0, moe_layer_start_index=1,
              tie_word_embeddings=False, torch_dtype="bfloat16")

# VmHWM (this address space's peak RSS) rather than ru_maxrss: Linux carries ru_maxrss across
# fork+exec, so a child would report its parent's peak.
CHILD = """
import json, sys, torch
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
from ernie45 import load_model
before = status("VmHWM")
model = load_model(sys.argv[1], dtype=sys.argv[2], progress=False)
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rss_before_load": before, "rss_peak": peak, "weight_bytes": weights}))
"""


def make_checkpoint(path: Path) -> int:
    import torch

    from ernie45.config import ModelConfig
    from ernie45.model import build_model, init_random
    from ernie45.weights import save_checkpoint

    model = init_random(build_model(ModelConfig.from_dict(CONFIG), dtype=torch.bfloat16))
    save_checkpoint(model, path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    r["dtype"] = dtype
    r["peak_over_weights"] = (r["rss_peak"] - r["rss_before_load"]) / r["weight_bytes"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ernie45-load-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = ap.parse_args()
    file_bytes = make_checkpoint(args.dir) if not (args.dir / "model.safetensors").exists() else \
        (args.dir / "model.safetensors").stat().st_size
    rows = [measure(args.dir, d) for d in ("bfloat16", "float32")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_memory.json").write_text(json.dumps({"checkpoint_bytes": file_bytes, "runs": rows}, indent=2))
    lines = ["| load dtype | checkpoint (bf16) | weights in RAM | peak RSS growth during load | ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        growth = r["rss_peak"] - r["rss_before_load"]
        lines.append(f"| {r['dtype']} | {file_bytes / 1e9:.3f} GB | {r['weight_bytes'] / 1e9:.3f} GB | "
                     f"{growth / 1e9:.3f} GB | {r['peak_over_weights']:.3f} |")
    (RESULTS / "load_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
