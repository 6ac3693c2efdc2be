"""Worker for tests/test_distributed.py, run under torchrun.

Loads the checkpoint sharded by the plan, then writes from rank 0: fp32 logits of fixed ids, 32 greedy
tokens from the reference loop, and every rank's weight bytes when loaded in bf16.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ernie45.distributed import ParallelPlan, init_parallel, shutdown
from ernie45.generation import GenerationConfig, generate
from ernie45.weights import load_model

IDS = torch.tensor([[1, 5, 9, 14, 77, 3, 42, 8, 60, 21, 2, 98]])

path, tp, ep, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
plan = init_parallel(tp, ep, timeout_s=60)
model = load_model(path, dtype=torch.float32, transform=plan)
with torch.no_grad():
    logits = model(IDS)
tokens = generate(model, [1, 5, 9, 14], GenerationConfig(max_new_tokens=32, stop_token_ids=()))
bf16 = load_model(path, dtype=torch.bfloat16, transform=ParallelPlan(tp, ep, plan.rank, plan.tp_group, plan.world_group))
mine = torch.tensor([sum(p.numel() * p.element_size() for p in bf16.parameters())])
every = [torch.zeros_like(mine) for _ in range(tp * ep)]
dist.all_gather(every, mine)
if plan.rank == 0:
    save_file({"logits": logits.contiguous(), "tokens": torch.tensor(tokens), "bf16_bytes": torch.cat(every)}, out)
shutdown()
