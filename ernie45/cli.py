"""The one `ernie45` entry point. Each subcommand is a plain function taking parsed args, returning an exit code.

Errors a user can fix (bad path, bad config, bad flag value) print one clear line to stderr and exit 2;
they never end in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Feature modules that add their own subcommand through `register_cli(subparsers)`.
PLUGIN_MODULES = ("ernie45.plan_cli", "ernie45.train.cli", "ernie45.server_cli", "ernie45.quant.cli", "ernie45.bench")


def cmd_info(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .params import count_params

    cfg = resolve_config(args.model)
    info = {"config": cfg.to_dict(), **count_params(cfg)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"{args.model}: {c['model_type']}, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
          f"heads {c['num_attention_heads']}/{c['num_key_value_heads']} x {c['head_dim']}, vocab {c['vocab_size']}")
    if cfg.is_moe:
        print(f"  MoE layers {len(c['moe_layers'])} ({c['moe_layers'][0]}..{c['moe_layers'][-1]}), "
              f"{cfg.moe_num_experts} experts top-{cfg.moe_k} width {cfg.moe_intermediate_size}, "
              f"{cfg.moe_num_shared_experts} shared")
    for key in ("params_total", "params_active", "params_mtp"):
        print(f"  {key:14s} {info[key]:>18,d}  ({info[key] / 1e9:.2f} B)")
    return 0


def _prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    if tokenizer is None:
        raise ValueError(f"--prompt needs tokenizer files in {args.model} (tokenizer.model or "
                         "tokenizer.json); use --prompt-ids instead")
    if args.chat:
        return tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    return tokenizer.encode(args.prompt)


def _load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return None
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(path)


def accelerated(model):
    """The fast CPU decode path (fast.py) unless ERNIE45_FAST=0 asks for the reference modules."""
    import os

    from .fast import accelerate

    return model if os.environ.get("ERNIE45_FAST", "1") == "0" else accelerate(model)


def _load_for_launch(args: argparse.Namespace):
    """Load the model, sharded over the torchrun job when --tp/--ep ask for it. Returns (model, rank)."""
    from .weights import load_model

    if args.tp * args.ep == 1:
        return accelerated(load_model(args.model, dtype=args.dtype)), 0
    from .distributed import init_parallel

    plan = init_parallel(args.tp, args.ep, args.dist_timeout)
    return load_model(args.model, dtype=args.dtype, transform=plan), plan.rank


def cmd_generate(args: argparse.Namespace) -> int:
    if args.tp * args.ep == 1:
        return _generate(args)
    from .distributed import DistributedError, report_failure, shutdown

    try:
        code = _generate(args)
    except DistributedError as e:
        return report_failure(e)
    shutdown(code)  # does not return


def _generate(args: argparse.Namespace) -> int:
    from .generation import GenerationConfig, generate_stream
    from .weights import resolve_model_dir

    args.model = str(resolve_model_dir(args.model))
    tokenizer = _load_tokenizer(Path(args.model)) if args.prompt is not None else None
    ids = _prompt_ids(args, tokenizer)  # before the (slow) model load: a bad prompt fails at once
    model, rank = _load_for_launch(args)
    stops = None if not args.chat or tokenizer is None else \
        tuple({*model.config.eos_token_ids, tokenizer.eos_token_id, tokenizer.sep_token_id} - {None})
    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_token_ids=() if args.ignore_eos else stops)
    stream = generate_stream(model, ids, gcfg)
    if rank != 0:  # every rank computes (replicated activations); rank 0 speaks
        for _ in stream:
            pass
        return 0
    if args.json or tokenizer is None:
        out = list(stream)
        print(json.dumps({"token_ids": out}) if args.json else ",".join(map(str, out)))
        return 0
    from .tokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)  # no "</s>" in the printed text
    for token in stream:
        sys.stdout.write(detok.feed(token))
        sys.stdout.flush()
    sys.stdout.write(detok.finish() + "\n")
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .model import build_model, init_random
    from .weights import save_checkpoint

    cfg = resolve_config(args.like)
    if args.std <= 0:
        raise ValueError(f"--std must be > 0, got {args.std}")
    model = init_random(build_model(cfg), seed=args.seed, std=args.std)
    out = save_checkpoint(model, args.out)
    print(f"wrote a randomly initialised {args.like} checkpoint to {out} (random weights: output is noise)")
    return 0


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (launch with torchrun --nproc-per-node TP*EP -m ernie45 ...)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (attention heads, MLP widths)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (routed experts split evenly)")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds to wait for the rendezvous and for any collective before failing (default 300)")


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat_loop
    from .generation import GenerationConfig
    from .weights import load_model, resolve_model_dir

    path = resolve_model_dir(args.model)
    tokenizer = _load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.model or tokenizer.json); chat needs them")
    model = accelerated(load_model(path, dtype=args.dtype))
    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    chat_loop(model, tokenizer, gcfg, system=args.system)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .evaluate import perplexity
    from .weights import load_model, resolve_model_dir

    path = resolve_model_dir(args.model)
    tokenizer = _load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files; perplexity of a text file needs them")
    text = Path(args.text_file).read_text(encoding="utf-8")
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text)
    result = perplexity(load_model(path, dtype=args.dtype), ids, args.window, args.stride, progress=not args.json)
    if args.json:
        print(json.dumps({"perplexity": result["perplexity"], "tokens": result["tokens"]}))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), float32, bfloat16, float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45", description="Run Baidu's ERNIE 4.5 models (MoE and dense) "
                                "from their Hugging Face -PT checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="config and parameter counts of a preset or checkpoint")
    info.add_argument("model", help="checkpoint directory or preset name (e.g. ERNIE-4.5-300B-A47B)")
    info.add_argument("--json", action="store_true", help="print JSON (normalised config + params_*)")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate tokens with the reference loop (greedy or sampled)")
    gen.add_argument("--model", help="checkpoint directory (config.json + safetensors); default: the embedded model")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,5,9")
    src.add_argument("--prompt", help="prompt text (needs tokenizer files in the checkpoint); streams text")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template as a user turn "
                     "(and stop at the end-of-turn token)")
    _add_sampling_args(gen, temperature=0.0, max_new=32)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    gen.add_argument("--json", action="store_true", help='print {"token_ids": [...]} (new tokens only)')
    add_parallel_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat (history, chat template, streaming)")
    chat.add_argument("--model", help="checkpoint directory with tokenizer files; default: the embedded model")
    chat.add_argument("--system", help="a system message that opens the conversation")
    _add_sampling_args(chat, temperature=0.7, max_new=256)
    chat.set_defaults(func=cmd_chat)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file (sliding window)")
    ppl.add_argument("--model", help="checkpoint directory with tokenizer files; default: the embedded model")
    ppl.add_argument("--text-file", required=True, help="UTF-8 text; scored after a leading <s>")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per forward pass (default 1024)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens the window advances (default window/2)")
    ppl.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, auto")
    ppl.add_argument("--json", action="store_true", help='print {"perplexity": ..., "tokens": ...}')
    ppl.set_defaults(func=cmd_perplexity)

    rnd = sub.add_parser("random-checkpoint", help="write a randomly initialised checkpoint (official layout)")
    rnd.add_argument("out", help="output directory")
    rnd.add_argument("--like", default="mini-300B-A47B", help="preset or checkpoint whose config to use "
                     "(default: mini-300B-A47B, a miniature of the 300B structure)")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--std", type=float, default=0.02,
                     help="std of the normal init (default 0.02; larger spreads logits, so greedy output varies)")
    rnd.set_defaults(func=cmd_random_checkpoint)

    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"ernie45 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
