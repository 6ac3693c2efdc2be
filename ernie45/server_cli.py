"""``ernie45 serve``: load a checkpoint and its tokenizer, and serve the OpenAI-compatible API.

Binds 127.0.0.1 unless ``--host`` says otherwise (and warns when it is exposed without a key). On
SIGTERM or Ctrl-C uvicorn stops accepting connections and gives running requests
``--shutdown-timeout`` seconds to finish; whatever is still running after that is aborted, its
stream ends with an error event, and the engine thread stops. Also runnable as
``python -m ernie45.server_cli serve ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULT_MODEL_DIR, resolve_model_dir as _model_dir
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                              description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and "
                              "/metrics with continuous batching over a paged KV cache.")
    p.add_argument("--model", help=f"checkpoint directory with tokenizer files (default: the embedded default "
                   f"model, {DEFAULT_MODEL_DIR}, when it exists)")
    p.add_argument("--served-model-name", help="model id clients send and /v1/models lists (default: the "
                   "directory name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), float32, bfloat16, float16")
    p.add_argument("--kv-cache-mb", type=float, default=256.0, help="memory for the paged KV cache (MiB)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted (MiB)")
    p.add_argument("--shutdown-timeout", type=int, default=10, help="seconds running requests get to finish "
                   "on SIGTERM before they are aborted")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is fastest for tiny "
                   "models on a busy machine)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    from .cli import add_parallel_args

    add_parallel_args(p)
    p.set_defaults(func=cmd_serve)


def resolve_model_dir(model: str | None) -> Path:
    """``--model`` or the embedded default model, with the tokenizer files the server needs."""
    path = _model_dir(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model} is not a directory; pass a checkpoint directory")
    if not any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        raise FileNotFoundError(f"{path} has no tokenizer.model or tokenizer.json; the server needs "
                         "the tokenizer (and its chat template) next to the weights")
    return path


def build_engine(args: argparse.Namespace, path: Path, plan=None):
    """Model + engine from parsed flags; `plan` shards the model over a torchrun job."""
    import torch

    from .engine import Engine
    from .weights import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(path, dtype=args.dtype, transform=plan)
    if plan is None:  # single process: the fast CPU decode path (tensor-parallel ranks keep their modules)
        from .cli import accelerated

        model = accelerated(model)
    return Engine(model, block_size=args.block_size, kv_cache_bytes=int(args.kv_cache_mb * (1 << 20)),
                  max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)


def build_app(args: argparse.Namespace, engine=None):
    """Model, tokenizer, engine and app from parsed flags (split out so tests and benches can reuse it)."""
    path = resolve_model_dir(args.model)  # before the heavy imports: a wrong path fails in milliseconds
    from .server import create_app
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    engine = engine or build_engine(args, path)
    name = args.served_model_name or path.resolve().name
    return create_app(engine, tokenizer, name, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * (1 << 20)))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.host not in LOOPBACK and not args.api_key:
        print(f"ernie45 serve: warning: binding {args.host} without --api-key lets anyone who can reach this "
              "machine use the model", file=sys.stderr)
    if args.tp * args.ep > 1:
        return _serve_parallel(args)
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def _serve_parallel(args: argparse.Namespace) -> int:
    """Under torchrun: rank 0 serves HTTP and broadcasts every step; the other ranks follow."""
    import uvicorn

    from .distributed import DistributedError, init_parallel, report_failure, shutdown
    from .distributed_serve import StepBroadcaster, control_group, follow

    path = resolve_model_dir(args.model)
    try:
        plan = init_parallel(args.tp, args.ep, args.dist_timeout)
        group = control_group()
        engine = build_engine(args, path, plan)
        if plan.rank != 0:
            follow(engine, group)
            shutdown(0)
        engine.on_batch = StepBroadcaster(group)
        try:
            uvicorn.run(build_app(args, engine), host=args.host, port=args.port, log_level=args.log_level,
                        access_log=False, timeout_graceful_shutdown=args.shutdown_timeout)
        finally:
            engine.on_batch.stop()
        shutdown(0)
    except DistributedError as e:
        return report_failure(e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ernie45")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # as `ernie45.cli.main` (ConfigError, CheckpointError included)
        print(f"ernie45 serve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
