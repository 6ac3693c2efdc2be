"""The training losses of one window: next-token cross-entropy and the MTP (multi-token prediction) loss.

A window holds ``T + 1 + D`` tokens, D = ``num_nextn_predict_layers`` (0 or 1). With x = the window:

    trunk input       x[:, :T]        -> h = last decoder layer output, *before* the final norm  # [B,T,D]
    LM loss           CE(lm_head(norm(h)), x[:, 1:T+1])
    MTP input (D=1)   h_t together with Embed(x_{t+1}) = x[:, 1:T+1]
    MTP loss          CE(model.mtp_logits(h, x[:, 1:T+1]), x[:, 2:T+2])    # predicts x_{t+2}

exactly spec §5 (P-Model's trained semantics): ``h_t`` is not detached, so the MTP loss also trains
the trunk, the embedding and the shared final norm / head; its RoPE positions are the trunk's
(0..T-1). The total objective is ``LM + multi_token_pred_lambda * MTP`` (ERNIE's default lambda 1.0),
with cross-entropy computed in fp32 whatever the autocast dtype.

Shape legend: B batch, T seq_len, V vocab, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ernie45.model import Ernie45ForCausalLM


def positions_for(ids: torch.Tensor) -> torch.Tensor:
    """0..T-1 for every row.  # [B, T]"""
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32: logits [B,T,V], labels [B,T] -> scalar."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def trunk(model: Ernie45ForCausalLM, window: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """window [B, X] -> (pre-norm hidden h [B,T,D], positions [B,T])."""
    ids = window[:, :seq_len]
    positions = positions_for(ids)
    return model.model(ids, positions), positions


def lm_loss(model: Ernie45ForCausalLM, hidden: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    T = hidden.shape[1]
    return cross_entropy(model.logits(hidden), window[:, 1:T + 1])


def mtp_loss(model: Ernie45ForCausalLM, hidden: torch.Tensor, window: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
    """MTP depth-1 loss: from h_t and x_{t+1}, predict x_{t+2} at every t = 0..T-1."""
    T = hidden.shape[1]
    if window.shape[1] < T + 2:
        raise ValueError(f"the MTP loss needs windows of T + 2 = {T + 2} tokens, got {window.shape[1]}; build the "
                         "sampler with extra=num_nextn_predict_layers")
    logits = model.mtp_logits(hidden, window[:, 1:T + 1], positions)  # [B, T, V]
    return cross_entropy(logits, window[:, 2:T + 2])


def window_losses(model: Ernie45ForCausalLM, window: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """{"lm_loss"} and, for a model with an MTP layer, {"mtp_loss"} of one window batch."""
    hidden, positions = trunk(model, window, seq_len)
    out = {"lm_loss": lm_loss(model, hidden, window)}
    if model.config.num_nextn_predict_layers:
        out["mtp_loss"] = mtp_loss(model, hidden, window, positions)
    return out
