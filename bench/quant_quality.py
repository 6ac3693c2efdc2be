"""Quantization quality, size and speed -> bench/results/quant_quality.json and .md

No trained default model exists yet (ernie45/data/default_model is absent), so two stand-ins are measured,
and the tables say which is which:

A. "tiny-trained": a byte-level ERNIE-4.5-MoE miniature (4 layers, 1 dense + 3 MoE, 8 experts top-2,
   no shared experts like the 300B, hidden 128, vocab 256 = bytes) trained here for `--steps` AdamW steps on the train
   split of the project's corpus (Shakespeare, ernie45.train.corpus split rule). Its bf16 checkpoint is
   quantized with every scheme/method through the same streaming code as `ernie45 quantize`;
   perplexity per byte on the corpus' held-out split, calibration windows from the train split.
   Also: the relative output error of single layers (RTN vs GPTQ) on held-out activations.
B. "medium-random": random weights at realistic widths (hidden 1024, 64 experts top-6 of width 256,
   2 shared, vocab 32000; ~0.2 B params): bytes on disk against the planner and greedy decode tokens/s
   of each scheme (bf16 and fp32 activations) against bf16 and fp32 weights, in this run on this machine.
C. One 4096 x 4096 weight: milliseconds per matmul of each path, for decode-sized and prefill-sized inputs.
mixed-2bit keeps the experts of the first `int4_moe_layers=1` MoE layer at int4 in both models (they
have 3 MoE layers; the 300B default of 4 would leave no int2 experts).

    python bench/quant_quality.py [--steps 400] [--threads 1] [--workdir /tmp/ernie45-quant-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ernie45 import plan
from ernie45.config import ModelConfig
from ernie45.generation import GenerationConfig, generate_stream
from ernie45.model import build_model, init_random
from ernie45.quant.formats import FORMATS, dequantize, quantize_rtn
from ernie45.quant.gptq import gptq_quantize, output_error, quantize_experts_gptq
from ernie45.quant.stream import LayerInputs, calibration_windows, quantize_checkpoint
from ernie45.train.balance import RoutingMonitor
from ernie45.train.corpus import read_shakespeare, split_document
from ernie45.weights import load_model, save_checkpoint

RESULTS = Path(__file__).parent / "results"
TINY = dict(model_type="ernie4_5_moe", vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_num_experts=8, moe_k=2,
            moe_intermediate_size=128, moe_num_shared_experts=0, moe_layer_start_index=1, tie_word_embeddings=True,
            max_position_embeddings=512, torch_dtype="bfloat16")
MEDIUM = dict(model_type="ernie4_5_moe", vocab_size=32000, hidden_size=1024, intermediate_size=3072,
              num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2, head_dim=128, moe_num_experts=64,
              moe_k=6, moe_intermediate_size=256, moe_num_shared_experts=2, moe_layer_start_index=1,
              tie_word_embeddings=True, torch_dtype="bfloat16")
RUNS = [("int8", "rtn"), ("int8", "gptq"), ("int4", "rtn"), ("int4", "gptq"), ("int2", "rtn"), ("int2", "gptq"),
        ("mixed-2bit", "rtn"), ("mixed-2bit", "gptq"), ("fp8", "rtn")]
INT4_MOE_LAYERS = 1
SEQ, BATCH = 128, 12


# ---- A: tiny trained model -----------------------------------------------------------------------
def corpus_streams() -> dict[str, np.ndarray]:
    """train / heldout byte streams of the Shakespeare corpus, split by the corpus module's rule."""
    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    for doc in read_shakespeare():
        for split, pieces in split_document(doc, 0.02, 4000).items():
            parts[split] += pieces
    return {s: np.frombuffer("\n\n".join(p).encode("utf-8"), dtype=np.uint8) for s, p in parts.items()}


def train_tiny(stream: np.ndarray, steps: int, seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig.from_dict({**TINY, "torch_dtype": "float32"})
    model = init_random(build_model(cfg), seed=seed, std=0.02).train()
    params = [p for n, p in model.named_parameters() if "correction_bias" not in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    monitor = RoutingMonitor(model)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(stream.astype(np.int64))
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(data) - SEQ - 1, BATCH)
        batch = torch.stack([data[s:s + SEQ + 1] for s in starts])  # [B, T+1]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        monitor.update_bias(1e-2)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    monitor.close()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-byte cross-entropy) over windows [N, T+1]."""
    total, count = 0.0, 0
    for b in range(0, len(windows), 16):
        w = windows[b:b + 16]
        logits = model(w[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def quality(work: Path, streams: dict[str, np.ndarray], steps: int) -> dict:
    t0 = time.perf_counter()
    model = train_tiny(streams["train"], steps)
    src = work / "tiny-bf16"
    save_checkpoint(model, src, dtype=torch.bfloat16)  # the "original" checkpoint, as released models are
    cfg = ModelConfig.from_file(src)
    held = calibration_windows(streams["heldout"], 256, SEQ + 1)  # [256, T+1]
    calib = calibration_windows(streams["train"], 32, 256)  # [32, 256]
    base = perplexity(load_model(src, dtype=torch.float32), held)
    rows = [{"scheme": "bf16", "method": "-", "bytes": _tensor_bytes(src), "planner_bytes": _planned(cfg, "bf16"),
             "ppl": base, "ppl_change_pct": 0.0}]
    for scheme, method in RUNS:
        out = work / f"tiny-{scheme}-{method}"
        s = quantize_checkpoint(src, out, scheme, method, calib if method == "gptq" else None, INT4_MOE_LAYERS,
                                progress=False)
        ppl = perplexity(load_model(out, dtype=torch.float32), held)
        rows.append({"scheme": scheme, "method": method, "bytes": s["tensor_bytes"], "file_bytes": s["file_bytes"],
                     "planner_bytes": _planned(cfg, scheme), "ppl": ppl, "ppl_change_pct": 100 * (ppl / base - 1),
                     "quantize_s": round(s["seconds"], 2)})
        print(f"  {scheme:10s} {method:4s} ppl {ppl:.4f} ({rows[-1]['ppl_change_pct']:+.2f}%)", flush=True)
    errors = layer_errors(load_model(src, dtype=torch.float32), calib, held[:, :-1])
    return {"model": "tiny-trained", "train_steps": steps, "train_seconds": round(time.perf_counter() - t0, 1),
            "heldout_tokens": int(held[:, 1:].numel()), "calibration": list(calib.shape), "rows": rows,
            "layer_errors": errors}


def layer_errors(model: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor, layer_idx: int = 2) -> list[dict]:
    """Relative output error on held-out activations of layer `layer_idx`'s weights: RTN vs GPTQ."""
    cfg, emb = model.config, model.model.embed_tokens.weight
    cal_in, held_in = LayerInputs(cfg, calib, emb), LayerInputs(cfg, held, emb)
    for layer in model.model.layers[:layer_idx]:
        cal_in.run(layer, update=True)
        held_in.run(layer, update=True)
    layer = model.model.layers[layer_idx]
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.experts"]
    h_cal, h_held = cal_in.hessians(layer, names), held_in.hessians(layer, names)
    rows = []
    for fmt in ("int4", "int2"):
        f = FORMATS[fmt]
        for name in names[:2]:
            w = layer.get_submodule(name).weight.detach()
            g = quantize_rtn(w, f).group_size
            rtn, gq = dequantize(quantize_rtn(w, f)), dequantize(gptq_quantize(w, h_cal[name].h, f, g))
            h = h_held[name].h
            rows.append({"weight": f"layers.{layer_idx}.{name}", "format": fmt, "rtn": output_error(w, rtn, h),
                         "gptq": output_error(w, gq, h)})
        for proj, attr in (("gate_proj", "gate_up"), ("down_proj", "down")):
            w = getattr(layer.mlp.experts, proj).detach()  # [E, N, K]
            g = quantize_rtn(w[0], f).group_size
            rtn = dequantize(quantize_rtn(w, f))
            gq = dequantize(quantize_experts_gptq(w, getattr(h_cal["mlp.experts"], attr), f, g)[0])
            hs = [h.h.double() for h in getattr(h_held["mlp.experts"], attr)]
            rows.append({"weight": f"layers.{layer_idx}.mlp.experts.*.{proj}", "format": fmt,
                         "rtn": _pooled(w, rtn, hs), "gptq": _pooled(w, gq, hs)})
    return rows


def _pooled(w: torch.Tensor, wq: torch.Tensor, hs: list[torch.Tensor]) -> float:
    """Output error pooled over experts (each on its own routed held-out tokens)."""
    num = sum(float((((w[e] - wq[e]).double() @ h) * (w[e] - wq[e]).double()).sum()) for e, h in enumerate(hs))
    den = sum(float(((w[e].double() @ h) * w[e].double()).sum()) for e, h in enumerate(hs))
    return num / den


# ---- B: medium random model: bytes and decode speed ---------------------------------------------
def speed(work: Path, new_tokens: int, rounds: int = 3) -> dict:
    """Bytes of each scheme, then decode tok/s of every model, measured in interleaved rounds (best of
    `rounds`) so that a change in the machine's load hits all variants alike."""
    src = work / "medium-bf16"
    cfg = ModelConfig.from_dict(MEDIUM)
    save_checkpoint(init_random(build_model(cfg), seed=0), src, dtype=torch.bfloat16)
    rows = {"fp32": {"scheme": "fp32"}, "bf16": {"scheme": "bf16", "bytes": _tensor_bytes(src),
                                                 "planner_bytes": _planned(cfg, "bf16")}}
    models = {("fp32", "fp32"): load_model(src, dtype=torch.float32, progress=False),
              ("bf16", "bf16"): load_model(src, dtype=torch.bfloat16, progress=False)}
    for scheme in ("int8", "int4", "int2", "mixed-2bit", "fp8"):
        out = work / f"medium-{scheme}"
        s = quantize_checkpoint(src, out, scheme, "rtn", None, INT4_MOE_LAYERS, progress=False)
        rows[scheme] = {"scheme": scheme, "bytes": s["tensor_bytes"], "planner_bytes": _planned(cfg, scheme),
                        "quantize_s": round(s["seconds"], 1)}
        for act in ("bf16", "fp32") if scheme != "fp8" else ("bf16",):  # fp8 on CPU: the slow reference
            models[(scheme, act)] = load_model(out, dtype=act, progress=False)
    for _ in range(rounds):
        for (scheme, act), model in models.items():
            key = f"{act}_tok_s"
            rows[scheme][key] = max(rows[scheme].get(key, 0.0), _decode(model, new_tokens))
    for scheme, row in rows.items():
        print(f"  {scheme:10s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("tok_s")))
    return {"model": "medium-random", "params": sum(p.numel() for p in build_model(cfg).parameters()),
            "rounds": rounds, "rows": list(rows.values())}


@torch.no_grad()
def _decode(model: torch.nn.Module, new_tokens: int) -> float:
    """Greedy decode tokens/s after a 16-token prompt (prefill excluded)."""
    prompt = torch.randint(0, MEDIUM["vocab_size"], (16,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = generate_stream(model, prompt, GenerationConfig(new_tokens, stop_token_ids=()))
    times = [time.perf_counter() for _ in stream]
    return (len(times) - 1) / (times[-1] - times[0])


# ---- C: one 4096 x 4096 weight: where each matmul path wins -------------------------------------
@torch.no_grad()
def kernels(rows_list=(1, 64, 256, 512)) -> dict:
    """ms per matmul of one [4096, 4096] weight: plain fp32/bf16 F.linear, and every route of each format
    (kernels with bf16 activations, dequantize + fp32 GEMM with fp32 ones); `auto` marks the route taken."""
    from ernie45.quant import QuantLinear

    w = torch.randn(4096, 4096) * 0.02
    quant = {f: QuantLinear.from_quantized(quantize_rtn(w, FORMATS[f])) for f in ("int8", "int4", "int2", "fp8")}
    rows = []
    for m in rows_list:
        x32 = torch.randn(m, 4096)
        for name, weight in (("fp32", w), ("bf16", w.bfloat16())):
            x = x32.to(weight.dtype)
            rows.append({"weight": name, "rows": m, "route": "F.linear", "auto": True,
                         "ms": _time(lambda: F.linear(x, weight))})
        for name, layer in quant.items():
            for route in filter(None, (layer.kernel(), "fp32")):
                x = x32.to(torch.bfloat16 if route != "fp32" else torch.float32)
                rows.append({"weight": name, "rows": m, "route": route, "auto": layer.route(x32) == route,
                             "ms": _time(lambda: layer.matmul(x, route=route))})
    return {"shape": [4096, 4096], "rows": rows}


def _time(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _tensor_bytes(path: Path) -> int:
    from ernie45.safetensors_mmap import SafetensorsFile

    with SafetensorsFile(path / "model.safetensors") as f:
        return sum(t.nbytes for t in f.tensors.values())


def _planned(cfg: ModelConfig, scheme: str) -> int:
    return sum(plan.weight_bytes(cfg, scheme, mtp=True, int4_moe_layers=INT4_MOE_LAYERS).values())


# ---- report --------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    q, s = res["quality"], res["speed"]
    bf16_speed = next(r["bf16_tok_s"] for r in s["rows"] if r["scheme"] == "bf16")
    fp32_speed = next(r["fp32_tok_s"] for r in s["rows"] if r["scheme"] == "fp32")
    load = f"load average {res['load_average_start']:.1f} -> {res['load_average_end']:.1f}"
    lines = [f"# Quantization quality, size and speed ({res['date']}, {res['machine']}, torch {res['torch']}, "
             f"{res['threads']} thread(s), {load})",
             "", "Written by `python bench/quant_quality.py`; the machine was shared with other jobs.", "",
             f"## A. tiny-trained (byte-level MoE miniature, {q['train_steps']} AdamW steps on the corpus train split)",
             f"Held-out perplexity per byte on {q['heldout_tokens']} corpus held-out bytes; GPTQ calibration "
             f"{q['calibration'][0]} x {q['calibration'][1]} train-split bytes. mixed-2bit: int4 experts in the first "
             f"{res['int4_moe_layers']} MoE layer.", "",
             "| scheme | method | bytes on disk | planner bytes | perplexity | vs bf16 |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['scheme']} | {r['method']} | {r['bytes']:,} | {r['planner_bytes']:,} | {r['ppl']:.4f} | "
              f"{r['ppl_change_pct']:+.2f}% |" for r in q["rows"]]
    lines += ["", "Relative output error tr(dW H dW^T)/tr(W H W^T) on held-out activations (GPTQ calibrated on "
              "train-split activations):", "", "| weight | format | RTN | GPTQ |", "|---|---|---:|---:|"]
    lines += [f"| {r['weight']} | {r['format']} | {r['rtn']:.4g} | {r['gptq']:.4g} |" for r in q["layer_errors"]]
    lines += ["", f"## B. medium-random ({s['params'] / 1e6:.0f} M params, random weights: bytes and speed only)",
              f"Greedy decode tokens/s, 16-token prompt, batch 1, prefill excluded, best of {s['rounds']} interleaved "
              "rounds. Quantized weights (RTN) loaded with bf16 or fp32 activations (embeddings/head in that dtype); "
              "the ratios use the faster of the two. fp8 runs the dequantize reference path on CPU.", "",
              "| scheme | bytes on disk | planner bytes | tok/s bf16 act. | tok/s fp32 act. | vs bf16 | vs fp32 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        b = f"{r['bytes']:,} | {r['planner_bytes']:,}" if "bytes" in r else "- | -"
        best = max(r.get("bf16_tok_s", 0), r.get("fp32_tok_s", 0))
        fmt = {k: f"{r[k]:.1f}" if k in r else "-" for k in ("bf16_tok_s", "fp32_tok_s")}
        lines.append(f"| {r['scheme']} | {b} | {fmt['bf16_tok_s']} | {fmt['fp32_tok_s']} | {best / bf16_speed:.2f}x | "
                     f"{best / fp32_speed:.2f}x |")
    k = res["kernels"]
    lines += ["", "## C. one 4096 x 4096 weight: milliseconds per matmul (best of 3)",
              "Plain `F.linear` on fp32/bf16 weights vs each `QuantLinear` route: the int8/int4 kernels (bf16 "
              "activations; int2 runs on the int4 kernel) and dequantize + fp32 GEMM (`fp32`). `auto` = the route "
              "`QuantLinear` picks for that many rows.", "",
              "| weight | rows | route | auto | ms |", "|---|---:|---|---|---:|"]
    lines += [f"| {r['weight']} | {r['rows']} | {r['route']} | {'yes' if r['auto'] else ''} | {r['ms']:.2f} |"
              for r in k["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/ernie45-quant-bench")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # One thread: on a shared 2-core machine, spinning OpenMP threads made every op 10-40x slower.
    torch.set_num_threads(args.threads)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "threads": args.threads, "int4_moe_layers": INT4_MOE_LAYERS,
           "load_average_start": os.getloadavg()[0]}
    print("A. training and quantizing the tiny model", flush=True)
    res["quality"] = quality(work, corpus_streams(), args.steps)
    print("B. medium random model: bytes and decode speed", flush=True)
    res["speed"] = speed(work, args.new_tokens)
    print("C. one 4096 x 4096 weight: matmul paths", flush=True)
    res["kernels"] = kernels()
    res["load_average_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_quality.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "quant_quality.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
