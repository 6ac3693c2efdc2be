"""ernie45 on one CUDA GPU (issue 7, item 4): the speed harness with CUDA-graph decode, and one real-size
ERNIE-4.5-300B-A47B MoE layer at int4 timed against the card's memory bandwidth.

One run measures, in this order (each part records its error and the run goes on, so a short GPU lease
never loses the parts that worked):
1. `hbm`: the card's read bandwidth (torch.sum over a 4 GiB bf16 tensor, best of 5) and copy rate.
2. `medium`: the bench-medium model (shared/spec/field-notes.md; random weights, std 0.08) in bf16 on the
   GPU: ernie45's eager reference decode (generation.generate_stream), ernie45's CUDA-graph decode
   (static_decode.GraphDecoder: one graph replay per token), transformers' `generate` on the same
   checkpoint, prefill of 512 tokens for both, peak GPU memory, and the bandwidth roofline (planner's
   active bytes / measured read rate). Greedy tokens of the graph decode are compared with the eager
   reference (bf16 sums in another order can flip a near-tie; `greedy_prefix_agreement` says where).
   Then the same checkpoint quantized to int4: eager reference decode against the graph decode through
   the Triton int4 kernel.
3. `layer300b`: one decoder layer with the real 300B shapes (hidden 8192, 64 q / 8 kv heads, 64 experts
   of width 3584, top-8), every projection int4 (group 128) as `quantize_model(.., "int4")` stores it,
   random weights; batch-1 decode steps captured as a CUDA graph (kernels/expert_rows.py reads the
   8 selected experts' codes), a fresh random hidden state per step so the router picks new experts.
   Time per step against the bytes the step reads -> GB/s and % of the measured HBM read rate.
   ASSUMPTION of the extrapolation: all 54 layers cost what this one does (the real model's first 3
   layers are dense, similar in bytes) plus the bf16 lm_head [103424, 8192], timed on its own.

    python bench/gpu_speed.py [--out bench/results] [--model DIR] [--skip medium,layer300b,...]
writes gpu_speed.json and gpu_speed.md. `--device cpu --quick` runs every part on a tiny model without
graphs: the smoke test of this script (tests/test_bench_scripts.py), never a measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ernie45.config import ModelConfig, preset, resolve_config  # noqa: E402
from ernie45.layers import rope_cos_sin, rope_inv_freq  # noqa: E402
from ernie45.model import DecoderLayer  # noqa: E402
from ernie45.static_decode import GraphDecoder, StaticKVCache, capture, make_static  # noqa: E402
from moe_layer_300b import _nbytes, build_layer  # noqa: E402  (this folder: the CPU 300B-layer bench)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls of fn, synchronised."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# ---- 1. bandwidth --------------------------------------------------------------------------------
def hbm(device: torch.device, gib: float) -> dict:
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    x.sum(), y.copy_(x)  # warm-up
    read = seconds(lambda: x.sum(), device, 5)
    copy_s = seconds(lambda: y.copy_(x), device, 5)
    n = x.numel() * 2
    return {"bytes": n, "read_gb_s": n / read / 1e9, "copy_gb_s_read_plus_write": 2 * n / copy_s / 1e9}


# ---- 2. the medium model -------------------------------------------------------------------------
def checkpoint(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    like = "mini-300B-A47B" if args.quick else "bench-medium"
    path = Path(args.work) / f"{like}-std0.08"
    if not (path / "config.json").is_file():
        cmd = [sys.executable, "-m", "ernie45", "random-checkpoint", str(path), "--like", like, "--std", "0.08"]
        subprocess.run(cmd, check=True, cwd=REPO)
    return path


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def prefill_s(model, n: int, device: torch.device) -> float:
    from ernie45.cache import KVCache

    cfg = model.config
    ids = ((torch.arange(n) % (cfg.vocab_size - 100)) + 100)[None].to(device)
    pos = torch.arange(n, device=device)[None]

    def run():
        cache = KVCache(cfg, 1, n, model.model.embed_tokens.weight.dtype, device, num_layers=cfg.num_hidden_layers)
        model.logits(model.model(ids, pos, cache)[:, -1:])

    run()
    return seconds(run, device, 2)


def eager_then_graph(model, prompt: list[int], n: int, device: torch.device) -> dict:
    """Greedy decode of n tokens on the reference modules (eager), then on the same model made static
    (in place) through GraphDecoder: speeds and whether the tokens agree."""
    from ernie45.bench import decode_run

    decode_run(model, prompt, 4)  # warm-up
    ref, _, ref_rest = decode_run(model, prompt, n)
    make_static(model)  # the reference modules stay inside the static ones
    dec = GraphDecoder(model, len(prompt) + n + 8, use_graph=device.type == "cuda")  # captures the graph
    dec.generate(prompt, 4)  # warm-up
    dec.prefill(prompt)
    rest = seconds(lambda: dec.decode(n - 1), device)
    tokens = dec.out[:n].tolist()
    return {"eager_decode_tok_s": (n - 1) / ref_rest, "graph_decode_tok_s": (n - 1) / rest,
            "cuda_graph": dec.graph is not None, "greedy_tokens": tokens, "reference_tokens": ref,
            "greedy_matches_reference": tokens == ref, "greedy_prefix_agreement": first_divergence(tokens, ref)}


def medium(args: argparse.Namespace, device: torch.device, bw: dict | None) -> dict:
    from ernie45.bench import active_bytes
    from ernie45.quant import quantize_model
    from ernie45.weights import load_model

    path = checkpoint(args)
    prompt = list(range(100, 100 + args.prompt_tokens))
    n = args.new_tokens
    out: dict = {"model": str(path), "dtype": "bf16", "prompt_tokens": len(prompt), "new_tokens": n}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_model(path, dtype=torch.bfloat16).to(device)
    out["prefill_tok_s"] = args.prefill_tokens / prefill_s(model, args.prefill_tokens, device)
    out.update(eager_then_graph(model, prompt, n, device))
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    out["active_weight_bytes"] = active_bytes(model, "bf16")
    if bw:
        out["roofline_tok_s"] = bw["read_gb_s"] * 1e9 / out["active_weight_bytes"]
        out["graph_decode_of_roofline"] = out["graph_decode_tok_s"] / out["roofline_tok_s"]
    # the same checkpoint quantized RTN to int4: the eager reference dequantizes each QuantWeight per
    # call, the graph reads the codes through the Triton int4 kernel
    model = load_model(path, dtype=torch.bfloat16).to(device)
    quantize_model(model, "int4", "rtn", progress=False)
    out["int4"] = {**eager_then_graph(model, prompt, n, device), "active_weight_bytes": active_bytes(model, "int4")}
    del model
    out["transformers"] = t = transformers_peer(path, args, device)
    if "decode_tok_s" in t:
        out["graph_decode_vs_transformers"] = out["graph_decode_tok_s"] / t["decode_tok_s"]
        out["transformers_matches_reference"] = t["greedy_tokens"] == out["reference_tokens"]
    return out


def transformers_peer(path: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """bench/speed_transformers.py on the same checkpoint and device, in its own process."""
    cmd = [sys.executable, str(REPO / "bench" / "speed_transformers.py"), "--model", str(path), "--dtype", "bf16",
           "--device", device.type, "--concurrency", "", "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--prefill-tokens", str(args.prefill_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        return {"error": done.stderr.strip()[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- 3. one real-size 300B layer at int4 ---------------------------------------------------------
def step_bytes(layer: DecoderLayer, cfg: ModelConfig, context: int) -> int:
    """Bytes a decode step reads: int4 attention + top-k experts' codes/scales/zeros + router + K/V."""
    attn = sum(_nbytes(m.qweight, m.scales, m.zeros) for m in
               (getattr(layer.self_attn, n).inner for n in ("q_proj", "k_proj", "v_proj", "o_proj")))
    ex = layer.mlp.experts.inner
    one = sum(_nbytes(p.qweight[0], p.scales[0], p.zeros[0]) for p in (ex.gate_proj, ex.up_proj, ex.down_proj))
    kv = 2 * context * cfg.kv_dim * layer.input_layernorm.weight.element_size()
    return attn + cfg.moe_k * one + _nbytes(layer.mlp.gate.weight) + kv


@torch.no_grad()
def layer300b(args: argparse.Namespace, device: torch.device, bw: dict | None) -> dict:
    cfg = resolve_config("mini-300B-A47B") if args.quick else preset("ERNIE-4.5-300B-A47B")
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    layer = build_layer(cfg, "int4", args.seed, device)  # bench/moe_layer_300b.py's, on the GPU
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):  # bf16 activations; router fp32
        norm.to(dtype)
    build_s = time.perf_counter() - t0
    make_static(layer)
    ctx, steps = args.context, args.steps
    cache = StaticKVCache(cfg, ctx + 4 + steps + 8, dtype, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    shape = (1, ctx, cfg.num_key_value_heads, cfg.head_dim)
    cache.k[0][:, :ctx] = torch.randn(shape, device=device, generator=gen).to(dtype)
    cache.v[0][:, :ctx] = torch.randn(shape, device=device, generator=gen).to(dtype)
    cache.slot_pos[0][:, :ctx] = torch.arange(ctx, device=device)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
    xs = torch.randn(steps + 8, 1, 1, cfg.hidden_size, device=device, generator=gen).to(dtype)
    x = torch.zeros(1, 1, cfg.hidden_size, dtype=dtype, device=device)
    pos = torch.full((1, 1), ctx, dtype=torch.long, device=device)
    y = torch.zeros_like(x)

    def step():
        cos, sin = rope_cos_sin(pos, inv_freq)
        y.copy_(layer(x, cos, sin, pos, cache))

    def steps_run(k: int, replay) -> None:
        for i in range(k):
            x.copy_(xs[i])
            replay()

    out = {"preset": "mini-300B-A47B" if args.quick else "ERNIE-4.5-300B-A47B", "format": "int4 (group 128)",
           "build_s": build_s, "context": ctx, "steps": steps}
    eager = seconds(lambda: steps_run(steps, step), device) / steps
    out["eager_ms_per_step"] = eager * 1e3
    if device.type == "cuda":
        graph = capture(step)  # its warm-up steps wrote slot ctx, which every replay rewrites
        per = seconds(lambda: steps_run(steps, graph.replay), device, 3) / steps
        out["graph_ms_per_step"] = per * 1e3
    else:
        per = eager
    out["bytes_per_step"] = step_bytes(layer, cfg, ctx)
    out["effective_gb_s"] = out["bytes_per_step"] / per / 1e9
    if bw:
        out["of_hbm_read"] = out["effective_gb_s"] / bw["read_gb_s"]
    head = torch.randn(cfg.vocab_size if not args.quick else 1024, cfg.hidden_size, device=device,
                       generator=gen).to(dtype)
    hx = torch.randn(1, cfg.hidden_size, device=device, generator=gen).to(dtype)
    torch.nn.functional.linear(hx, head)
    head_s = seconds(lambda: torch.nn.functional.linear(hx, head), device, 5)
    out["head_ms"] = head_s * 1e3
    total = cfg.num_hidden_layers * per + head_s
    out["extrapolated"] = {"layers": cfg.num_hidden_layers, "ms_per_token": total * 1e3, "tok_s": 1 / total,
                           "assumption": "every layer as this one (int4 attention + top-8 int4 experts) + bf16 head"}
    return out


# ---- report --------------------------------------------------------------------------------------
def fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(res: dict) -> str:
    lines = ["# ernie45 on a CUDA GPU (bench/gpu_speed.py)", "",
             f"Command: `{res['command']}`", "", f"Device: {res['device_name']}; torch {res['torch']}; "
             f"triton {res['triton']}.", ""]
    h = res.get("hbm", {})
    if "read_gb_s" in h:
        lines += [f"Measured memory bandwidth: read {h['read_gb_s']:.0f} GB/s (torch.sum over "
                  f"{h['bytes'] / 2**30:.0f} GiB), copy {h['copy_gb_s_read_plus_write']:.0f} GB/s read+write.", ""]
    m = res.get("medium", {})
    if "graph_decode_tok_s" in m:
        t = m.get("transformers", {})
        lines += ["## bench-medium, bf16, batch-1 greedy decode", "",
                  "| system | decode tok/s | prefill tok/s (512) |", "|---|---|---|",
                  f"| ernie45 CUDA graph | {fmt(m['graph_decode_tok_s'])} | {fmt(m['prefill_tok_s'])} |",
                  f"| ernie45 eager | {fmt(m['eager_decode_tok_s'])} | (same) |",
                  f"| transformers | {fmt(t.get('decode_tok_s'))} | {fmt(t.get('prefill_tok_s'))} |", "",
                  f"graph / transformers: {fmt(m.get('graph_decode_vs_transformers'), 2)}x; graph / roofline "
                  f"({fmt(m.get('roofline_tok_s'), 0)} tok/s = read rate / {m['active_weight_bytes'] / 1e6:.0f} MB): "
                  f"{fmt(100 * m['graph_decode_of_roofline'] if 'graph_decode_of_roofline' in m else None, 0)}%. "
                  f"Greedy tokens match the eager reference: {m['greedy_matches_reference']} (first "
                  f"{m['greedy_prefix_agreement']} of {m['new_tokens']} agree). Peak GPU memory "
                  f"{fmt(m.get('peak_gpu_bytes', 0) / 2**20, 0)} MiB.", ""]
        q = m.get("int4", {})
        if "graph_decode_tok_s" in q:
            lines += [f"int4 (RTN, group 128, Triton kernel): CUDA graph {fmt(q['graph_decode_tok_s'])} tok/s, eager "
                      f"reference {fmt(q['eager_decode_tok_s'])} tok/s; greedy tokens match the eager int4 "
                      f"reference: {q['greedy_matches_reference']} (first {q['greedy_prefix_agreement']} agree).", ""]
    L = res.get("layer300b", {})
    if "bytes_per_step" in L:
        lines += ["## One ERNIE-4.5-300B-A47B MoE layer, int4, batch-1 decode step", "",
                  f"Graph replay {fmt(L.get('graph_ms_per_step'), 3)} ms/step (eager {fmt(L['eager_ms_per_step'], 3)}"
                  f" ms), reading {L['bytes_per_step'] / 1e6:.0f} MB: {fmt(L['effective_gb_s'], 0)} GB/s = "
                  f"{fmt(100 * L['of_hbm_read'] if 'of_hbm_read' in L else None, 0)}% of the measured read rate. "
                  f"bf16 head {fmt(L['head_ms'], 3)} ms. Extrapolated ({L['extrapolated']['assumption']}): "
                  f"{fmt(L['extrapolated']['tok_s'])} tok/s.", ""]
    for part in ("hbm", "medium", "layer300b"):
        if "error" in res.get(part, {}):
            lines += [f"**{part} failed**: `{res[part]['error'].splitlines()[-1]}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--work", default="/tmp/ernie45-bench")
    p.add_argument("--model", help="HF-layout checkpoint (default: a random bench-medium one, made in --work)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: hbm, medium, layer300b")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--hbm-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models (smoke test; numbers mean nothing)")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.prefill_tokens, args.context, args.steps, args.hbm_gib = 6, 16, 8, 3, 0.01
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for a GPU machine (`--device cpu --quick` smoke-tests it)")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = {"command": "python bench/gpu_speed.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
           "triton": triton_version,
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    skip = set(filter(None, args.skip.split(",")))
    bw = None
    for name, fn in (("hbm", lambda: hbm(device, args.hbm_gib)), ("medium", lambda: medium(args, device, bw)),
                     ("layer300b", lambda: layer300b(args, device, bw))):
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001 - record and go on: one lease, every part that works
            res[name] = {"error": traceback.format_exc()}
        res[name]["seconds"] = time.perf_counter() - t0
        if name == "hbm" and "read_gb_s" in res[name]:
            bw = res[name]
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_speed.json").write_text(json.dumps(res, indent=1))
    (out / "gpu_speed.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
