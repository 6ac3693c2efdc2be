"""The GPU catalogue of the planner (``ernie45/data/gpus.json``) and GPU names as users write them.

Owns: loading the catalogue into :class:`Gpu` rows, matching ``H100``, ``h100-sxm``, ``A100 80GB``,
``RTX4090`` ... case- and punctuation-insensitively, the GiB / GB labels the reports print, and the
memory budget the planner fills on one GPU.

Two fractions stand between a card's memory and the planner's budget, and they are kept apart:

* ``usable_fraction`` (catalogue, per GPU) is what the platform lets a GPU program allocate at all:
  1.0 for discrete cards, about 3/4 for Apple unified memory (macOS's GPU wired-memory limit).
* ``gpu_memory_utilization`` (per request, default :data:`DEFAULT_GPU_MEMORY_UTILIZATION`) is the share
  of that a serving engine lets itself fill, as vLLM's ``gpu_memory_utilization`` (default 0.9) does;
  SGLang's ``mem_fraction_static`` (about 0.8-0.88 by default) is the same idea for the weights and
  the KV pool alone. The rest is headroom the planner cannot see: other processes on the GPU,
  fragmentation the caching allocator cannot hand back, and the error of the engine's own memory
  profiling. The planner's own overhead term (CUDA
  context, NCCL buffers, cuBLAS workspaces, CUDA graphs; ``ernie45.plan.overhead_bytes``) is counted
  *inside* the budget, as vLLM counts non-torch memory inside its share.

A name that is a prefix of several entries resolves only when they all have the same memory (``H100`` is
written for the SXM part; PCIe has the same 80 GB); ``A100`` is refused because 40 GB and 80 GB differ
and the answer would depend on the guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

GIB, GB = 1 << 30, 10**9
# vLLM's default gpu_memory_utilization (EngineArgs): the share of a GPU the engine plans to fill.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
_VENDOR_WORDS = ("nvidia", "geforce", "amd", "instinct", "apple")


@dataclass(frozen=True)
class Gpu:
    """One catalogued accelerator; ``usable_bytes`` is what a GPU program may allocate on it."""

    name: str
    memory_bytes: int
    bandwidth_gbs: float
    vendor_memory: str = ""
    memory_basis: str = ""
    usable_fraction: float = 1.0
    source: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_fraction)

    def budget_bytes(self, utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> int:
        """Bytes the planner lets one GPU fill: ``usable_bytes x utilization`` (see the module docstring)."""
        check_utilization(utilization)
        return int(self.usable_bytes * utilization)

    @property
    def memory_label(self) -> str:
        return memory_label(self.memory_bytes)

    def to_dict(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "memory_label": self.memory_label,
                "usable_bytes": self.usable_bytes, "usable_fraction": self.usable_fraction,
                "vendor_memory": self.vendor_memory, "memory_basis": self.memory_basis,
                "bandwidth_gbs": self.bandwidth_gbs, "source": self.source}


def check_utilization(utilization: float) -> None:
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {utilization}); "
                         f"vLLM's default is {DEFAULT_GPU_MEMORY_UTILIZATION}")


def memory_label(nbytes: int) -> str:
    """``'79.65 GiB (85.52 GB)'``: binary and decimal units, each labelled as what it is."""
    return f"{nbytes / GIB:.2f} GiB ({nbytes / GB:.2f} GB)"


@lru_cache(maxsize=1)
def catalogue() -> tuple[Gpu, ...]:
    raw = json.loads(resources.files("ernie45").joinpath("data/gpus.json").read_text())
    return tuple(Gpu(name=g["name"], memory_bytes=int(g["memory_bytes"]), bandwidth_gbs=float(g["bandwidth_gbs"]),
                     vendor_memory=g["vendor_memory"], memory_basis=g["memory_basis"],
                     usable_fraction=float(g.get("usable_fraction", 1.0)), source=g["source"],
                     aliases=tuple(g.get("aliases", ()))) for g in raw["gpus"])


def _norm(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for word in _VENDOR_WORDS:
        key = key.removeprefix(word)
    return key


def find_gpu(name: str) -> Gpu:
    """The catalogue entry a user means by ``name``; raises ValueError naming the choices otherwise."""
    key = _norm(name)
    exact = [g for g in catalogue() if key in {_norm(a) for a in (g.name, *g.aliases)}]
    if exact:
        return exact[0]
    near = [g for g in catalogue() if key and any(_norm(a).startswith(key) for a in (g.name, *g.aliases))]
    if near and len({g.memory_bytes for g in near}) == 1:
        return near[0]
    names = ", ".join(g.name for g in (near or catalogue()))
    why = "is ambiguous (the memory differs)" if near else "is not in the catalogue"
    raise ValueError(f"GPU {name!r} {why}; write one of: {names}")
