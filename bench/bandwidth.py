"""The machine's measured memory read bandwidth: the denominator of every decode roofline in bench/.

Decoding one token streams every active weight once, so bytes-per-token / read-bandwidth is the
fastest a batch-1 decode step can be. The bandwidth is measured the way a weight is read: `torch.sum`
over a contiguous fp32 tensor much larger than the last-level cache, with the thread count the
benchmark uses (2 threads do not saturate a server's memory system; what matters is what *these*
threads can pull). Best of several passes: the machine is shared, and the best pass is the least
disturbed one. The tensor is filled with ones, not left empty, so every page is really mapped.

    python bench/bandwidth.py [--threads 2] [--gbytes 1.5]   # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def read_bandwidth(threads: int, gbytes: float = 1.5, repeats: int = 7) -> dict:
    """Best-of-`repeats` GB/s (1e9 bytes/s) of a full read of a `gbytes` fp32 tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gbytes * 1e9) // 4, dtype=torch.float32)
    x.sum()  # first pass: page-in and thread-pool start-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * x.element_size()
    return {"read_gb_s": nbytes / min(times) / 1e9, "median_gb_s": nbytes / sorted(times)[len(times) // 2] / 1e9,
            "tensor_bytes": nbytes, "threads": threads, "repeats": repeats, "method": "torch.sum over fp32, best pass"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gbytes", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(json.dumps(read_bandwidth(a.threads, a.gbytes, a.repeats)))


if __name__ == "__main__":
    main()
