"""Serving under torchrun: rank 0 owns HTTP and scheduling and broadcasts each step; the others follow.

Every rank holds its shard of the model and its own paged KV cache with the same block layout, so the
scheduler's block tables are valid everywhere. Per step, rank 0 sends a header
[N tokens, R requests, max blocks, rows that sample, alive] and the batch tensors over a dedicated
control group; every rank then runs `Engine.forward` on it (the model's collectives run inside), and
only rank 0 samples and updates the scheduler. A header with alive = 0 ends the followers. The control
group waits a day for the next step (an idle server is fine); a dead rank 0 still ends the followers at
once, because its sockets close.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from .distributed import DistributedError
from .engine import Engine, StepBatch

_FIELDS = ("input_ids", "positions", "slots", "seq_idx", "offsets", "block_tables", "ctx_lens")


class StepBroadcaster:
    """Rank 0's side: `engine.on_batch = StepBroadcaster(group)`; call `.stop()` when serving ends."""

    def __init__(self, group):
        self.group = group

    def __call__(self, batch: StepBatch) -> None:
        n, r = batch.input_ids.shape[1], batch.block_tables.shape[0]
        header = torch.tensor([n, r, batch.block_tables.shape[1], len(batch.sample_rows), 1])
        _bcast(header, self.group)
        for name in _FIELDS:
            _bcast(getattr(batch, name).contiguous(), self.group)
        if batch.sample_rows:
            _bcast(torch.tensor(batch.sample_rows), self.group)

    def stop(self) -> None:
        _bcast(torch.zeros(5, dtype=torch.long), self.group)


def control_group():
    """A process group for step broadcasts that tolerates long idle periods."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=1))


def follow(engine: Engine, group) -> None:
    """A follower rank: run every broadcast step until rank 0 says stop."""
    while True:
        header = _bcast(torch.zeros(5, dtype=torch.long), group)
        n, r, width, n_sample, alive = header.tolist()
        if not alive:
            return
        shapes = {"input_ids": (1, n), "positions": (1, n), "slots": (n,), "seq_idx": (n,), "offsets": (n,),
                  "block_tables": (r, width), "ctx_lens": (r,)}
        parts = {k: _bcast(torch.zeros(shapes[k], dtype=torch.long), group) for k in _FIELDS}
        rows = _bcast(torch.zeros(n_sample, dtype=torch.long), group).tolist() if n_sample else []
        engine.forward(StepBatch(**parts, sample_rows=rows, sample_reqs=[]))


def _bcast(t: torch.Tensor, group) -> torch.Tensor:
    try:
        dist.broadcast(t, src=0, group=group)
    except Exception as e:
        raise DistributedError(f"rank {dist.get_rank()}: step broadcast failed ({e}). Rank 0 probably died or "
                               "stopped; ending this rank too.") from e
    return t
