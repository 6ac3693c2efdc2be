"""Greedy decode with static shapes and no host round trip per step, captured once as a CUDA graph.

A batch-1 decode step on a GPU launches a few hundred small kernels; eager PyTorch pays a launch each,
plus a host sync wherever Python asks a tensor for a number (the reference KV cache's `int(max)`, the
reference MoE's per-expert token counts). Here every step has the same shapes and reads its inputs from
device buffers, so on CUDA the whole step (embedding, every layer, final norm, head, argmax, feeding the
token back) is recorded once with `torch.cuda.graph` and replayed per token: one launch per token and
one sync at the end. Elsewhere the same step runs eagerly, which is how the CPU tests check it against
the reference loop (generation.generate).

The pieces, each a swap or a passed-in object (the model stays unaware):
- `StaticKVCache`: per-layer K/V of a fixed length; writes at device positions, attends over all slots
  with empty ones (position -1) masked, so attention's shapes never change.
- `StaticExperts`: wraps `moe.Experts` / int4 `QuantExperts`; the router's expert ids stay on the device
  and go straight into `kernels.expert_rows` (Triton on CUDA). Larger batches (prefill) use the wrapped
  module.
- `StaticQuantLinear`: an int4 `QuantLinear` through the same kernel (one "expert").
- `GraphDecoder`: prefill eagerly into the static cache, then replay the captured step.

Shapes: T tokens, K top-k, D hidden, S cache slots.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attend_gqa
from .config import ModelConfig
from .kernels.expert_rows import expert_rows
from .moe import Experts

STATIC_MAX_ROWS = 8  # (token, expert) pairs or rows at most for the static paths; more -> wrapped module


class StaticKVCache:
    """K/V [1, S, Nkv, Dh] per layer; a step writes at `positions` and attends over all S slots."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (1, max_len, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.slot_pos = torch.full((n, 1, max_len), -1, dtype=torch.long, device=device)  # [L, 1, S]
        self.max_len = max_len

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """q [1,T,Nq,Dh], k/v [1,T,Nkv,Dh], positions [1,T] (< max_len: the caller's bound) -> [1,T,Nq,Dh]."""
        self.k[layer_idx].index_copy_(1, positions[0], k)
        self.v[layer_idx].index_copy_(1, positions[0], v)
        self.slot_pos[layer_idx].index_copy_(1, positions[0], positions)
        return attend_gqa(q, self.k[layer_idx], self.v[layer_idx], positions, self.slot_pos[layer_idx])

    def forget_from(self, position: int) -> None:
        """Mark slots >= position empty (what a warm-up run wrote ahead of the real steps)."""
        self.slot_pos[:, :, position:] = -1


def _int4_parts(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(codes, scales, zeros, group) of an int4 QuantWeight the Triton kernel reads, else None."""
    if getattr(w, "fmt", None) is None or w.fmt.name != "int4":
        return None
    return w.qweight, w.scales, w.zeros, w.group_size


def _rows(x: torch.Tensor, ids: torch.Tensor, weight) -> torch.Tensor:
    """x [P, K] through stacked weight `weight` (a tensor [E, N, K] or an int4 QuantWeight) -> [P, N]."""
    if isinstance(weight, torch.Tensor):
        return expert_rows(x, ids, weight)
    codes, scales, zeros, group = _int4_parts(weight)
    return expert_rows(x, ids, codes, scales, zeros, group)


def static_supported(experts: nn.Module) -> bool:
    """Float `moe.Experts`, or QuantExperts whose three projections are int4."""
    if isinstance(experts, Experts):
        return True
    projs = [getattr(experts, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(p is not None and _int4_parts(p) is not None for p in projs) and not getattr(experts, "first_expert", 0)


class StaticExperts(nn.Module):
    """Drop-in for the experts of a SparseMoeBlock: the same sum, ids kept on the device.

    x [T,D], w [T,K], idx [T,K] -> sum over k in ascending expert id of w_k * E_idx_k(x) [T,D], each
    product and running sum rounded to x.dtype as `moe.Experts.grouped`'s index_add does.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        if not static_supported(inner):
            raise ValueError(f"{type(inner).__name__} in this format has no static path (float or int4 only)")
        self.inner = inner

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        T, K = idx.shape
        if T * K > STATIC_MAX_ROWS:
            return self.inner(x, w, idx)
        idx_s, order = idx.sort(dim=-1)  # ascending expert per token: the reference's summation order
        w_s = w.gather(-1, order)
        ids = idx_s.flatten()  # [P]
        xp = x[:, None].expand(T, K, x.shape[-1]).reshape(T * K, -1)  # [P, D]: token t for each of its K
        inner = self.inner
        h = inner.act(_rows(xp, ids, inner.gate_proj)) * _rows(xp, ids, inner.up_proj)  # [P, F]
        y = _rows(h, ids, inner.down_proj).view(T, K, -1)  # [T, K, D]
        out = torch.zeros_like(x)
        for j in range(K):
            out = out + y[:, j] * w_s[:, j, None]
        return out


class StaticQuantLinear(nn.Module):
    """An int4 QuantLinear through `expert_rows` (one expert) for up to STATIC_MAX_ROWS rows."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        if _int4_parts(inner) is None:
            raise ValueError("StaticQuantLinear wraps int4 QuantLinear modules only")
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > STATIC_MAX_ROWS:
            return self.inner(x)
        codes, scales, zeros, group = _int4_parts(self.inner)
        ids = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)
        y = expert_rows(flat, ids, codes[None], scales[None], zeros[None], group)
        return y.unflatten(0, x.shape[:-1])


def make_static(model: nn.Module) -> nn.Module:
    """Swap in the static modules (in place); raises ValueError naming a module that has no static path."""
    from .quant.modules import QuantLinear

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child_name == "experts" and not isinstance(child, StaticExperts):
                if not static_supported(child):
                    raise ValueError(f"{full}: {type(child).__name__} has no static decode path (float or int4 "
                                     "experts only); quantize with int4 or load float weights")
                setattr(module, child_name, StaticExperts(child))
            elif isinstance(child, QuantLinear):
                if _int4_parts(child) is None:
                    raise ValueError(f"{full}: {child.fmt.name} linears have no static decode path (int4 only)")
                setattr(module, child_name, StaticQuantLinear(child))
    return model


def capture(step, warmup: int = 2):
    """Record `step()` as a CUDA graph after `warmup` eager runs on a side stream (which compile kernels
    and settle the allocator). The caller restores whatever state those runs changed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class GraphDecoder:
    """Greedy batch-1 decode of `model` (made static with `make_static`) for prompts + new tokens <= max_len.

    `generate(prompt, n)` returns the n greedy tokens; the first comes from an eager prefill, each next
    one from one replay of the step captured at construction (CUDA) or one eager run of it (elsewhere).
    """

    def __init__(self, model: nn.Module, max_len: int, use_graph: bool | None = None):
        w = model.model.embed_tokens.weight
        self.model, self.max_len, self.device = model, max_len, w.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.cache = StaticKVCache(model.config, max_len, w.dtype, w.device)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=w.device)  # [1, 1] the step's input token
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=w.device)  # [1, 1] its position
        self.start = torch.zeros(1, dtype=torch.long, device=w.device)  # position of the first decoded token
        self.out = torch.zeros(max_len, dtype=torch.long, device=w.device)  # tokens by position - start
        self.graph = None
        if self.use_graph:
            if max_len < 3:
                raise ValueError(f"max_len={max_len}: a graph decoder needs at least 3 positions")
            # Captured now, on an empty cache: the warm-up runs write slots 0 and 1, which every prefill
            # overwrites; later, near the end of the cache, they could run past it.
            self.graph = capture(self.step)
            self.tok.zero_()
            self.pos.zero_()
            self.cache.forget_from(0)

    @torch.no_grad()
    def step(self) -> None:
        """tok at pos -> next greedy token: recorded in out, fed back into tok; pos advances."""
        hidden = self.model.model(self.tok, self.pos, self.cache)  # [1, 1, D]
        nxt = self.model.logits(hidden)[0, -1].argmax().view(1)  # first maximum, as torch.argmax
        self.out.index_copy_(0, self.pos[0] - self.start + 1, nxt)
        self.tok.copy_(nxt.view(1, 1))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> int:
        """Run the prompt into a cleared cache; its greedy next token (also loaded as the step's input)."""
        n = len(prompt)
        if not 0 < n < self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit a decoder of {self.max_len} positions")
        self.cache.forget_from(0)
        ids = torch.tensor([prompt], device=self.device)
        hidden = self.model.model(ids, torch.arange(n, device=self.device)[None], self.cache)
        first = self.model.logits(hidden[:, -1:])[0, -1].argmax().view(1)
        self.tok.copy_(first.view(1, 1))
        self.pos.fill_(n)
        self.start.fill_(n)
        self.out[0] = first[0]
        return int(first)

    def decode(self, steps: int) -> None:
        """`steps` more tokens after prefill (no host sync on CUDA until the caller reads them)."""
        if int(self.pos) + steps > self.max_len:
            raise ValueError(f"{steps} more tokens from position {int(self.pos)} exceed max_len={self.max_len}")
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        self.prefill(prompt)
        self.decode(new_tokens - 1)
        return self.out[:new_tokens].tolist()
