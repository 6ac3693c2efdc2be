"""The slow, obviously-correct generate loop that every faster path is tested against.

One sequence, a contiguous KV cache, one forward per new token. Sampling here is deliberately plain:
temperature 0 is argmax; otherwise logits / temperature, then top-k, then top-p (smallest set of tokens
whose probability mass reaches p, always keeping the most likely), then one draw from a seeded
`torch.Generator`, so a given seed reproduces the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .cache import KVCache
from .model import Ernie45ForCausalLM


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos ids; () = never stop early

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """logits [V] -> one token id."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # mass *before* this token already reaches p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_stream(model: Ernie45ForCausalLM, prompt_ids: Sequence[int],
                    cfg: GenerationConfig = GenerationConfig()) -> Iterator[int]:
    """Yield new token ids one at a time (the stop token, if hit, is yielded and ends the stream)."""
    cfg.validate()
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. the BOS id)")
    mcfg = model.config
    vocab = mcfg.vocab_size
    if bad := [t for t in prompt_ids if not 0 <= t < vocab]:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    total = len(prompt_ids) + cfg.max_new_tokens
    if total > mcfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model's context of "
                         f"{mcfg.max_position_embeddings} tokens")
    stops = set(mcfg.eos_token_ids if cfg.stop_token_ids is None else cfg.stop_token_ids)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    weight = model.model.embed_tokens.weight
    cache = KVCache(mcfg, 1, total, weight.dtype, weight.device, num_layers=mcfg.num_hidden_layers)  # no MTP
    greedy_head = getattr(model, "greedy_head", None) if cfg.temperature == 0 else None
    ids = torch.tensor([list(prompt_ids)], device=weight.device)  # [1, T]
    positions = torch.arange(ids.shape[1], device=weight.device)[None]  # [1, T]
    # the fast path's one-call step (trunk, final norm and greedy head in C); None where it does not apply
    greedy_step = getattr(model.model, "greedy_step", None) if greedy_head is not None else None
    for _ in range(cfg.max_new_tokens):
        token = greedy_step(ids, positions, cache, greedy_head) if greedy_step is not None else None
        if token is None:
            hidden = model.model(ids, positions, cache)  # [1, T, D]
            if greedy_head is not None:  # the fast path's exact screened argmax (greedy_head.py)
                token = int(greedy_head(model.model.norm(hidden[0, -1:]))[0])
            else:
                logits = model.logits(hidden[:, -1:])[0, -1]  # [V]: only the last row goes through the head
                token = sample_token(logits, cfg, gen)
        yield token
        if token in stops:
            return
        ids = torch.tensor([[token]], device=weight.device)
        positions = positions[:, -1:] + 1


def generate(model: Ernie45ForCausalLM, prompt_ids: Sequence[int],
             cfg: GenerationConfig = GenerationConfig()) -> list[int]:
    """New token ids only (stop token included if generated)."""
    return list(generate_stream(model, prompt_ids, cfg))
