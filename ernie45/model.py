"""The ERNIE 4.5 decoder (dense and MoE), the causal-LM head, the MTP block, and meta-device builds.

Module names equal checkpoint names (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`,
`model.mtp_block.0...`) except that routed experts are stacked; weights.py owns that one mapping.
The model knows nothing of paging, parallelism or HTTP: a cache object is passed in (attention.py).

Forward (spec §2): x = Embed[ids] (no scaling); per layer x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x));
logits = lm_head(RMSNorm(x)), with lm_head = embed_tokens when tied. Logits are returned in the model
dtype, as transformers does.

MTP (spec §5, trained semantics): u = W_proj [RMSNorm_emb(Embed(x_{t+1})) ; RMSNorm_hid(h_t)] with h_t the
last trunk layer's output *before* the final norm; g = dense decoder layer(u); logits_{t+2} =
lm_head(norm(g)) with the shared final norm and head.

Shape legend: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionCache
from .config import ModelConfig
from .layers import MLP, RMSNorm, rope_cos_sin, rope_inv_freq
from .moe import SparseMoeBlock

# Parameters that stay fp32 whatever dtype the model is loaded in (spec §2.7, P2T KEEP_FP32_KEYS).
FP32_PARAM_SUFFIXES = ("mlp.gate.weight", "mlp.moe_statics.e_score_correction_bias")


class DecoderLayer(nn.Module):
    """Pre-norm block; `mlp` is a dense SwiGLU or a SparseMoeBlock as the config says for this index."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, positions, cache=None):  # [B,T,D] -> [B,T,D]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Ernie45Model(nn.Module):
    """`model.*`: embeddings, decoder layers, final norm, and (when configured) the MTP modules."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # _weight skips nn.Embedding's random init (on meta it would import torch._dynamo: seconds).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, m) for i, m in enumerate(cfg.moe_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n_mtp, D = cfg.num_nextn_predict_layers, cfg.hidden_size
        # The MTP block's attention uses cache layer index num_hidden_layers + i.
        self.mtp_emb_norm = nn.ModuleList(RMSNorm(D, cfg.rms_norm_eps) for _ in range(n_mtp))
        self.mtp_hidden_norm = nn.ModuleList(RMSNorm(D, cfg.rms_norm_eps) for _ in range(n_mtp))
        self.mtp_linear_proj = nn.ModuleList(nn.Linear(2 * D, D, bias=False) for _ in range(n_mtp))
        self.mtp_block = nn.ModuleList(DecoderLayer(cfg, cfg.num_hidden_layers + i, False) for i in range(n_mtp))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                cache: AttentionCache | None = None) -> torch.Tensor:
        """ids [B,T], positions [B,T] -> last layer output before the final norm [B,T,D]."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache)
        return x

    def mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
            cache: AttentionCache | None = None, depth: int = 0) -> torch.Tensor:
        """hidden [B,T,D] (pre-norm h_t), next_ids [B,T] (x_{t+1}) -> MTP block output [B,T,D] (pre-norm)."""
        e = self.mtp_emb_norm[depth](self.embed_tokens(next_ids))
        h = self.mtp_hidden_norm[depth](hidden)
        u = self.mtp_linear_proj[depth](torch.cat([e, h], dim=-1))  # embedding first, then hidden
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return self.mtp_block[depth](u, cos, sin, positions, cache)


class Ernie45ForCausalLM(nn.Module):
    """Top-level model; `model(input_ids)` returns logits [B, T, V] in the model dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Ernie45Model(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:  # [V, D]
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [B,T,D] -> logits [B,T,V] (final norm, then the tied or untied head)."""
        return self.project(self.model.norm(hidden))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The head alone: normed hidden [B,T,D] -> logits [B,T,V]. A parallel plan may replace it."""
        return F.linear(x, self.head_weight())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: AttentionCache | None = None) -> torch.Tensor:
        """input_ids [B,T]; positions [B,T] default 0..T-1 -> logits [B,T,V]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.logits(self.model(input_ids, positions, cache))

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                   cache: AttentionCache | None = None) -> torch.Tensor:
        """Logits for token t+2 from trunk hidden h_t [B,T,D] and token x_{t+1} [B,T]."""
        return self.logits(self.model.mtp(hidden, next_ids, positions, cache))


def keeps_fp32(name: str) -> bool:
    return name.endswith(FP32_PARAM_SUFFIXES)


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "meta") -> Ernie45ForCausalLM:
    """Construct on `device` (meta by default: no memory) with router/bias in fp32, the rest in `dtype`."""
    with torch.device(device):
        model = Ernie45ForCausalLM(cfg)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model.eval()


def init_random(model: Ernie45ForCausalLM, seed: int = 0, std: float = 0.02) -> Ernie45ForCausalLM:
    """Materialise a meta-built model with N(0, std) weights, unit norms and zero correction bias."""
    gen = torch.Generator().manual_seed(seed)
    model.to_empty(device="cpu")
    model.model.inv_freq.copy_(rope_inv_freq(model.config.head_dim, model.config.rope_theta))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".mtp_emb_norm." in name or ".mtp_hidden_norm." in name:
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
