"""``ernie45 train``: train an ERNIE 4.5 model (MoE or dense, with or without MTP) on a tokenized corpus.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows of ``seq_len`` tokens; each
micro-batch loss is scaled by 1/grad_accum, so the step's gradient is that of the mean over all its
windows (equal-size windows: the mean of the means). Then: gradient clipping by global norm, AdamW
(decoupled weight decay on matrices only; norms and the fp32 correction bias excluded, the bias has no
gradient anyway), and for MoE models with ``moe_use_aux_free`` the correction-bias update from the
step's expert load (balance.py). Objective: LM + mtp_lambda * MTP (mtp.py) + aux_loss_coef * aux.

Learning rate: linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``
at ``steps``; a pure function of the step, so resuming needs no scheduler object.
Precision: fp32 master weights always; ``dtype="bf16"`` runs the forward under bf16 autocast (routing
stays fp32, see balance.py). On CPUs without bf16 units bf16 is slower, not faster.
Exact resume: model, AdamW state, RNG states, step and data position are restored (checkpoint.py), and
batches are a pure function of the position (data.py), so k steps + resume + (N-k) steps reproduces N
straight steps bit for bit on CPU in fp32.

Output directory: the official HF layout (config.json, model.safetensors with the MTP tensors under
their checkpoint names, generation_config.json, the corpus tokenizer's files), plus train_config.json,
history.json, loss.png and checkpoints/step-N/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ernie45.config import ModelConfig, preset
from ernie45.model import build_model, init_random
from ernie45.weights import resolve_dtype

from . import checkpoint as ckpt
from .balance import RoutingMonitor
from .corpus import read_manifest
from .data import TOKENIZER_SUBDIR, WindowSampler, eval_batches, load_tokens
from .mtp import window_losses
from .plot import write_history

# A small model of the 21B-A3B pattern (dense first layer, shared experts, tied head, one MTP layer)
# that trains on two CPU cores; vocab_size comes from the corpus tokenizer when left out.
DEFAULT_MODEL: dict[str, Any] = dict(
    model_type="ernie4_5_moe", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, moe_num_experts=16, moe_k=4, moe_intermediate_size=128,
    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1, moe_use_aux_free=True,
    num_nextn_predict_layers=1, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=500000.0,
    rms_norm_eps=1e-5, hidden_act="silu", use_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    torch_dtype="float32")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section of a run config; docs/training.md has the table. Frozen: a run never edits it."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global grad norm; 0 = off
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    init_std: float = 0.02
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 500
    keep_checkpoints: int = 2
    bias_update_rate: float = 1e-3  # ERNIE's moe_use_aux_free_update_coef default
    aux_loss_coef: float = 0.0
    mtp_lambda: float = 1.0  # ERNIE's multi_token_pred_lambda default
    stop_at: int | None = None  # stop after this step as if interrupted (resume continues)
    device: str = "cpu"
    export_dtype: str = "float32"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "TrainConfig":
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            known = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"unknown train setting(s) {unknown}; known: {known}")
        tc = cls(**raw)
        if tc.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype {tc.dtype!r}: use fp32 or bf16")
        if min(tc.steps, tc.batch_size, tc.seq_len, tc.grad_accum) < 1:
            raise ValueError("steps, batch_size, seq_len and grad_accum must all be >= 1")
        return tc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate for 0-based optimizer step ``step``: linear warmup, then cosine to lr*min_lr_ratio."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = min((step - tc.warmup) / max(tc.steps - tc.warmup, 1), 1.0)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_model_config(raw: dict[str, Any] | str | None, vocab_size: int) -> ModelConfig:
    """The ``model`` section: a config.json dict, a preset name, or None (DEFAULT_MODEL)."""
    raw = preset(raw).to_hf_dict() if isinstance(raw, str) else dict(raw or DEFAULT_MODEL)
    raw.setdefault("vocab_size", vocab_size)
    return ModelConfig.from_dict(raw)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with weight decay on matrices only; returns the parameter names in optimizer order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    other = [(n, p) for n, p in named if p.ndim < 2]
    groups = [{"params": [p for _, p in decay], "weight_decay": tc.weight_decay},
              {"params": [p for _, p in other], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)
    return opt, [n for n, _ in decay + other]


@dataclass
class Run:
    """Everything one training run holds; ``step`` counts completed optimizer steps."""

    cfg: ModelConfig
    tc: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.AdamW
    names: list[str]
    monitor: RoutingMonitor
    sampler: WindowSampler
    heldout: list[torch.Tensor]
    out: Path
    step: int = 0
    position: int = 0
    history: dict[str, list] = dataclasses.field(default_factory=lambda: {"train": [], "eval": []})
    train_seconds: float = 0.0

    def autocast(self):
        return torch.autocast(device_type=torch.device(self.tc.device).type, dtype=torch.bfloat16,
                              enabled=self.tc.dtype == "bf16")

    @property
    def tokens_per_step(self) -> int:
        return self.tc.batch_size * self.tc.grad_accum * self.tc.seq_len


def micro_losses(run: Run, window: torch.Tensor) -> dict[str, torch.Tensor]:
    """Losses of one micro-batch window [B, X]; "loss" is the weighted objective."""
    with run.autocast():
        losses = window_losses(run.model, window, run.tc.seq_len)
    loss = losses["lm_loss"]
    if "mtp_loss" in losses:
        loss = loss + run.tc.mtp_lambda * losses["mtp_loss"]
    if run.monitor.keep_probs and run.monitor.blocks:
        losses["aux_loss"] = run.monitor.aux_loss()
        loss = loss + run.tc.aux_loss_coef * losses["aux_loss"]
    return {"loss": loss, **losses}


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step (grad_accum micro-batches); returns the step's logged values."""
    tc, lr = run.tc, lr_at(run.step, run.tc)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for _ in range(tc.grad_accum):
        window = run.sampler.batch(run.position).to(tc.device)  # [B, T+1+mtp]
        run.position += tc.batch_size
        losses = micro_losses(run, window)
        (losses["loss"] / tc.grad_accum).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item() / tc.grad_accum
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, tc.clip if tc.clip > 0 else float("inf"))
    run.optimizer.step()
    imbalance = run.monitor.imbalance()
    run.monitor.update_bias(tc.bias_update_rate if run.cfg.moe_use_aux_free else 0.0)
    run.step += 1
    return {"step": run.step, **sums, "lr": lr, "grad_norm": float(norm), "imbalance": imbalance}


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Held-out LM (and MTP) loss, token-weighted over the fixed held-out windows; perplexity = exp(LM)."""
    run.model.eval()
    totals: dict[str, float] = {}
    count = 0
    for window in run.heldout:
        with run.autocast():
            losses = window_losses(run.model, window.to(run.tc.device), run.tc.seq_len)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v.item() * window.shape[0]
        count += window.shape[0]
    run.model.train()
    out = {"step": run.step, "heldout_loss": totals["lm_loss"] / count}
    out["heldout_ppl"] = math.exp(out["heldout_loss"])
    if "mtp_loss" in totals:
        out["heldout_mtp_loss"] = totals["mtp_loss"] / count
    return out


def save_state(run: Run) -> Path:
    state = {"step": run.step, "data_position": run.position, "train_config": run.tc.to_dict(),
             "history": run.history, "train_seconds": run.train_seconds}
    return ckpt.save_training_state(run.out / "checkpoints", run.model, run.optimizer, run.names, state,
                                    keep=run.tc.keep_checkpoints)


def _vocab_needed(data_dir: Path) -> tuple[int, int]:
    """(tokenizer size, largest id in the token files) of a tokenized corpus."""
    tokens = read_manifest(data_dir).get("tokens")
    if not tokens:
        raise ValueError(f"{data_dir} has no tokens yet; run: ernie45 data tokenize --data {data_dir} "
                         "--vocab-size 8192")
    max_id = max(tokens["train"]["max_id"], tokens["heldout"]["max_id"])
    return tokens["tokenizer"].get("vocab_size") or max_id + 1, max_id


def setup(data_dir: Path, out: Path, model_config, train_config: dict | None, resume: Path | None) -> Run:
    """Build a fresh run, or restore one from the checkpoint ``resume`` (its train config + overrides)."""
    vocab, max_id = _vocab_needed(data_dir)
    if resume is not None:
        model, state, tensors = ckpt.load_training_state(resume)
        saved = {k: v for k, v in state["train_config"].items() if k != "stop_at"}  # per invocation only
        tc = TrainConfig.from_dict({**saved, **(train_config or {})})
        model.to(tc.device)
    else:
        tc = TrainConfig.from_dict(train_config)
        cfg = resolve_model_config(model_config, vocab)
        torch.manual_seed(tc.seed)
        model = init_random(build_model(cfg), seed=tc.seed, std=tc.init_std).to(tc.device)
    cfg = model.config
    if max_id >= cfg.vocab_size:
        raise ValueError(f"the corpus has token id {max_id} but the model's vocab_size is {cfg.vocab_size}; "
                         f"set the model's vocab_size to at least {max_id + 1} (or leave it out)")
    model.train()
    optimizer, names = make_optimizer(model, tc)
    extra = cfg.num_nextn_predict_layers
    run = Run(cfg, tc, model, optimizer, names, RoutingMonitor(model, keep_probs=tc.aux_loss_coef > 0),
              WindowSampler(load_tokens(data_dir, "train"), tc.seq_len, tc.batch_size, extra, tc.seed),
              eval_batches(load_tokens(data_dir, "heldout"), tc.seq_len, tc.batch_size, extra, tc.eval_batches), out)
    if resume is not None:
        ckpt.restore_optimizer(optimizer, names, tensors, state["optimizer"])
        ckpt.restore_rng(tensors, state["rng"])
        run.step, run.position, run.history = state["step"], state["data_position"], state["history"]
        run.train_seconds = state.get("train_seconds", 0.0)
    return run


def resolve_resume(resume: str | Path | None, out: Path) -> Path | None:
    """None, a checkpoint directory, or "latest" (the newest under OUT/checkpoints)."""
    if resume is None:
        return None
    if str(resume) != "latest":
        return Path(resume)
    found = ckpt.list_checkpoints(out / "checkpoints")
    if not found:
        raise ckpt.ResumeError(f"--resume: no checkpoint under {out / 'checkpoints'} to resume from")
    return found[-1]


def run_steps(run: Run, last: int, progress: bool) -> None:
    """Optimizer steps up to ``last``, evaluating and checkpointing on schedule, with a progress bar."""
    tc = run.tc
    bar = tqdm(total=tc.steps, initial=run.step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    while run.step < last:
        start = time.perf_counter()
        row = train_step(run)
        run.train_seconds += time.perf_counter() - start
        run.history["train"].append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['lm_loss']:.3f}", lr=f"{row['lr']:.2e}",
                        tok_s=f"{run.step * run.tokens_per_step / max(run.train_seconds, 1e-9):.0f}")
        if run.step % tc.eval_every == 0 or run.step == tc.steps:
            row = evaluate(run)
            run.history["eval"].append(row)
            bar.write(f"step {run.step}: held-out loss {row['heldout_loss']:.4f}, ppl {row['heldout_ppl']:.2f}",
                      file=sys.stderr)
        if run.step % tc.save_every == 0 or run.step == last:
            save_state(run)
    bar.close()


def train(data_dir: str | Path, out_dir: str | Path, model_config: dict | str | None = None,
          train_config: dict | None = None, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns a summary (steps, tokens/s, last losses, output directory)."""
    data_dir, out = Path(data_dir), Path(out_dir)
    run = setup(data_dir, out, model_config, train_config, resolve_resume(resume, out))
    out.mkdir(parents=True, exist_ok=True)
    tc = run.tc
    run_config = {"model": run.cfg.to_hf_dict(), "train": tc.to_dict()}  # reusable as --config
    (out / "train_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    run_steps(run, tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at), progress)
    if run.step == tc.steps:
        ckpt.export_model(run.model, out, resolve_dtype(tc.export_dtype, run.cfg), data_dir / TOKENIZER_SUBDIR)
    write_history(run.history, out, title=f"{run.cfg.model_type}, {run.step} steps")
    run.monitor.close()
    tokens = run.step * run.tokens_per_step
    return {"step": run.step, "steps": tc.steps, "out": str(out), "tokens": tokens,
            "train_seconds": round(run.train_seconds, 3),
            "tokens_per_s": round(tokens / run.train_seconds, 1) if run.train_seconds else None,
            "last_train": (run.history["train"] or [None])[-1], "last_eval": (run.history["eval"] or [None])[-1]}
