"""llama.cpp (through llama-cpp-python) on a GGUF converted from the same HF checkpoint: optional peer of
bench/speed.py. Nothing here runs unless `llama_cpp` imports and llama.cpp's `convert_hf_to_gguf.py` is found.

Conversion quirks (shared/spec/field-notes.md, "Peer baselines"):
- The converter reads the vocabulary from a sentencepiece `tokenizer.model`, and random bench checkpoints
  have none. A placeholder (a tiny character-level sentencepiece model) is written into a scratch copy
  of the checkpoint (weights symlinked); the converter pads the vocabulary to the config's vocab_size
  with [PADi] entries, so token ids, and so greedy ids, mean the same as in the checkpoint.
- The converter writes the shared-expert width as intermediate_size // num_key_value_heads, right only
  for the real 21B-A3B shape. The GGUF key `ernie4_5-moe.expert_shared_feed_forward_length` is rewritten
  in place to moe_intermediate_size * moe_num_shared_experts (the width of the one shared MLP).
- bf16 and q8_0 come from the converter (`--outtype`); Q4_0 from `llama_cpp.llama_model_quantize` on the
  bf16 file (llama.cpp may keep the output/tied-embedding tensor at a higher precision: the bytes per
  token below are counted from the file's real tensor types when gguf-py is importable).
Measured like the other systems: batch-1 greedy decode (argmax over the last row of logits, the clock
stamped as each token is chosen), one 512-token prefill (best of two), peak RSS of this process.
Not measured: aggregate throughput at 8/32 sequences (llama-cpp-python's `Llama` runs one sequence).

    python bench/speed_llamacpp.py prepare --model DIR --work DIR [--converter convert_hf_to_gguf.py]
    python bench/speed_llamacpp.py measure --gguf FILE --model DIR [--threads 2]
each prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED_FFN_KEY = "ernie4_5-moe.expert_shared_feed_forward_length"
LLAMA_FTYPE_MOSTLY_Q4_0 = 2  # llama.h enum llama_ftype
TYPES = ("bf16", "q8_0", "Q4_0")


def find_converter(explicit: str | None) -> Path | None:
    """convert_hf_to_gguf.py: --converter, then PATH, then a llama.cpp tree vendored beside llama_cpp."""
    candidates = [explicit] if explicit else []
    candidates.append(shutil.which("convert_hf_to_gguf.py"))
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        pkg = Path(spec.origin).parent
        candidates += [pkg / "vendor/llama.cpp/convert_hf_to_gguf.py",
                       pkg.parent / "vendor/llama.cpp/convert_hf_to_gguf.py"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def skip_reason(converter: str | None) -> str | None:
    """Why llama.cpp cannot be measured here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`pip install llama-cpp-python`, builds from source in ~10 min)"
    if find_converter(converter) is None:
        return ("llama.cpp's convert_hf_to_gguf.py was not found: pass --llama-converter PATH (the pip package "
                "does not install it; it is at the root of a llama.cpp checkout or of the llama-cpp-python sdist's "
                "vendor/llama.cpp, and needs conversion/ and gguf-py/ beside it)")
    return None


def placeholder_tokenizer(path: Path) -> None:
    """A tiny character-level sentencepiece model (unk 0, bos 1, eos 2, as ERNIE's ids)."""
    import sentencepiece as spm

    text = [" ".join(f"word{i} {chr(97 + i % 26) * (1 + i % 5)}" for i in range(j, j + 20)) for j in range(200)]
    with path.open("wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=f, model_type="char",
                                       vocab_size=40, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1, minloglevel=2)


def scratch_checkpoint(model: Path, work: Path) -> Path:
    """work/hf: the checkpoint's files symlinked, plus a placeholder tokenizer.model if it has none."""
    hf = work / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        link = hf / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    if not (hf / "tokenizer.model").exists():
        placeholder_tokenizer(hf / "tokenizer.model")
    return hf


def fix_shared_width(gguf_path: Path, converter: Path, config: dict) -> int | None:
    """Rewrite the shared-expert FFN width in place (see the module docstring). Returns the value written."""
    if not config.get("moe_num_shared_experts"):
        return None
    sys.path.insert(0, str(converter.parent / "gguf-py"))
    import gguf

    width = config["moe_intermediate_size"] * config["moe_num_shared_experts"]
    reader = gguf.GGUFReader(gguf_path, "r+")
    field = reader.get_field(SHARED_FFN_KEY)
    if field is None:
        raise RuntimeError(f"{gguf_path} has no {SHARED_FFN_KEY}; the converter changed: check the shared width")
    field.parts[field.data[0]][0] = width
    reader.data.flush()
    return width


def prepare(args: argparse.Namespace) -> dict:
    reason = skip_reason(args.converter)
    if reason:
        return {"skipped": reason}
    import llama_cpp

    converter, model, work = find_converter(args.converter), Path(args.model), Path(args.work)
    config = json.loads((model / "config.json").read_text())
    hf = scratch_checkpoint(model, work)
    out, fixed = {}, None
    for outtype in ("bf16", "q8_0"):
        path = work / f"model-{outtype}.gguf"
        if not path.exists():  # converted once per checkpoint directory name; delete `work` to redo
            subprocess.run([sys.executable, str(converter), str(hf), "--outtype", outtype, "--outfile", str(path)],
                           check=True, stdout=subprocess.DEVNULL)
        fixed = fix_shared_width(path, converter, config)  # idempotent: also right for files made earlier
        out[outtype] = str(path)
    q4 = work / "model-Q4_0.gguf"
    if not q4.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = args.threads
        if llama_cpp.llama_model_quantize(out["bf16"].encode(), str(q4).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed for Q4_0")
    out["Q4_0"] = str(q4)
    return {"gguf": out, "converter": str(converter), "shared_ffn_width_written": fixed,
            "llama_cpp_version": getattr(llama_cpp, "__version__", "unknown")}


def active_bytes(gguf_path: Path, converter: Path | None, config: dict) -> int | None:
    """Bytes one decode token reads, from the file's tensors: every tensor except the embedding lookup
    (unless it doubles as the head), routed-expert tensors counted at k/E. None without gguf-py."""
    try:
        if converter is not None:
            sys.path.insert(0, str(converter.parent / "gguf-py"))
        import gguf
    except ImportError:
        return None
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(gguf_path).tensors}
    tied = "output.weight" not in tensors
    frac = config["moe_k"] / config["moe_num_experts"]
    return int(sum(n * (frac if "_exps." in name else 1) for name, n in tensors.items()
                   if name != "token_embd.weight" or tied))


def measure(args: argparse.Namespace) -> dict:
    import numpy as np
    from llama_cpp import Llama

    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = config["vocab_size"]
    prompt = [(100 + i) % vocab for i in range(args.prompt_tokens)]
    long = [(100 + i) % vocab for i in range(args.prefill_tokens)]
    llm = Llama(model_path=args.gguf, n_ctx=max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 16,
                n_batch=args.prefill_tokens, n_ubatch=args.prefill_tokens, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=False, verbose=False)
    llm.eval(prompt[:4])  # warm-up
    llm.reset()
    llm.eval(prompt)
    tokens, stamps = [], []
    n_vocab = llm.n_vocab()
    for i in range(args.new_tokens):
        # The last evaluated token's logits, read from the context: with logits_all=False
        # llama-cpp-python (0.3.x) no longer copies them into llm.scores.
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        tokens.append(int(np.argmax(logits)))
        stamps.append(time.perf_counter())
        if i + 1 < args.new_tokens:
            llm.eval([tokens[-1]])
    prefill = []
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        prefill.append(time.perf_counter() - t)
    converter = find_converter(args.converter)
    return {"system": "llama.cpp", "dtype": args.type, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "prefill_tok_s": args.prefill_tokens / min(prefill), "throughput_tok_s": None,
            "throughput_note": "not measured: llama-cpp-python's Llama runs one sequence",
            "greedy_tokens": tokens, "active_weight_bytes": active_bytes(Path(args.gguf), converter, config),
            "file_bytes": os.path.getsize(args.gguf),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "threads": args.threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    pre = sub.add_parser("prepare")
    pre.add_argument("--work", required=True)
    mea = sub.add_parser("measure")
    mea.add_argument("--gguf", required=True)
    mea.add_argument("--type", choices=TYPES, required=True)
    mea.add_argument("--prompt-tokens", type=int, default=16)
    mea.add_argument("--new-tokens", type=int, default=64)
    mea.add_argument("--prefill-tokens", type=int, default=512)
    for s in (pre, mea):
        s.add_argument("--model", required=True)
        s.add_argument("--converter")
        s.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(prepare(args) if args.what == "prepare" else measure(args)))


if __name__ == "__main__":
    main()
