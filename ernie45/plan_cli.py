"""``ernie45 plan``: the GPU requirements planner on the command line (table or ``--json``) and, with
``--serve``, as a local web page.

``register_cli(subparsers)`` adds the subcommand to ``ernie45``'s parser; ``python -m ernie45.plan_cli``
runs it alone. Exit status: 0, or 1 when a named GPU setup does not fit (verdict ``no`` or ``invalid``),
2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError
from .plan import COMPONENTS, DEFAULT_PREFILL_CHUNK, KV_DTYPE_BYTES, MIXED_2BIT_INT4_MOE_LAYERS, SCHEMES
from .plan_gpus import DEFAULT_GPU_MEMORY_UTILIZATION, GIB, catalogue
from .plan_parallel import DEFAULT_HOST_BANDWIDTH_GBS
from .plan_report import PlanRequest, build_report

EPILOG = ("GPU names are matched case-insensitively (H100, h200, A100-80GB, RTX4090, MI300X, 'M2 Ultra'); "
          "known: " + ", ".join(g.name for g in catalogue()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset name (ERNIE-4.5-300B-A47B, ERNIE-4.5-21B-A3B, ERNIE-4.5-0.3B) "
                   "or a checkpoint directory / config.json")
    p.add_argument("--quant", default="bf16", choices=SCHEMES, help="weight scheme (default bf16)")
    p.add_argument("--context", type=int, help="tokens per sequence held in the KV cache (prompt + output)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences (default 1)")
    p.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPE_BYTES), help="KV cache dtype")
    p.add_argument("--gpu", help="GPU kind, e.g. H100, H200, A100-80GB, RTX4090")
    p.add_argument("--num-gpus", type=int, help="GPU count (default: the fewest that fit)")
    p.add_argument("--tp", type=int, help="tensor-parallel ways per stage")
    p.add_argument("--ep", type=int, help="expert-parallel ways per stage")
    p.add_argument("--pp", type=int, help="pipeline stages")
    p.add_argument("--offload-experts", action="store_true", help="keep routed experts in host RAM")
    p.add_argument("--mtp", action="store_true", help="also load the MTP (speculative) block")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="tokens per prefill step")
    p.add_argument("--int4-moe-layers", type=int, default=MIXED_2BIT_INT4_MOE_LAYERS,
                   help="mixed-2bit: MoE layers (from the first) whose experts stay int4")
    p.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                   help="share of each GPU's memory the serving engine fills (default "
                   f"{DEFAULT_GPU_MEMORY_UTILIZATION}, vLLM's default; 1.0 plans with the whole card)")
    p.add_argument("--host-bw", type=float, default=DEFAULT_HOST_BANDWIDTH_GBS,
                   help="host RAM bandwidth in GB/s for offloaded experts")
    p.add_argument("--no-recommend", action="store_true", help="skip the per-GPU-kind recommendations")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--serve", action="store_true", help="serve the planner web page instead")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8045, help="--serve: port (default 8045; 0 picks a free one)")


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="GPU memory / throughput requirements of an ERNIE 4.5 setup",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest(model=args.model, quant=args.quant, context=args.context, batch=args.batch,
                       kv_dtype=args.kv_dtype, gpu=args.gpu, num_gpus=args.num_gpus, tp=args.tp, ep=args.ep,
                       pp=args.pp, offload_experts=args.offload_experts, mtp=args.mtp,
                       prefill_chunk=args.prefill_chunk, int4_moe_layers=args.int4_moe_layers,
                       gpu_memory_utilization=args.gpu_memory_utilization, host_bandwidth_gbs=args.host_bw,
                       recommendations=not args.no_recommend)


def run(args: argparse.Namespace) -> int:
    if args.serve:
        from .plan_server import serve
        serve(args.host, args.port, default_model=args.model)
        return 0
    if not args.model or args.context is None:
        print("ernie45 plan: --model and --context are required (or use --serve)", file=sys.stderr)
        return 2
    try:
        report = build_report(request_from_args(args))
    except (ValueError, ConfigError) as e:
        print(f"ernie45 plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["fit"] in ("no", "invalid") else 0


# ---- the readable table ---------------------------------------------------------------------------
def _b(n: int) -> str:
    return f"{n:>17,} B {n / GIB:>9.2f} GiB"


def _range(d: dict) -> str:
    return f"{d['low'] / GIB:.2f} - {d['high'] / GIB:.2f} GiB"


def _components(weights: dict) -> list[str]:
    return [f"  {c:<22}{_b(weights[c])}" for c in COMPONENTS if c in weights]


def format_report(r: dict) -> str:
    req, m, w = r["request"], r["model"], r["whole_model"]
    lines = [f"{m['name']}: weights {req['quant']}, KV {req['kv_dtype']}, context {req['context']:,} x batch "
             f"{req['batch']}{', MTP loaded' if req['mtp'] else ''}",
             f"parameters: {m['params']['total']:,} total, {m['params']['active']:,} active per token",
             "", "Whole model (one device)"]
    lines += _components(w["weights"])
    lines += [f"  {'weights':<22}{_b(w['weights_total'])}"]
    if w["host_weights"]:
        lines.append(f"  {'experts in host RAM':<22}{_b(w['host_weights'])}")
    lines += [f"  {'KV cache':<22}{_b(w['kv_cache'])}   ({w['kv_bytes_per_token']:,} B/token)",
              f"  {'activations':<22}{_b(w['activations'])}   (prefill chunk {w['prefill_chunk']:,})",
              f"  {'overhead':<22}  {_range(w['overhead'])}", f"  {'total':<22}  {_range(w['total'])}"]
    lines += [f"! {w}" for w in r["warnings"]]
    lines += _layout_lines(r)
    if r["recommendations"]:
        lines += ["", *_recommendation_lines(r["recommendations"], req)]
    return "\n".join(lines)


def _layout_lines(r: dict) -> list[str]:
    lay, gpu = r["layout"], r["gpu"]
    if lay is None:
        return ["", f"{gpu['name']}: does not fit in any layout the planner searches ({r['layout_reason']})"]
    kind = f"{gpu['name']} [{gpu['memory_label']}]" if gpu else "GPU"
    lines = ["", f"Layout: {lay['num_gpus']} x {kind}, tp {lay['tp']} ep {lay['ep']} pp {lay['pp']} "
             f"({r['layout_reason']})" + _verdict(r["fit"])]
    lines += [f"  ! {e}" for e in r["layout_errors"]]
    for st in r["per_gpu"]:
        lines += [f"Per GPU, stage {st['stage']} ({st['gpus']} GPU{'s' * (st['gpus'] > 1)}, "
                  f"layers {st['layers'][0]}-{st['layers'][1]})", *_components(st["weights"]),
                  f"  {'KV cache':<22}{_b(st['kv_cache'])}", f"  {'activations':<22}{_b(st['activations'])}",
                  f"  {'overhead':<22}  {_range(st['overhead'])}", f"  {'total':<22}  {_range(st['total'])}"]
        if st["host_weights_per_gpu"]:
            lines.append(f"  {'host RAM (experts)':<22}{_b(st['host_weights_per_gpu'])}")
    return lines + _answer_lines(r)


def _verdict(fit: str | None) -> str:
    if fit is None:
        return ""
    return " -> invalid layout" if fit == "invalid" else f" -> fits: {fit}"


def _answer_lines(r: dict) -> list[str]:
    if r["gpu"] is None:
        return []
    req, gpu = r["request"], r["gpu"]
    out = [f"Budget per GPU: {gpu['budget_bytes'] / GIB:.2f} GiB ({gpu['gpu_memory_utilization']} x "
           f"{gpu['usable_bytes'] / GIB:.2f} GiB usable)"]
    if r["min_gpus"]:
        out.append(f"Fewest {r['gpu']['name']} that fit: {r['min_gpus']['count']}")
    if r["max_context"] is not None:
        out += [f"Max context at batch {req['batch']}: {r['max_context']:,} tokens "
                f"(model maximum {r['model']['max_position_embeddings']:,})",
                f"Max concurrent sequences at {req['context']:,} tokens: {r['max_sequences']:,}",
                f"Decode upper bound: {r['decode_bound']['per_sequence_tok_s']:.1f} tok/s per sequence, "
                f"{r['decode_bound']['total_tok_s']:.1f} tok/s total (memory bandwidth)"]
    return out


def _recommendation_lines(rows: list[dict], req: dict) -> list[str]:
    out = [f"Fewest GPUs per kind (context {req['context']:,}, batch {req['batch']}, "
           f"gpu_memory_utilization {req['gpu_memory_utilization']})",
           f"  {'GPU':<16}{'memory':<24}{'min':>4}  {'tp/ep/pp':<10}{'max ctx':>9}{'max seqs':>10}{'tok/s':>9}"]
    for row in rows:
        if row["min_gpus"] is None:
            out.append(f"  {row['gpu']:<16}{row['memory_label']:<24}   -  more than 64")
            continue
        lay = row["layout"]
        out.append(f"  {row['gpu']:<16}{row['memory_label']:<24}{row['min_gpus']:>4}  "
                   f"{lay['tp']}/{lay['ep']}/{lay['pp']:<6}{row['max_context']:>9,}{row['max_sequences']:>10,}"
                   f"{row['decode_bound']['per_sequence_tok_s']:>9.1f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ernie45 plan", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
