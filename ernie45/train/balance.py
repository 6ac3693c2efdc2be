"""MoE load balancing as ERNIE 4.5 trains it: the aux-loss-free correction bias, plus an optional aux loss.

Aux-loss-free (config ``moe_use_aux_free``; PaddlePaddle/ERNIE ``MoECorrectionBiasAdjustCallback``):
every token's selected experts are counted per MoE layer over all micro-batches of one optimizer step;
after the step each layer's ``e_score_correction_bias`` moves by a fixed amount against the imbalance,

    b_e <- b_e + rate * sign(mean_e(load) - load_e)        # rate: ERNIE's default is 1e-3

and the counts are cleared. An over-loaded expert's bias falls, so ``topk(p + b)`` picks it less often;
the mixture weights stay the unbiased probabilities (spec §2.7), so the bias steers selection only and
receives no gradient. The counts are of the experts actually used, i.e. the biased selection.

Auxiliary loss (optional, off by default): ERNIE's form, ``E * sum_e f_e * P_e`` with ``P_e`` the mean
router probability and ``f_e`` = (tokens whose top-K includes e) / T, so sum_e f_e = K and a perfectly
balanced router scores K. As in ERNIE's router when the correction bias is on, ``f_e`` comes from the
top-K of the unbiased probabilities: the loss measures the router's own preference, not the bias's.
It is averaged over MoE layers (so its coefficient does not scale with depth).

Observation: :class:`RoutingMonitor` wraps each ``SparseMoeBlock.route`` on the instance (the model
code is untouched). The wrapper also turns autocast off around routing, because ``F.linear`` under
CPU/GPU autocast would otherwise run the router in bf16; spec §2.7 routes in fp32.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from ernie45.model import Ernie45ForCausalLM
from ernie45.moe import SparseMoeBlock


def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """bias [E] (or [1, E]), load [E] token counts -> the updated bias (same shape)."""
    load = load.to(torch.float32)
    return bias + rate * torch.sign(load.mean() - load).view_as(bias)


def aux_loss(probs: torch.Tensor, k: int) -> torch.Tensor:
    """ERNIE/Switch balance loss of one layer: probs [T, E] fp32 -> scalar (K when balanced)."""
    T, E = probs.shape
    top = torch.topk(probs.detach(), k, dim=-1).indices  # [T, K] unbiased selection
    f = torch.bincount(top.flatten(), minlength=E).to(probs.dtype) / T  # [E], sums to K
    return E * (f * probs.mean(0)).sum()


def max_violation(load: torch.Tensor) -> float:
    """(max load - mean load) / mean load: 0 when perfectly balanced."""
    load = load.to(torch.float64)
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


class RoutingMonitor:
    """Counts expert selections per MoE layer and keeps the last forward's router probabilities.

    Counting happens only while the block is in training mode, so held-out evaluation does not move
    the bias. ``keep_probs`` (needed for the aux loss) holds one [T, E] tensor per layer until the
    next forward.
    """

    def __init__(self, model: Ernie45ForCausalLM, keep_probs: bool = False):
        self.keep_probs = keep_probs
        self.blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers)
                       if isinstance(layer.mlp, SparseMoeBlock)}
        self.load = {i: torch.zeros(b.gate.weight.shape[0], dtype=torch.int64, device=b.gate.weight.device)
                     for i, b in self.blocks.items()}  # layer -> [E]
        self.probs: dict[int, torch.Tensor] = {}
        for i, block in self.blocks.items():
            block.route = self._wrap(i, block, block.route)

    def _wrap(self, layer: int, block: SparseMoeBlock, route):
        def observed_route(x: torch.Tensor):  # x [T, D]
            with torch.autocast(device_type=x.device.type, enabled=False):
                probs, w, idx = route(x)  # [T, E] fp32, [T, K], [T, K]
            if block.training:
                self.load[layer] += torch.bincount(idx.flatten(), minlength=probs.shape[-1])
                if self.keep_probs:
                    self.probs[layer] = probs
            return probs, w, idx
        return observed_route

    def aux_loss(self) -> torch.Tensor:
        """Mean over MoE layers of :func:`aux_loss` for the last training forward."""
        losses = [aux_loss(p, self.blocks[i].k) for i, p in self.probs.items()]
        self.probs = {}
        return torch.stack(losses).mean()

    def imbalance(self) -> float:
        """Mean over layers of the max violation of the counts gathered since the last update."""
        values = [max_violation(load) for load in self.load.values() if load.sum() > 0]
        return sum(values) / len(values) if values else 0.0

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Apply the aux-loss-free update to every MoE layer (rate 0: just clear the counts)."""
        for i, block in self.blocks.items():
            bias = block.moe_statics.e_score_correction_bias  # [1, E] fp32
            if rate:
                bias.copy_(bias_update(bias, self.load[i], rate))
            self.load[i].zero_()

    def close(self) -> None:
        """Remove the wrappers (the class method is visible again)."""
        for block in self.blocks.values():
            del block.route
