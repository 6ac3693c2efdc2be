"""Training checkpoints for exact resume: tensors in safetensors, everything else in JSON, no pickle.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding
- the model in the official HF layout (``config.json``, ``model.safetensors``, ``generation_config.json``,
  written by :func:`ernie45.weights.save_checkpoint` in fp32), so every checkpoint is also loadable for
  inference; the correction biases travel with it, being model tensors;
- ``optimizer.safetensors``: AdamW's per-parameter tensors keyed ``state.<param name>.<key>`` (names,
  not positions, so a reordering cannot silently mismatch) and the torch RNG state(s);
- ``trainer_state.json``: step, data position, the run's train config, the loss history, the
  optimizer's param groups and non-tensor state, and the Python/NumPy RNG states.

The learning-rate schedule is a pure function of the step (loop.py), so the step *is* the scheduler
state. Everything is written into ``<name>.tmp`` and renamed, so a crash never leaves a half checkpoint
that resume would pick up. torch.save is never used: a pickle can run code on load.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ernie45.model import Ernie45ForCausalLM
from ernie45.weights import load_model, save_checkpoint

STATE_JSON, OPTIM_FILE, PREFIX = "trainer_state.json", "optimizer.safetensors", "step-"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and why."""


# ---- RNG ----------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(state), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- optimizer ----------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state_dict -> (tensors keyed by parameter name, JSON-able rest). ``names`` in param order."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{names[index]}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_names": names, "param_groups": groups, "scalar_state": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor],
                      meta: dict) -> None:
    if meta["param_names"] != names:
        raise ResumeError("the checkpoint's optimizer was built over different parameters "
                          f"({len(meta['param_names'])} saved, {len(names)} now); the model config changed")
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        per = {k.removeprefix(f"state.{name}."): t for k, t in tensors.items() if k.startswith(f"state.{name}.")}
        per.update(meta["scalar_state"].get(name, {}))
        if per:
            state[index] = per
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- save / load --------------------------------------------------------------------------------
def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def save_training_state(root: str | Path, model: Ernie45ForCausalLM, optimizer: torch.optim.Optimizer,
                        names: list[str], state: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint ``root/step-<state['step']>``; keep only the newest ``keep`` (None: all)."""
    final = checkpoint_dir(root, state["step"])
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, dtype=None)  # model dtypes as trained (fp32 master weights)
    opt_tensors, opt_meta = optimizer_state(optimizer, names)
    rng_tensors, rng_meta = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
    payload = {**state, "optimizer": opt_meta, "rng": rng_meta}
    (tmp / STATE_JSON).write_text(json.dumps(payload) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
             and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def read_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / STATE_JSON
    if not file.is_file():
        raise ResumeError(f"{path} is not a training checkpoint (no {STATE_JSON}); pass a checkpoints/step-N "
                          "directory or the run's output directory")
    return json.loads(file.read_text())


def load_training_state(path: str | Path) -> tuple[Ernie45ForCausalLM, dict[str, Any], dict[str, torch.Tensor]]:
    """-> (model in fp32, trainer state, optimizer + RNG tensors); apply them with restore_*()."""
    state = read_state(path)
    model = load_model(path, dtype=torch.float32)
    return model, state, load_file(str(Path(path) / OPTIM_FILE))


def export_model(model: Ernie45ForCausalLM, out: Path, dtype: torch.dtype, tokenizer_dir: Path | None) -> None:
    """The official HF layout in ``out`` (weights cast to ``dtype``, router/bias fp32) + tokenizer files."""
    save_checkpoint(model, out, dtype=dtype)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
