"""Quantization of the embedded default model: bytes on disk vs the planner, held-out perplexity vs bf16.

Each scheme/method goes through `ernie45 quantize`'s streaming code (`quantize_checkpoint`) from the
shipped bf16 checkpoint; GPTQ calibrates on windows of the corpus' train tokens. Perplexity is
`ernie45.evaluate.perplexity` (window 256) over the first `--eval-tokens` held-out tokens, the same
tokens for every row; decode tokens/s is greedy batch-1 generation of 32 tokens after a 16-token prompt
with the reference loop, one thread, best of 3, in this same run. mixed-2bit keeps the first MoE layer's experts at int4 (`--int4-moe-layers 1`:
the model has 4 MoE layers). Output: bench/results/quant_default_model.json and .md.

    python bench/quant_default_model.py --corpus DIR [--eval-tokens 8192] [--workdir /tmp/ernie45-qdm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ernie45.config import ModelConfig
from ernie45.evaluate import perplexity
from ernie45.plan import weight_bytes
from ernie45.quant.stream import calibration_windows, quantize_checkpoint
from ernie45.train.data import load_tokens
from ernie45.weights import DEFAULT_MODEL_DIR, load_model

RESULTS = Path(__file__).parent / "results"
PROMPT = [1, 45, 210, 77, 9, 3001, 12, 640, 88, 5, 1999, 31, 700, 42, 8, 16]


def decode_tok_s(model) -> float:
    """Best of 3: greedy batch-1 decode of 32 tokens (the prefill of 16 tokens included)."""
    from ernie45.generation import GenerationConfig, generate

    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        n = len(generate(model, PROMPT, GenerationConfig(max_new_tokens=32, stop_token_ids=())))
        best = max(best, n / (time.perf_counter() - start))
    return best
RUNS = [("int8", "rtn"), ("int8", "gptq"), ("int4", "rtn"), ("int4", "gptq"), ("int2", "rtn"), ("int2", "gptq"),
        ("mixed-2bit", "rtn"), ("mixed-2bit", "gptq"), ("fp8", "rtn")]


def tensor_bytes(path: Path) -> int:
    from ernie45.safetensors_mmap import SafetensorsFile

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with SafetensorsFile(f) as r:
            total += sum(t.nbytes for t in r.tensors.values())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ernie45-qdm"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig.from_file(DEFAULT_MODEL_DIR)
    heldout = load_tokens(args.corpus, "heldout")[: args.eval_tokens].tolist()
    calib = calibration_windows(load_tokens(args.corpus, "train"), 32, 256)
    fp32 = load_model(DEFAULT_MODEL_DIR, dtype=torch.float32)
    base = perplexity(fp32, heldout, window=256)["perplexity"]
    shipped = {"tensor_bytes": tensor_bytes(DEFAULT_MODEL_DIR), "perplexity": base,
               "planner_bytes": sum(weight_bytes(cfg, "bf16", mtp=True).values())}
    rows = [{"scheme": "bf16 (shipped) as fp32", "method": "-", **shipped, "decode_tok_s": decode_tok_s(fp32)},
            {"scheme": "bf16 (shipped)", "method": "-", **shipped,
             "decode_tok_s": decode_tok_s(load_model(DEFAULT_MODEL_DIR, dtype=torch.bfloat16))}]
    for scheme, method in RUNS:
        out = args.workdir / f"{scheme}-{method}"
        start = time.perf_counter()
        quantize_checkpoint(DEFAULT_MODEL_DIR, out, scheme, method, calib if method == "gptq" else None,
                            int4_moe_layers=1, progress=False)
        seconds = time.perf_counter() - start
        model = load_model(out, dtype=torch.float32)
        ppl = perplexity(model, heldout, window=256)["perplexity"]
        speed = decode_tok_s(load_model(out, dtype=torch.bfloat16))  # bf16 activations: the CPU kernels' path
        rows.append({"scheme": scheme, "method": method, "tensor_bytes": tensor_bytes(out), "quantize_seconds":
                     round(seconds, 1), "planner_bytes": sum(weight_bytes(cfg, scheme, mtp=True, int4_moe_layers=1)
                                                             .values()), "perplexity": ppl,
                     "decode_tok_s": speed})
        print(rows[-1], flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_default_model.json").write_text(json.dumps({"eval_tokens": len(heldout) - 1, "rows": rows},
                                                                indent=2) + "\n")
    lines = [f"Embedded default model, held-out perplexity over {len(heldout) - 1:,} tokens (window 256).", "",
             "| scheme | method | tensor bytes | planner bytes | perplexity | vs bf16 | decode tok/s | vs bf16 | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    fp32_speed, bf16_speed = rows[0]["decode_tok_s"], rows[1]["decode_tok_s"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['method']} | {r['tensor_bytes']:,} | {r['planner_bytes']:,} | "
                     f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / bf16_speed:.2f}x | {r['decode_tok_s'] / fp32_speed:.2f}x |")
    (RESULTS / "quant_default_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
