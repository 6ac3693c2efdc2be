"""Perplexity over long token streams with a sliding window, and a unigram baseline to compare with.

A window of W tokens advances by a stride S <= W; each window scores only the tokens the previous one
did not, conditioning them on up to W - 1 tokens before. So every token after the first is scored
exactly once, with at least W - S tokens of context once the stream is longer than a window (S is
capped at W - 1: the first token of a window has no context inside it).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import Ernie45ForCausalLM


@torch.no_grad()
def perplexity(model: Ernie45ForCausalLM, ids: Sequence[int], window: int = 1024, stride: int | None = None,
               progress: bool = False) -> dict[str, float]:
    """exp(mean NLL) over ids[1:]; returns {"perplexity", "tokens", "nll"} (tokens = scored tokens)."""
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in (0, window={window}]")
    if len(ids) < 2:
        raise ValueError("need at least two tokens to score one")
    window = min(window, model.config.max_position_embeddings)
    stride = min(stride, window - 1)  # windows overlap by >= 1 token: a window's first token has no context
    stream = torch.tensor(list(ids))
    total, scored, end = 0.0, 0, 1  # `end`: tokens [1, end) are already scored
    starts = range(0, max(len(ids) - window, 0) + stride, stride)
    for start in _bar(starts, progress):
        chunk = stream[start:start + window]
        logits = model(chunk[None])[0, :-1].float()  # [W-1, V] predicts chunk[1:]
        first_new = max(end - start, 1)  # index in chunk of the first token not scored yet
        nll = F.cross_entropy(logits[first_new - 1:], chunk[first_new:], reduction="sum")
        total, scored, end = total + float(nll), scored + len(chunk) - first_new, start + len(chunk)
        if end >= len(ids):
            break
    return {"perplexity": math.exp(total / scored), "tokens": scored, "nll": total / scored}


def unigram_perplexity(train_ids: Sequence[int], eval_ids: Sequence[int], vocab_size: int) -> float:
    """Add-one smoothed unigram model fitted on train_ids, scored on eval_ids[1:] (same tokens as above)."""
    counts = Counter(train_ids)
    denom = len(train_ids) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / denom) for t in eval_ids[1:])
    return math.exp(nll / (len(eval_ids) - 1))


def _bar(it, show: bool):
    if not show:
        return it
    from tqdm import tqdm
    return tqdm(it, desc="perplexity", unit="window")
