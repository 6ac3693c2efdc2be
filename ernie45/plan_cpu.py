"""Peak host memory (RSS) of one CPU process that loads a checkpoint and runs the reference generate once.

Owns the prediction :func:`cpu_generation_peak` and the measurement it is checked against
(``python -m ernie45.plan_cpu CKPT ...``: ``load_model``, then ``generation.generate`` once, reporting the
kernel's ``VmHWM``). The planner (:mod:`ernie45.plan`) counts bytes per tensor class; this module adds
what our *reference* CPU path allocates on top, read off the code, so the planner's numbers can be checked
against a real process (``tests/test_plan_validation.py``). Torch is imported only to measure.

The two peaks of the process, each ``baseline + resident + transient``:

* ``baseline``: Python, torch and ernie45 imported and torch's CPU kernels paged in, with one intra-op
  thread. Measured once (:data:`BASELINE_LOADED`, :data:`BASELINE`); the only term not derived from shapes.
* load (``load_model``): parameters are allocated one by one in their final dtype, router and correction
  bias fp32, the MTP block included (the model builds it whenever the config has one). While a parameter
  is filled, its source tensor's mmap pages are resident too (the checkpoint is assumed to be stored in the
  load dtype; routed experts are one source tensor per expert).
* generation (``generate``): the weights; ``cache.KVCache`` with K and V ``[1, S, Nkv, Dh]`` for the
  num_hidden_layers trunk layers (generate never runs the MTP block, so it allocates no MTP layer)
  plus its int64 ``slot_pos [L, 1, S]``, all allocated up front with
  ``S = prompt + new tokens``; then the largest transient of the prefill over ``T = prompt`` tokens (decode
  steps see one token and are smaller), phase by phase below.

The dominant prefill phase at long prompts is attention over the cache (``attention.attend_gqa``, which
``cache.KVCache`` calls): queries in blocks of ATTENTION_QUERY_BLOCK, each block materialising its score
matrix ``[1, Nq, Tb, S]`` at most: scores in the model dtype, an fp32 copy of them when that dtype is 16-bit
(``softmax(..., dtype=float32)`` on CPU converts first), and the fp32 softmax output; beside them the
fp32 copies of the block's queries and of the cached K/V, and the outputs of the blocks before it. The
head then sees only the last row: logits ``[1, 1, V]``.

Allocator: glibc returns blocks of 32 MiB and more (``DEFAULT_MMAP_THRESHOLD_MAX``, always mmapped) to the
OS when freed, but serves smaller blocks from its heap once its dynamic mmap threshold has risen, and keeps
the freed heap resident, fragmented by blocks of every size, so later phases hardly reuse it. The transient
is therefore the largest phase's live blocks plus the heap high-water (the largest phase's blocks under
32 MiB). With a fixed threshold (``MALLOC_MMAP_THRESHOLD_``) the process tracks the live blocks alone
(docs/planner.md, "Validation").

Shape legend: T prompt tokens, S cache slots (prompt + new), H hidden, V vocab, E experts, K top-k,
q/kv the attention widths (heads x Dh), Nq query heads, Dh head dim, I dense width, F expert width,
L cache layers, s bytes per element of the model dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .config import ModelConfig
from .plan import Tensor, kv_bytes_per_token, tensors, weight_bytes

MiB = 1 << 20
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FP32, INT64, BOOL = 4, 8, 1
MMAP_THRESHOLD_MAX = 32 * MiB  # glibc, 64-bit: blocks this large are always mmapped, freed to the OS

# VmHWM of `python -m ernie45.plan_cpu` (OMP_NUM_THREADS=1) on a 2-layer checkpoint of 68,328 bytes, prompt 8,
# 8 new tokens, in fp32 and bf16 (3 and 2 runs, spread < 0.2 MiB): right after load_model 226.4 MiB, after
# generate 234.6 (fp32) / 234.1 (bf16) MiB. x86-64, Linux 6.18, glibc, Python 3.11, torch 2.13.0+cpu; the
# command is in docs/planner.md, "Validation". Re-measure on another platform.
BASELINE_LOADED = int(226.4 * MiB)
BASELINE = int(234.5 * MiB)


# ---- resident terms ------------------------------------------------------------------------------
def loaded_weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of every parameter ``load_model(dtype=...)`` materialises (the MTP block included)."""
    if dtype == "fp32":  # not a planner scheme: every tensor, the router included, is 4 bytes
        return FP32 * sum(t.numel for t in tensors(cfg, mtp=True))
    return sum(weight_bytes(cfg, dtype, mtp=True).values())


def reference_kv_bytes(cfg: ModelConfig, max_len: int, dtype: str) -> int:
    """K and V of the reference generate's ``cache.KVCache``: every trunk layer (no MTP layer)."""
    per_token_16bit = kv_bytes_per_token(cfg, "bf16", mtp=False)  # the planner has no fp32 KV dtype
    return per_token_16bit // 2 * DTYPE_BYTES[dtype] * max_len


def slot_pos_bytes(cfg: ModelConfig, max_len: int) -> int:
    """``KVCache.slot_pos`` [L, 1, S] int64."""
    return cfg.num_hidden_layers * max_len * INT64


# ---- the load step -------------------------------------------------------------------------------
def _load_order(cfg: ModelConfig) -> list[Tensor]:
    """Parameters in ``named_parameters`` order: ``model.*`` (MTP modules included), then ``lm_head``."""
    inventory = tensors(cfg, mtp=True)
    return [t for t in inventory if t.component != "lm_head"] + [t for t in inventory if t.component == "lm_head"]


def load_transient(cfg: ModelConfig, dtype: str) -> int:
    """Peak of the load step above the finished weights: the max over parameters of (parameters allocated
    so far + this one + one source tensor's mmap pages) minus the final weight bytes."""
    s, done, peak = DTYPE_BYTES[dtype], 0, 0
    for t in _load_order(cfg):
        size = t.rows * t.cols * (FP32 if t.role == "fp32" else s)  # one source tensor (one expert)
        peak = max(peak, done + t.count * size + size)
        done += t.count * size
    return peak - done


# ---- prefill phases: the blocks live at each phase's peak, in bytes -------------------------------
ATTENTION_QUERY_BLOCK = 128  # attention.QUERY_BLOCK (this module imports no torch; a test ties the two)


def _attention(cfg: ModelConfig, T: int, S: int, s: int) -> list[int]:
    """Inside ``attend_gqa`` at the softmax of one layer's last block of queries (the widest: it sees the
    most keys)."""
    Tb = min(T, ATTENTION_QUERY_BLOCK)
    scores = cfg.num_attention_heads * Tb * S  # [1, Nq, Tb, S]
    upcast = [scores * FP32] if s != FP32 else []  # fp32 copy of 16-bit scores before the softmax
    return [T * cfg.hidden_size * s,  # the normed layer input
            T * cfg.q_dim * s, T * cfg.kv_dim * s, T * cfg.kv_dim * s,  # q, k, v after RoPE
            (T - Tb) * cfg.q_dim * s,  # the outputs of the blocks before
            Tb * cfg.q_dim * FP32, S * cfg.kv_dim * FP32,  # fp32 copies of the block's q and of K
            scores * s, *upcast, scores * FP32,  # scores, (upcast), fp32 softmax output
            Tb * S * BOOL]  # visibility mask [1, Tb, S]


def _rope(cfg: ModelConfig, T: int, s: int) -> list[int]:
    """``apply_rope`` on q: input, its fp32 copy (none in fp32), rotated copy, two products, their sum."""
    q = T * cfg.q_dim
    return [T * cfg.hidden_size * s, q * s] + ([q * FP32] if s != FP32 else []) + [q * FP32] * 4


def _ffn(cfg: ModelConfig, T: int, s: int) -> list[int]:
    """The widest feed-forward of the trunk: normed input, output, act(gate)/up/product [T, width].

    An MoE layer adds its fp32 router probabilities [T, E] and the (token, expert) pair bookkeeping
    [T*K]; one routed expert sees at most all T tokens. Generate never runs the MTP block.
    """
    blocks = [T * cfg.hidden_size * s] * 2
    widths = [cfg.intermediate_size] if not all(cfg.moe_layers) else []
    if cfg.is_moe:
        widths.append(max(cfg.moe_intermediate_size, cfg.shared_intermediate_size))
        pairs = T * cfg.moe_k
        blocks += [T * cfg.moe_num_experts * FP32, T * cfg.hidden_size * s,  # probs, one expert's rows
                   pairs * INT64, pairs * INT64, pairs * INT64, pairs * s]  # ids, sort order, sorted, weights
    return blocks + [T * max(widths) * s] * 3


def _logits(cfg: ModelConfig, T: int, s: int) -> list[int]:
    """Final norm and head over the last prompt row only: normed row [1, 1, H], logits [1, 1, V]."""
    return [cfg.hidden_size * s, cfg.vocab_size * s]


def prefill_phases(cfg: ModelConfig, prompt_tokens: int, max_len: int, dtype: str) -> dict[str, list[int]]:
    """Each phase's live blocks, plus the residual stream and RoPE cos/sin [1, T, Dh] fp32 held throughout."""
    T, s = prompt_tokens, DTYPE_BYTES[dtype]
    held = [T * cfg.hidden_size * s, T * cfg.head_dim * FP32, T * cfg.head_dim * FP32]
    phases = {"attention": _attention(cfg, T, max_len, s), "rope": _rope(cfg, T, s), "ffn": _ffn(cfg, T, s),
              "logits": _logits(cfg, T, s)}
    return {name: held + blocks for name, blocks in phases.items()}


def prefill_transient(phases: dict[str, list[int]]) -> dict:
    """The largest phase's live blocks plus the heap high-water (the largest phase's blocks under 32 MiB)."""
    live = {name: sum(blocks) for name, blocks in phases.items()}
    heap = max(sum(b for b in blocks if b < MMAP_THRESHOLD_MAX) for blocks in phases.values())
    return {"live": max(live.values()), "live_phase": max(live, key=live.get), "heap": heap,
            "transient": max(live.values()) + heap}


# ---- the prediction ------------------------------------------------------------------------------
def cpu_generation_peak(cfg: ModelConfig, dtype: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Predicted peak RSS in bytes of ``load_model(dtype)`` + one reference ``generate`` (batch 1).

    ``load_peak`` and ``generation_peak`` are the two steps, ``peak`` the larger (the process's VmHWM);
    the other keys are their terms (``prefill_live`` is the largest phase alone, ``prefill_phase`` its name).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    S = prompt_tokens + new_tokens
    weights, kv, slot_pos = loaded_weight_bytes(cfg, dtype), reference_kv_bytes(cfg, S, dtype), slot_pos_bytes(cfg, S)
    load = load_transient(cfg, dtype)
    prefill = prefill_transient(prefill_phases(cfg, prompt_tokens, S, dtype))
    load_peak = BASELINE_LOADED + weights + load
    generation_peak = BASELINE + weights + kv + slot_pos + prefill["transient"]
    return {"baseline": BASELINE, "weights": weights, "kv_cache": kv, "slot_pos": slot_pos, "load_transient": load,
            "prefill_transient": prefill["transient"], "prefill_live": prefill["live"],
            "prefill_phase": prefill["live_phase"], "load_peak": load_peak, "generation_peak": generation_peak,
            "peak": max(load_peak, generation_peak)}


# ---- the measurement -----------------------------------------------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} line; peak RSS is measured on Linux only")


def vm_hwm() -> int:
    """This process's peak RSS in bytes (``VmHWM``; ``ru_maxrss`` would carry the parent's over exec)."""
    return _status("VmHWM")


def reset_vm_hwm() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0, ``clear_refs`` value 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _run(path: str, dtype: str, prompt_tokens: int, new_tokens: int) -> dict:
    from .generation import GenerationConfig, generate
    from .weights import load_model

    imported = vm_hwm()
    model = load_model(path, dtype=TORCH_DTYPES[dtype], progress=False)
    loaded, resident = vm_hwm(), _status("VmRSS")
    split = reset_vm_hwm()
    vocab = model.config.vocab_size
    prompt = [(7919 * i + 1) % vocab for i in range(prompt_tokens)]
    out = generate(model, prompt, GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=()))
    return {"imported": imported, "load_peak": loaded, "after_load": resident,
            "generation_peak": vm_hwm() if split else None, "peak": max(loaded, vm_hwm()), "new_tokens": len(out)}


def measure_cpu_generation_peak(path: str | Path, dtype: str, prompt_tokens: int, new_tokens: int,
                                threads: int = 1, timeout: float = 300) -> dict:
    """Load + generate in a fresh interpreter; its VmHWM (bytes) after import, load and generate.

    ``generation_peak`` is the VmHWM of the generate call alone (reset after loading; None where the
    kernel refuses the reset); ``peak`` is the whole process's.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "ernie45.plan_cpu", str(path), "--dtype", dtype,
           "--prompt", str(prompt_tokens), "--new", str(new_tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ernie45.plan_cpu",
                                description="Load a checkpoint, generate once, print VmHWM (bytes) as JSON.")
    p.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=8, help="new tokens")
    a = p.parse_args(argv)
    print(json.dumps(_run(a.path, a.dtype, a.prompt, a.new)))


if __name__ == "__main__":
    main()
