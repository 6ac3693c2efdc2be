"""Worker for tests/test_distributed.py's quantized cases, run under torchrun: one launch, several checkpoints.

argv: TP EP OUT_DIR CHECKPOINT... For each checkpoint (name = its directory's name) rank 0 writes
OUT_DIR/NAME.safetensors holding fp32 logits of fixed ids and 16 greedy tokens on the reference matmul
path (`ref_logits`, `ref_tokens`) and on the default CPU path (`auto_logits`, `auto_tokens`).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ernie45.distributed import init_parallel, shutdown
from ernie45.generation import GenerationConfig, generate
from ernie45.quant import set_path
from ernie45.weights import load_model

IDS = torch.tensor([[1, 5, 9, 14, 77, 3, 42, 8, 60, 21, 2, 98]])

tp, ep, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
plan = init_parallel(tp, ep, timeout_s=60)
for path in sys.argv[4:]:
    model = load_model(path, dtype=torch.float32, transform=plan)
    result = {}
    for route in ("ref", "auto"):
        set_path(model, "reference" if route == "ref" else "auto")
        with torch.no_grad():
            result[f"{route}_logits"] = model(IDS).contiguous()
        tokens = generate(model, [1, 5, 9, 14], GenerationConfig(max_new_tokens=16, stop_token_ids=()))
        result[f"{route}_tokens"] = torch.tensor(tokens)
    if plan.rank == 0:
        save_file(result, str(out / f"{Path(path).name}.safetensors"))
shutdown()
