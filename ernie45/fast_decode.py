"""Batch-1 decode of a whole trunk in one C call (kernels/decode.c), for the contiguous KVCache.

A decode step of the module path is ~40 small torch calls per layer (norms, RoPE, cache writes, router,
top-k, ...) whose Python and dispatch cost rivals reading the weights on a small CPU model. `Decoder`
describes every layer to `ernie45_decode` once — views of the model's own parameters, no copies — and
then one call per token runs all layers, writing K/V into the same `cache.KVCache` buffers the module
path uses (so prefill can run through the modules and decode through C, or any mix).

`accelerate` (fast.py) installs it as `model.model._decoder` when every layer qualifies (see
`Decoder.__init__`); `FastErnie45Model.forward` uses it for one token with a KVCache of batch 1 and falls
back to the modules for everything else (prefill, the paged engine, MTP, parallel ranks).
`FastErnie45Model.greedy_step` goes one step further for greedy generation: trunk, final norm and the
exact greedy head (greedy_head.py) in one C call that returns the next token id, so no torch call runs
between them (generation.generate_stream uses it; tests/test_fast.py holds it to the separate calls).

Shape legend: D hidden, Nq/Nkv heads, Dh head_dim, F MLP width, E experts, S_max cache slots.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import kernels
from .cache import KVCache
from .fast import FastExperts, FastQuantExperts, plain_weights, quant_weights
from .greedy_head import MAX_CANDIDATES, GreedyHead
from .layers import MLP, rope_cos_sin
from .model import Ernie45Model
from .moe import Experts, SparseMoeBlock
from .quant.modules import QuantExperts, QuantWeight

W = kernels.WView
ModelT = kernels.ModelT
MAX_EXPERTS = 64  # decode.c keeps the router's scores and choices on the stack
ROPE_TABLE = 256  # positions per cached cos/sin block


class LayerT(ctypes.Structure):
    _fields_ = [("q", W), ("k", W), ("v", W), ("o", W), ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("moe", ctypes.c_int), ("gate", W), ("up", W), ("down", W), ("w_stride_gu", ctypes.c_long),
                ("s_stride_gu", ctypes.c_long), ("w_stride_d", ctypes.c_long), ("s_stride_d", ctypes.c_long),
                ("F", ctypes.c_int), ("router", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("E", ctypes.c_int),
                ("topk", ctypes.c_int), ("shared", ctypes.c_int), ("sgate", W), ("sup", W), ("sdown", W),
                ("Fs", ctypes.c_int), ("kcache", ctypes.c_void_p), ("vcache", ctypes.c_void_p)]


class Unsupported(Exception):
    """This model (or one of its layers) cannot take the C decode step; the modules are used."""


def weights_of(module: nn.Module, stacked: str | None = None) -> kernels.Weights:
    """Kernel weights of a Linear / QuantLinear, or of one stacked projection of an expert module."""
    src = getattr(module, stacked) if stacked else module
    if isinstance(src, QuantWeight):
        weights = quant_weights(src, min_elements=0)
    else:
        w = src if isinstance(src, torch.Tensor) else getattr(src, "weight", None)
        if w is None or getattr(src, "bias", None) is not None:
            raise Unsupported(f"{type(src).__name__} is not a bias-free linear weight")
        weights = plain_weights(w, min_elements=0)
    if weights is None:
        raise Unsupported(f"{type(src).__name__} {stacked or ''} is not kernel-shaped (K % 16, groups, layout)")
    return weights


class Decoder:
    """The C decode step for one model; keeps the kernel views (and so the tensors) alive."""

    def __init__(self, model: Ernie45Model, cfg):
        dtype = model.embed_tokens.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"activation dtype {dtype}")
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            raise Unsupported("forward hooks (a parallel plan) are installed")
        self.cfg, self.dtype, self.keep = cfg, dtype, []
        self.layers = (LayerT * cfg.num_hidden_layers)()
        max_f = max_h = 0
        for i, layer in enumerate(model.layers):
            f, h = self._fill(self.layers[i], layer)
            max_f, max_h = max(max_f, f), max(max_h, h)
        self.model_t = ModelT(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              cfg.num_hidden_layers, int(dtype == torch.bfloat16), max_f, max_h, cfg.rms_norm_eps,
                              cfg.moe_norm_min, cfg.head_dim ** -0.5)
        self.max_f, self.max_h = max_f, max_h
        self.inv_freq = model.inv_freq
        self.embed = model.embed_tokens.weight
        self._bound: KVCache | None = None
        self._head_rows = (torch.empty(cfg.hidden_size), torch.empty(cfg.hidden_size, dtype=torch.int8))
        self._rope_start, self._rope_table = -1, None

    def _view(self, module, stacked=None) -> kernels.Weights:
        w = weights_of(module, stacked)
        self.keep.append(w)
        return w

    def _norm(self, norm: nn.Module) -> int:
        if norm.weight.dtype != self.dtype:
            raise Unsupported("norm weights in another dtype than the activations")
        return norm.weight.data_ptr()

    def _fill(self, t: LayerT, layer: nn.Module) -> tuple[int, int]:
        """Describe one layer; returns (widest MLP input, MLP hidden floats of one token)."""
        attn = layer.self_attn
        t.q, t.k, t.v, t.o = (self._view(getattr(attn, n)).view for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        t.in_norm, t.post_norm = self._norm(layer.input_layernorm), self._norm(layer.post_attention_layernorm)
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            t.moe = 0
            t.gate, t.up, t.down = (self._view(getattr(mlp, n)).view for n in ("gate_proj", "up_proj", "down_proj"))
            t.F = self.keep[-3].out_features
            return t.F, t.F
        if not isinstance(mlp, SparseMoeBlock) or type(mlp.experts) not in _EXPERT_TYPES:
            raise Unsupported(f"MLP {type(mlp).__name__} with {type(getattr(mlp, 'experts', None)).__name__}")
        ex = mlp.experts
        gate, up, down = (self._view(ex, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if gate.kind != up.kind or gate.group != up.group:
            raise Unsupported("gate and up experts in different formats")
        t.moe, t.gate, t.up, t.down = 1, gate.view, up.view, down.view
        (t.w_stride_gu, t.s_stride_gu), (t.w_stride_d, t.s_stride_d) = gate.expert_strides(), down.expert_strides()
        t.F, t.E, t.topk = gate.out_features, mlp.gate.weight.shape[0], mlp.k
        if t.E > MAX_EXPERTS or t.topk > t.E:
            raise Unsupported(f"{t.E} experts (at most {MAX_EXPERTS}) / top-{t.topk}")
        router, bias = mlp.gate.weight.detach(), mlp.moe_statics.e_score_correction_bias.detach()
        if router.dtype != torch.float32 or bias.dtype != torch.float32 or not router.is_contiguous():
            raise Unsupported("router or correction bias not fp32")
        self.keep += [router, bias]
        t.router, t.bias = router.data_ptr(), bias.data_ptr()
        t.shared, t.Fs = 0, 0
        if mlp.shared_experts is not None:
            sh = mlp.shared_experts
            t.shared = 1
            t.sgate, t.sup, t.sdown = (self._view(getattr(sh, n)).view for n in ("gate_proj", "up_proj", "down_proj"))
            t.Fs = self.keep[-3].out_features
        return max(t.F, t.Fs), max(t.topk * t.F, t.Fs)  # every routed expert's h at once (moe.c)

    def _rope(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [Dh] fp32 of one position, from a table of ROPE_TABLE positions computed by
        `rope_cos_sin` at once (its elementwise values; ~80 us per token saved)."""
        start = pos - pos % ROPE_TABLE
        if self._rope_start != start:
            cos, sin = rope_cos_sin(torch.arange(start, start + ROPE_TABLE)[None], self.inv_freq)  # [1, R, Dh]
            self._rope_table = (cos[0].contiguous(), sin[0].contiguous())
            self._rope_start = start
        cos, sin = self._rope_table
        return cos[pos - start], sin[pos - start]

    def bind(self, cache: KVCache) -> None:
        """Point every layer at this cache's K/V buffers (batch 1, the activation dtype)."""
        if self._bound is cache:
            return
        for i in range(self.cfg.num_hidden_layers):
            k, v = cache.k[i], cache.v[i]
            if k.dtype != self.dtype or not (k.is_contiguous() and v.is_contiguous()):
                raise Unsupported("cache buffers in another dtype or layout")
            self.layers[i].kcache, self.layers[i].vcache = k.data_ptr(), v.data_ptr()
        self._bound = cache

    def _inputs(self, token: int, pos: int, cache: KVCache) -> tuple[torch.Tensor, ...]:
        """(x [D] fp32 embedding, cos, sin, scratch) of one step; binds the cache."""
        if pos >= cache.max_len:
            raise ValueError(f"position {pos} is beyond this cache's {cache.max_len} slots; "
                             "allocate the cache with max_len >= prompt + new tokens")
        self.bind(cache)
        cfg = self.cfg
        x = self.embed[token].to(torch.float32, copy=True)  # [D]; the kernel updates it in place
        cos, sin = self._rope(pos)
        width = max(cfg.hidden_size, self.max_f, cfg.q_dim)  # decode.c's W: the widest matmul input
        scratch = torch.empty(8 * width + 3 * self.max_h + 2 * cfg.q_dim + 2 * cfg.kv_dim + 512
                              + cfg.num_attention_heads * (pos + 1))
        return x, cos, sin, scratch

    def _written(self, pos: int, cache: KVCache) -> None:
        cache.slot_pos[: self.cfg.num_hidden_layers, 0, pos] = pos
        cache.length = max(cache.length, pos + 1)

    def step(self, token: int, pos: int, cache: KVCache, prof: torch.Tensor | None = None) -> torch.Tensor:
        """Token id at position `pos` -> last layer output before the final norm [1, 1, D].

        prof: optional float64 [len(kernels.DECODE_PHASES)] that each phase's seconds are added to."""
        x, cos, sin, scratch = self._inputs(token, pos, cache)
        kernels.decode(ctypes.byref(self.model_t), self.layers, x, pos, cos, sin, scratch, prof)
        self._written(pos, cache)
        return x.to(self.dtype).view(1, 1, -1)

    def greedy_step(self, token: int, pos: int, cache: KVCache, head: GreedyHead, norm_weight: torch.Tensor,
                    prof: torch.Tensor | None = None) -> int:
        """`step`, the final norm and the exact greedy head (`head.in_c`) in one C call -> the next token id:
        the same token as `head(norm(step(...)))`, without the torch calls between them."""
        x, cos, sin, scratch = self._inputs(token, pos, cache)
        xn, xq = self._head_rows  # the normed row and its int8 rounding, written by the C step
        out = kernels.greedy_step(ctypes.byref(self.model_t), self.layers, x, pos, cos, sin, scratch, prof,
                                  norm_weight, xn, xq, head, head.slack, MAX_CANDIDATES)
        self._written(pos, cache)
        if out < 0:  # too many rows could win (or a non-finite hidden state): the full head decides
            out = head.full(xn.to(self.dtype))
        return out


# Exact types: expert parallelism's local experts route differently.
_EXPERT_TYPES = (Experts, QuantExperts, FastExperts, FastQuantExperts)


class FastErnie45Model(Ernie45Model):
    """Ernie45Model whose one-token steps on a batch-1 KVCache run `Decoder` (installed by accelerate)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        decoder = self.__dict__.get("_decoder")
        if (decoder is not None and input_ids.shape == (1, 1) and type(cache) is KVCache
                and cache.k[0].shape[0] == 1 and not torch.is_grad_enabled()):
            return decoder.step(int(input_ids[0, 0]), int(positions[0, 0]), cache)
        return super().forward(input_ids, positions, cache)

    def greedy_step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, head: GreedyHead) -> int | None:
        """The next greedy token of a one-token step in one C call (Decoder.greedy_step): trunk, final norm and
        `head`; None where that does not apply (then run forward and the head)."""
        decoder = self.__dict__.get("_decoder")
        norm = self.norm.weight
        if (decoder is None or input_ids.shape != (1, 1) or type(cache) is not KVCache or cache.k[0].shape[0] != 1
                or torch.is_grad_enabled() or not head.in_c or norm.dtype != decoder.dtype or not norm.is_contiguous()):
            return None
        return decoder.greedy_step(int(input_ids[0, 0]), int(positions[0, 0]), cache, head, norm.detach())


def install(model: nn.Module) -> str | None:
    """Swap `model.model` to FastErnie45Model with a Decoder; returns why not when it cannot."""
    if not kernels.available():
        return kernels.unavailable_reason()
    trunk = model.model
    if type(trunk) not in (Ernie45Model, FastErnie45Model):
        return f"trunk is a {type(trunk).__name__}"
    try:
        decoder = Decoder(trunk, model.config)
    except Unsupported as e:
        return str(e)
    trunk.__class__ = FastErnie45Model
    trunk._decoder = decoder
    return None


def uninstall(model: nn.Module) -> None:
    trunk = model.model
    if type(trunk) is FastErnie45Model:
        trunk.__class__ = Ernie45Model
    trunk.__dict__.pop("_decoder", None)
