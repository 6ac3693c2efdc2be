"""Parameter accounting, counted on a meta-device model (no memory) built from any config.

- ``params_total``: every trunk parameter; a tied head counts once. MTP is reported separately.
- ``params_active``: what one token touches: everything except the input-embedding lookup, with only
  K of E routed experts per MoE layer, and counting the head (for a tied model the embedding matrix is
  used as the head, so it counts there).
- ``params_mtp``: the MTP modules (norms, projection, dense block).
"""

from __future__ import annotations

from .config import ModelConfig
from .model import build_model


def count_params(cfg: ModelConfig) -> dict[str, int]:
    model = build_model(cfg)  # meta device
    total = mtp = routed = embed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("model.mtp_"):
            mtp += n
            continue
        total += n
        if ".mlp.experts." in name:
            routed += n
        if name == "model.embed_tokens.weight":
            embed = n
    inactive_experts = routed * (cfg.moe_num_experts - cfg.moe_k) // cfg.moe_num_experts if cfg.is_moe else 0
    lookup = 0 if cfg.tie_word_embeddings else embed  # tied: the same matrix is read as the head
    return {"params_total": total, "params_active": total - inactive_experts - lookup, "params_mtp": mtp}
