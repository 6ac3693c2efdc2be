"""One real-size ERNIE-4.5-300B-A47B MoE decoder layer at int4 and int2: decode-step time -> tok/s estimate.

The 300B checkpoint (about 160 GB even at 4 bits) does not fit this machine, but one of its layers does.
This script builds one decoder layer with the real shapes (preset ERNIE-4.5-300B-A47B: hidden 8192,
64 q / 8 kv heads of 128, 64 experts of width 3584, top-8, no shared experts) from random weights,
quantized with the repo's own formats and modules (ernie45/quant: `quantize_rtn` into `QuantExperts` /
`QuantLinear`; the schemes `int4` = group 128 and `int2` = group 64, attention in the same format as the
experts as those schemes do), and times batch-1 decode steps through the production `DecoderLayer` with a
`KVCache` holding a short random context, on each matmul path the repo has:
- `fast`: `ernie45.fast.accelerate` (C kernels that read the stored codes; all 8 experts in one call),
  when that module is present and its kernels build;
- `aten`: QuantWeight's own route, torch's `_weight_int4pack_mm_for_cpu` on a 4-bit tile layout it builds
  per expert on first use and caches. All 64 experts are packed before timing, so no step pays for a
  first use. int2 codes are widened to that 4-bit layout, so on this path int2 streams as many bytes as int4.
Bytes read per step are counted from the tensors each path really reads, next to the stored format's.

Choices:
- Quantization goes expert by expert: each expert projection is drawn as fp32 [N, K], quantized, and only
  its stored tensors kept, so the 22.5 GB fp32 layer never exists (RAM is 24 GB). That takes tens of
  minutes on 2 cores, so the quantized layer is saved to `--cache-dir` and later runs load it.
  int4 and int2 each run in their own subprocess, so one's memory is gone before the other starts.
- Each step feeds a fresh random hidden state, so the router picks different experts every step and the
  weights come from RAM, not cache (8 experts x 3 projections x ~15 MB at int4 >> L3).
- Extrapolation to the full model (ASSUMPTION below): 54 x one measured layer step + the lm_head,
  timed separately.

    python bench/moe_layer_300b.py [--threads 2] [--steps 20] [--context 128] [--formats int4,int2]
writes bench/results/moe_layer_300b.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's ernie45, whatever is installed
from ernie45.cache import KVCache  # noqa: E402
from ernie45.config import ModelConfig, preset  # noqa: E402
from ernie45.layers import ACTIVATIONS, RMSNorm, rope_cos_sin, rope_inv_freq  # noqa: E402
from ernie45.model import DecoderLayer  # noqa: E402
from ernie45.moe import MoeStatics, Router  # noqa: E402
from ernie45.quant.formats import get_format, group_size_for, quantize_rtn  # noqa: E402
from ernie45.quant.modules import QuantExperts, QuantLinear, QuantWeight  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PRESET = "ERNIE-4.5-300B-A47B"
STD = 0.02  # weight init scale; irrelevant to speed, keeps activations finite
WARMUP = 3


# ---- building the layer (worker process) ---------------------------------------------------------
def quantized_experts(E: int, N: int, K: int, fmt: str, gen: torch.Generator | None, label: str,
                      device: str | torch.device = "cpu") -> QuantWeight:
    """E stacked [N, K] weights, each drawn in fp32, quantized RTN and stored before the next is drawn, on
    `device` (gen must live there). gen None: the stored tensors left empty (to be filled from the layer cache)."""
    group = group_size_for(get_format(fmt), K)
    stacked = QuantWeight(fmt, N, K, group, lead=(E,), device=device)  # allocated once: [E, N, ?]
    for e in range(E if gen is not None else 0):
        q = quantize_rtn(torch.randn(N, K, generator=gen, device=device) * STD, get_format(fmt), group)
        for name, t in q.tensors().items():
            getattr(stacked, name).data[e].copy_(t)
        if e % 16 == 15:
            print(f"  {fmt} {label}: {e + 1}/{E} experts quantized", file=sys.stderr, flush=True)
    return stacked


def quantized_linear(N: int, K: int, fmt: str, gen: torch.Generator | None,
                     device: str | torch.device = "cpu") -> QuantLinear:
    if gen is None:
        return QuantLinear(K, N, fmt, device=device)
    w = torch.randn(N, K, generator=gen, device=device) * STD
    return QuantLinear.from_quantized(quantize_rtn(w, get_format(fmt)))


def build_layer(cfg: ModelConfig, fmt: str, seed: int | None, device: str | torch.device = "cpu") -> DecoderLayer:
    """The production DecoderLayer, built on meta, every module then replaced by a real (quantized) one on
    `device` (bench/gpu_speed.py builds it on a GPU). seed None: the same modules with empty stored
    tensors, for `load_layer` to fill."""
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    D, F_, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts
    with torch.device("meta"):
        layer = DecoderLayer(cfg, 0, moe=True)
    with torch.device(device):
        layer.input_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        layer.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        layer.mlp.gate, layer.mlp.moe_statics = Router(cfg), MoeStatics(cfg)
    attn, mlp = layer.self_attn, layer.mlp
    q_lin = lambda n, k: quantized_linear(n, k, fmt, gen, device)  # noqa: E731
    attn.q_proj, attn.k_proj = q_lin(cfg.q_dim, D), q_lin(cfg.kv_dim, D)
    attn.v_proj, attn.o_proj = q_lin(cfg.kv_dim, D), q_lin(D, cfg.q_dim)
    if gen is not None:
        with torch.no_grad():
            mlp.gate.weight.normal_(0, STD, generator=gen)
            mlp.moe_statics.e_score_correction_bias.normal_(0, 1e-3, generator=gen)
    mlp.experts = QuantExperts(quantized_experts(E, F_, D, fmt, gen, "gate_proj", device),
                               quantized_experts(E, F_, D, fmt, gen, "up_proj", device),
                               quantized_experts(E, D, F_, fmt, gen, "down_proj", device), ACTIVATIONS[cfg.hidden_act])
    leftover = [n for n, p in layer.named_parameters() if p.is_meta]
    assert not leftover, f"still on meta: {leftover}"
    return layer.eval()


def load_layer(cfg: ModelConfig, fmt: str, seed: int, cache_dir: Path) -> tuple[DecoderLayer, str]:
    """The quantized layer from `cache_dir` (tensor by tensor into RAM), else built and saved there:
    quantizing 192 expert weights takes tens of minutes on 2 cores; re-timing should not."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache_dir / f"{PRESET}-layer-{fmt}-seed{seed}.safetensors"
    if path.is_file():
        layer = build_layer(cfg, fmt, None)
        params = dict(layer.named_parameters())
        with safe_open(str(path), "pt") as f, torch.no_grad():
            assert set(f.keys()) == set(params), f"{path} does not hold this layer's tensors; delete it"
            for name in f.keys():
                params[name].copy_(f.get_tensor(name))
        return layer, f"loaded from {path}"
    layer = build_layer(cfg, fmt, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach() for n, p in layer.named_parameters()}, str(path))
    return layer, f"quantized here, saved to {path}"


def pack_for_kernel(layer: DecoderLayer) -> None:
    """Build the aten int4 kernel layout of every weight now, so that no timed step pays for a first use."""
    for m in layer.modules():
        if isinstance(m, QuantWeight):
            for index in range(m.lead[0]) if m.lead else [None]:
                m._int4_pack(index)


def fast_unavailable() -> str | None:
    """Why the `ernie45.fast` kernel path cannot be timed here, or None."""
    try:
        from ernie45 import fast, kernels
    except ImportError as e:
        return f"ernie45.fast is not in this checkout ({e})"
    if not hasattr(fast, "accelerate"):
        return "ernie45.fast has no accelerate()"
    return None if kernels.available() else f"kernels unavailable: {kernels.unavailable_reason()}"


# ---- bytes read per step -------------------------------------------------------------------------
def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def stored_bytes(m: QuantWeight, index: int | None) -> int:
    return _nbytes(*m.quantized(index).tensors().values())


def aten_bytes(m: QuantWeight, index: int | None) -> int:
    """What `_weight_int4pack_mm_for_cpu` streams: its tile-layout codes and the [G, N, 2] scale_zero."""
    return _nbytes(*m._int4_pack(index))


def fast_bytes(m: QuantWeight, index: int | None) -> int | None:
    """What the ernie45.fast kernel streams: its kernel view of the weight (codes, fp32 scales and zeros),
    found in the module's kernel cache after a step has run; None if that cache is not where expected."""
    cache = m.__dict__.get("_kernel_weights", {})
    if "w" in cache:
        w = cache["w"][1]
        return _nbytes(w.data, w.scales, w.zeros)
    return None


def fast_expert_bytes(experts: QuantExperts) -> int | None:
    stack = experts.__dict__.get("_kernel_weights", {}).get("stack")
    if stack is None:
        return None
    return sum(_nbytes(w.data, w.scales, w.zeros) for w in stack[1]) // experts.num_experts


def step_bytes(layer: DecoderLayer, cfg: ModelConfig, context: int, path: str) -> dict[str, int | None]:
    """Bytes one decode step reads on `path` (stored / aten / fast): attention weights + K of E experts'
    weights + the small rest (router fp32, two norms, fp32 K and V of the context)."""
    attn = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    ex = layer.mlp.experts
    if path == "fast":
        a, e = [fast_bytes(m, None) for m in attn], fast_expert_bytes(ex)
        if None in a or e is None:
            return {"attention": None, "experts_active": None, "total": None}
        a = sum(a)
    else:
        per = stored_bytes if path == "stored" else aten_bytes
        a, e = sum(per(m, None) for m in attn), sum(per(getattr(ex, n), 0) for n in QuantExperts.PROJS)
    small = _nbytes(layer.mlp.gate.weight) + 2 * cfg.hidden_size * 4 + 2 * context * cfg.kv_dim * 4
    return {"attention": a, "experts_active": cfg.moe_k * e, "total": a + cfg.moe_k * e + small}


# ---- timing --------------------------------------------------------------------------------------
@torch.inference_mode()
def time_steps(layer: DecoderLayer, cfg: ModelConfig, steps: int, context: int, seed: int) -> dict:
    """Batch-1 decode steps at positions context, context+1, ...; a fresh random hidden state each step."""
    gen = torch.Generator().manual_seed(seed + 1)
    cache = KVCache(cfg, 1, context + WARMUP + steps, torch.float32, num_layers=1)
    cache.k[0][:, :context] = torch.randn(1, context, cfg.num_key_value_heads, cfg.head_dim, generator=gen)
    cache.v[0][:, :context] = torch.randn(1, context, cfg.num_key_value_heads, cfg.head_dim, generator=gen)
    cache.slot_pos[0][:, :context] = torch.arange(context)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    chosen: list[list[int]] = []
    hook = layer.mlp.experts.register_forward_pre_hook(lambda _m, a: chosen.append(a[2].flatten().tolist()))
    rows = []
    for i in range(WARMUP + steps):
        x = torch.randn(1, 1, cfg.hidden_size, generator=gen)  # [B, T, D]
        positions = torch.tensor([[context + i]])
        cos, sin = rope_cos_sin(positions, inv_freq)
        t0 = time.perf_counter()
        h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, positions, cache)
        t1 = time.perf_counter()
        h + layer.mlp(layer.post_attention_layernorm(h))
        t2 = time.perf_counter()
        if i >= WARMUP:
            rows.append((t1 - t0, t2 - t1, t2 - t0))
    hook.remove()
    timed = chosen[WARMUP:]
    ms = {k: [r[j] * 1e3 for r in rows] for j, k in enumerate(("attention", "moe", "step"))}
    return {"ms_median": {k: statistics.median(v) for k, v in ms.items()},
            "ms_mean": {k: statistics.fmean(v) for k, v in ms.items()},
            "ms_min": {k: min(v) for k, v in ms.items()},
            "distinct_experts": len({e for c in timed for e in c}),
            "steps_with_same_experts_as_previous": sum(set(a) == set(b) for a, b in pairwise(timed))}


def time_path(layer: DecoderLayer, cfg: ModelConfig, args: argparse.Namespace, path: str) -> dict:
    """The best of `args.rounds` rounds of steps (lowest median): on a shared machine a round can be
    several times slower than the next when other work lands on the same cores."""
    load = os.getloadavg()[0]  # how busy the shared machine was just before these steps
    rounds = [time_steps(layer, cfg, args.steps, args.context, args.seed + r) for r in range(args.rounds)]
    timing = min(rounds, key=lambda t: t["ms_median"]["step"])
    timing["round_medians_ms"] = [round(t["ms_median"]["step"], 1) for t in rounds]
    nbytes = step_bytes(layer, cfg, args.context, path)
    med_s = timing["ms_median"]["step"] / 1e3
    gb_s = None if nbytes["total"] is None else nbytes["total"] / med_s / 1e9
    return {**timing, "bytes_read": nbytes, "effective_gb_s": gb_s, "loadavg_1min_before": round(load, 2)}


def worker_layer(fmt: str, args: argparse.Namespace) -> dict:
    """Time one format on each matmul path: `fast` (ernie45.fast kernels on the stored codes, when
    present) and `aten` (QuantWeight's torch weight-only kernel on its int4 tile layout)."""
    torch.set_num_threads(args.threads)
    cfg = preset(PRESET)
    t0 = time.perf_counter()
    layer, origin = load_layer(cfg, fmt, args.seed, args.cache_dir)
    out = {"format": fmt, "group_size": layer.mlp.experts.gate_proj.group_size, "origin": origin,
           "setup_s": time.perf_counter() - t0, "steps": args.steps, "context": args.context,
           "bytes_stored": step_bytes(layer, cfg, args.context, "stored"),
           "resident_stored_bytes": _nbytes(*layer.parameters()), "paths": {}}
    reason = fast_unavailable()
    if reason is None:
        from ernie45.fast import accelerate, reference

        accelerate(layer)
        out["paths"]["fast"] = time_path(layer, cfg, args, "fast")
        reference(layer)
    else:
        out["paths"]["fast"] = {"skipped": reason}
    pack_for_kernel(layer)
    out["paths"]["aten"] = time_path(layer, cfg, args, "aten")
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ---- the head (worker process) -------------------------------------------------------------------
def random_matrix(N: int, K: int, dtype: torch.dtype, gen: torch.Generator, chunk: int = 8192) -> torch.Tensor:
    w = torch.empty(N, K, dtype=dtype)
    for s in range(0, N, chunk):  # never a full fp32 copy next to a bf16 one
        w[s:s + chunk] = (torch.randn(min(chunk, N - s), K, generator=gen) * STD).to(dtype)
    return w


@torch.inference_mode()
def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def head_variants(w: torch.Tensor, x: torch.Tensor, name: str) -> dict:
    """name -> one-token matmul over head weight w [V, D]: torch's F.linear, and the fast kernel if any."""
    xd = x.to(w.dtype)
    out = {f"{name} torch": lambda: F.linear(xd, w)}
    if name == "bf16" and fast_unavailable() is None:
        from ernie45.fast import plain_weights
        from ernie45.kernels import gemv

        kw = plain_weights(w)
        out["bf16 fast"] = lambda: gemv(kw, x)
    return out


def worker_head(args: argparse.Namespace) -> dict:
    """lm_head [V, D] GEMV for one token: bf16 (as stored; torch and, when present, the ernie45.fast
    kernel), fp32 (an upcast load), int8 (torch's weight-only kernel, if the head were quantized)."""
    torch.set_num_threads(args.threads)
    cfg = preset(PRESET)
    V, D = cfg.vocab_size, cfg.hidden_size
    gen = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(1, D, generator=gen)
    out: dict = {"shape": [V, D], "variants": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        w = random_matrix(V, D, dtype, gen)
        for label, fn in head_variants(w, x, name).items():
            out["variants"][label] = {"ms": median_ms(fn, args.head_repeats), "bytes": _nbytes(w)}
        del w
    w8 = random_matrix(V, D, torch.int8, gen)  # the codes do not matter for speed; one scale per row
    scales = torch.full((V,), 1e-3, dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out["variants"]["int8 torch"] = {"ms": median_ms(lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, scales),
                                                     args.head_repeats), "bytes": _nbytes(w8, scales)}
    for v in out["variants"].values():
        v["gb_s"] = v["bytes"] / (v["ms"] / 1e3) / 1e9
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ---- orchestration -------------------------------------------------------------------------------
def run_json(cmd: list[str], threads: int) -> dict:
    """Run one measurement in a fresh process (its memory is returned when it exits); its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    print(f"[{Path(cmd[1]).name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(which: str, args: argparse.Namespace) -> dict:
    return run_json([sys.executable, __file__, "--worker", which, "--threads", str(args.threads), "--steps",
                     str(args.steps), "--rounds", str(args.rounds), "--context", str(args.context), "--seed",
                     str(args.seed), "--head-repeats",
                     str(args.head_repeats), "--cache-dir", str(args.cache_dir)], args.threads)


def extrapolate(layer_ms: float, head: dict, cfg: ModelConfig) -> dict:
    """54 x one measured layer step (+ each head variant) -> tok/s."""
    total = cfg.num_hidden_layers * layer_ms
    out = {"layers": cfg.num_hidden_layers, "layers_ms": total, "tok_s_layers_only": 1e3 / total}
    out.update({f"tok_s_with_{k.replace(' ', '_')}_head": 1e3 / (total + v["ms"]) for k, v in head["variants"].items()})
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


ASSUMPTION = (
    "Extrapolation: each of the 54 layers costs one measured MoE-layer step (the 3 leading dense layers have "
    "an FFN of width 28672 = 8 x 3584, the same bytes as the 8 active experts, and no router), plus one lm_head "
    "matmul (bf16 as the quantization schemes keep it; fp32 and int8 shown for comparison); the embedding "
    "lookup and the final norm are excluded. RAM capacity is ignored: the whole model at int4 is about 160 GB.")
PATH_NOTE = (
    "Paths: `fast` = `ernie45.fast.accelerate` (C kernels reading the stored codes, fp32 scales/zeros, one call "
    "for a token's 8 experts); `aten` = QuantWeight's torch `_weight_int4pack_mm_for_cpu` on its own 4-bit tile "
    "layout (int2 codes are widened to it, so int2 reads as many bytes as int4 on that path). Bytes read are "
    "counted from the tensors each path actually reads; `stored` is the checkpoint format.")


def markdown(res: dict) -> str:
    bw, head = res["bandwidth"]["read_gb_s"], res["head"]["variants"]
    m = res["machine"]
    lines = [f"# One real-size {PRESET} MoE layer: batch-1 decode step on CPU", "",
             f"Command: `{res['command']}`", "",
             (f"Machine: {m['cpu']}, {m['cores']} cores, {res['threads']} threads, torch {m['torch']}; load "
              f"average {m['loadavg_start']} at start, {m['loadavg_end']} at end (shared machine). Measured read "
              f"bandwidth {bw:.1f} GB/s (bench/bandwidth.py: torch.sum over 1.5 GB fp32, best of 7)."), "",
             (f"Random weights quantized RTN expert by expert; per path {res['rounds']} rounds of {res['steps']} "
              f"timed steps after {WARMUP} warm-up, KV context {res['context']}, a fresh random hidden state each "
              "step (the router picks new experts); the round with the lowest median is shown (its median and, in "
              "brackets, its fastest step; every round's median is in the JSON)."), "",
             ("| format | path | ms/step (min) | attention ms | MoE ms | MB read/step | GB/s | % of bandwidth "
              "| MB/step stored | distinct experts | load avg | peak RSS GB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, layer in res["layer"].items():
        stored = layer["bytes_stored"]["total"] / 1e6
        for path, r in layer["paths"].items():
            if "skipped" in r:
                lines.append(f"| {fmt} | {path} | skipped: {r['skipped']} |" + " |" * 9)
                continue
            ms, b, g = r["ms_median"], r["bytes_read"]["total"], r["effective_gb_s"]
            lines.append(f"| {fmt} (g{layer['group_size']}) | {path} | {ms['step']:.1f} ({r['ms_min']['step']:.1f}) | "
                         f"{ms['attention']:.1f} | "
                         f"{ms['moe']:.1f} | {'-' if b is None else f'{b / 1e6:.0f}'} | "
                         f"{'-' if g is None else f'{g:.2f}'} | {'-' if g is None else f'{100 * g / bw:.0f}%'} | "
                         f"{stored:.0f} | {r['distinct_experts']} | {r['loadavg_1min_before']} | "
                         f"{layer['peak_rss_bytes'] / 1e9:.1f} |")
    lines += ["", f"lm_head {res['head']['shape']} for one token: " + ", ".join(
        f"{k} {v['ms']:.0f} ms ({v['gb_s']:.1f} GB/s)" for k, v in head.items()) + ".", "",
        "## Extrapolation to the whole model", "", ASSUMPTION, "",
        "| format, path | 54 layers ms | tok/s, layers only | " + " | ".join(f"tok/s + {k} head" for k in head)
        + " | roofline tok/s (same bytes + bf16 head) |", "|---|---|---|" + "---|" * (len(head) + 1)]
    for key, e in res["extrapolation"].items():
        fmt, path = key.split()
        b = res["layer"][fmt]["paths"][path]["bytes_read"]["total"]
        roof = "-" if b is None else f"{bw * 1e9 / (e['layers'] * b + head['bf16 torch']['bytes']):.2f}"
        cells = " | ".join(f"{e['tok_s_with_' + k.replace(' ', '_') + '_head']:.2f}" for k in head)
        lines.append(f"| {key} | {e['layers_ms']:.0f} | {e['tok_s_layers_only']:.2f} | {cells} | {roof} |")
    return "\n".join([*lines, "", PATH_NOTE, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="rounds of --steps steps per path; the best is kept")
    p.add_argument("--context", type=int, default=128, help="KV positions already in the cache")
    p.add_argument("--formats", default="int4,int2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-repeats", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/ernie45-bench/layer300b"),
                   help="where the quantized layers are kept between runs (about 5 GB for int4 + int2)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement in its own process
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker_head(args) if args.worker == "head" else worker_layer(args.worker, args)))
        return
    cfg = preset(PRESET)
    res = {"command": "python bench/moe_layer_300b.py " + " ".join(sys.argv[1:]), "threads": args.threads,
           "steps": args.steps, "rounds": args.rounds, "warmup_steps": WARMUP, "context": args.context, "preset": PRESET,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                       "loadavg_start": [round(v, 2) for v in os.getloadavg()]}}
    res["bandwidth"] = run_json([sys.executable, str(Path(__file__).parent / "bandwidth.py"), "--threads",
                                 str(args.threads)], args.threads)
    res["layer"] = {fmt: worker(fmt, args) for fmt in args.formats.split(",")}
    res["head"] = worker("head", args)
    res["extrapolation"] = {f"{fmt} {path}": extrapolate(r["ms_median"]["step"], res["head"], cfg)
                            for fmt, layer in res["layer"].items() for path, r in layer["paths"].items()
                            if "ms_median" in r}
    res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_layer_300b.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "moe_layer_300b.md").write_text(markdown(res))
    print((args.out / "moe_layer_300b.md").read_text())


if __name__ == "__main__":
    main()
