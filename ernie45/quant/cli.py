"""`ernie45 quantize`: write a weight-quantized copy of a checkpoint, layer by layer.

    ernie45 quantize --model DIR --scheme int8|int4|int2|mixed-2bit|fp8 [--method rtn|gptq]
                     [--calib FILE] --out DIR

Calibration (GPTQ only) comes from the project's own corpus, in any of these forms:
- a `.npy` token stream (what `ernie45 data tokenize` writes, e.g. `DATA/train.tokens.npy`);
- a corpus directory (`train.tokens.npy` if present, else `train.txt` with the checkpoint's tokenizer);
- a text file, tokenized with the checkpoint's tokenizer.
`--calib-samples` windows of `--calib-seq-len` tokens are taken evenly spaced over the stream.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .recipe import DEFAULT_INT4_MOE_LAYERS, METHODS, SCHEMES

TEXT_CHARS_PER_TOKEN = 8  # generous: a window of text long enough to hold seq_len tokens


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write a weight-quantized copy of a checkpoint "
                              "(int8, int4, int2, mixed-2bit, fp8; round-to-nearest or GPTQ)")
    p.add_argument("--model", required=True, help="source checkpoint directory (bf16/fp32 safetensors)")
    p.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="int8 (per channel), int4 (group 128), int2 (group 64), fp8 (e4m3, 128x128 blocks), "
                        "mixed-2bit (attention/dense/shared int8, first MoE layers' experts int4, rest int2)")
    p.add_argument("--method", default="rtn", choices=METHODS, help="rtn = round-to-nearest (default); "
                   "gptq = Hessian-based error compensation on calibration text (needs --calib)")
    p.add_argument("--calib", help="calibration tokens (.npy), a corpus directory, or a text file")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--int4-moe-layers", type=int, default=DEFAULT_INT4_MOE_LAYERS,
                   help=f"mixed-2bit: MoE layers whose experts stay int4 (default {DEFAULT_INT4_MOE_LAYERS})")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size in GiB (default 2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .stream import calibration_windows, quantize_checkpoint

    calib = None
    if args.method == "gptq":
        if not args.calib:
            raise ValueError("--method gptq needs --calib: e.g. the corpus tokens written by "
                             "`ernie45 data tokenize` (DATA/train.tokens.npy) or a text file")
        calib = calibration_windows(read_calibration(Path(args.calib), Path(args.model), args.calib_samples,
                                                     args.calib_seq_len), args.calib_samples, args.calib_seq_len)
    summary = quantize_checkpoint(args.model, args.out, args.scheme, args.method, calib, args.int4_moe_layers,
                                  max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=not args.quiet)
    for line in summary["group_fallbacks"]:
        print(f"group size fallback: {line}")
    print(f"wrote {args.scheme}/{args.method} checkpoint to {args.out}: {len(summary['files'])} file(s), "
          f"{summary['tensor_bytes']:,d} tensor bytes, {summary['seconds']:.1f} s")
    return 0


def read_calibration(path: Path, model_dir: Path, samples: int, seq_len: int) -> np.ndarray:
    """A token stream (1-D ids) from a .npy, a corpus directory or a text file."""
    if path.is_dir():
        tokens = path / "train.tokens.npy"
        path = tokens if tokens.is_file() else path / "train.txt"
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist; build the corpus with "
                                "`ernie45 data build-corpus` (and `ernie45 data tokenize`) or pass a text file")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False).reshape(-1)
    return _tokenize_spread(path.read_text(encoding="utf-8"), model_dir, samples, seq_len)


def _tokenize_spread(text: str, model_dir: Path, samples: int, seq_len: int) -> np.ndarray:
    """Tokenize only `samples` evenly spaced stretches of the text, each cut to `seq_len` tokens."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        raise ValueError(f"{model_dir} has no tokenizer files, so a text --calib cannot be tokenized; "
                         "pass a .npy of token ids instead")
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    width = seq_len * TEXT_CHARS_PER_TOKEN
    starts = np.linspace(0, max(len(text) - width, 0), samples).astype(int)
    pieces = [tok.encode(text[s:s + width])[:seq_len] for s in starts]
    short = [len(p) for p in pieces if len(p) < seq_len]
    if short:
        raise ValueError(f"the calibration text is too short: {len(short)} window(s) gave fewer than {seq_len} "
                         "tokens; use a longer text or a smaller --calib-seq-len")
    return np.concatenate(pieces)
