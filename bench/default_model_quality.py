"""Held-out perplexity of a model on the project's corpus, next to a unigram baseline on the same tokens.

The corpus (`ernie45 data build-corpus --out DIR`) holds `train.tokens.npy` and `heldout.tokens.npy`
(its own tokenizer's ids: the default model was trained with that tokenizer). The model is scored with
`ernie45.evaluate.perplexity` (sliding window) over the held-out stream; the baseline is an add-one
smoothed unigram model fitted on the training tokens and scored on the same held-out tokens.
Output: bench/results/default_model_quality.json and .md.

    python bench/default_model_quality.py --corpus DIR [--model DIR] [--window 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ernie45.evaluate import perplexity, unigram_perplexity
from ernie45.train.data import load_tokens
from ernie45.weights import load_model, resolve_model_dir

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    path = resolve_model_dir(args.model)
    model = load_model(path, dtype=torch.float32)
    heldout = load_tokens(args.corpus, "heldout").tolist()
    train = load_tokens(args.corpus, "train").tolist()
    start = time.perf_counter()
    result = perplexity(model, heldout, window=args.window, progress=True)
    seconds = time.perf_counter() - start
    unigram = unigram_perplexity(train, heldout, model.config.vocab_size)
    out = {"model": str(path), "window": args.window, "heldout_tokens_scored": result["tokens"],
           "perplexity": result["perplexity"], "unigram_perplexity": unigram, "seconds": round(seconds, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_model_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ("| model | held-out tokens | perplexity (window %d) | unigram baseline |\n|---|---|---|---|\n"
          "| %s | %s | %.2f | %.2f |\n" % (args.window, path.name, f"{result['tokens']:,}", result["perplexity"], unigram))
    (RESULTS / "default_model_quality.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
