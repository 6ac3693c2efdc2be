"""Quantize a checkpoint on disk one decoder layer at a time.

Peak host RAM stays near one layer in fp32 plus one output shard: the model is built on meta, each
unit (a decoder layer, the MTP projection, the MTP block) is materialised from the mmap'd safetensors,
quantized, written, and dropped. Tensors that keep their precision (embeddings, head, norms, router,
correction bias) are copied byte for byte from the source in their original dtype.

GPTQ needs each layer's inputs: `LayerInputs` embeds the calibration tokens once and carries their
hidden states [S, T, D] (fp32) through the trunk. For each layer it first collects the input Hessians
with the float weights, then quantizes, then runs the *quantized* layer to make the next layer's inputs,
so later layers learn to compensate the errors of earlier ones. The MTP modules see no calibration
activations here and are round-to-nearest.

Output: `model.safetensors` (or numbered shards + index), config.json with `quantization_config`, and
every other small file of the source directory (tokenizer, generation config) copied.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import ModelConfig
from ..layers import rope_cos_sin, rope_inv_freq
from ..model import build_model
from ..safetensors_mmap import CheckpointError, SafetensorsFile
from ..weights import (INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, check_keys, checkpoint_files,
                       is_transposed_mtp_proj, sources_of)
from .modules import QuantWeight
from .recipe import (DEFAULT_INT4_MOE_LAYERS, EXPERT_PROJS, Target, check_scheme, group_fallbacks, plan,
                     quantization_config)

DEFAULT_SHARD_BYTES = 2 << 30


# ---- calibration ---------------------------------------------------------------------------------
class LayerInputs:
    """Hidden states of S calibration sequences [S, T, D] fp32, advanced through the trunk layer by layer."""

    def __init__(self, cfg: ModelConfig, ids: torch.Tensor, embed_weight: torch.Tensor, batch: int = 8):
        if ids.ndim != 2 or int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"calibration ids must be [S, T] in [0, {cfg.vocab_size}); got {list(ids.shape)}")
        self.x = F.embedding(ids.long(), embed_weight.detach().float())  # [S, T, D]
        self.pos = torch.arange(ids.shape[1])[None]  # [1, T]
        self.cos, self.sin = rope_cos_sin(self.pos, rope_inv_freq(cfg.head_dim, cfg.rope_theta))  # [1, T, Dh]
        self.batch = batch

    @torch.no_grad()
    def run(self, layer: nn.Module, update: bool) -> None:
        dtype = layer.input_layernorm.weight.dtype
        for b in range(0, self.x.shape[0], self.batch):
            xb = self.x[b:b + self.batch]
            n = xb.shape[0]
            y = layer(xb.to(dtype), self.cos.expand(n, -1, -1), self.sin.expand(n, -1, -1), self.pos.expand(n, -1))
            if update:
                self.x[b:b + self.batch] = y.float()

    def hessians(self, layer: nn.Module, names: Iterable[str]) -> dict[str, Any]:
        from .gptq import collect_hessians

        return collect_hessians(layer, names, lambda: self.run(layer, update=False))


def calibration_windows(tokens: np.ndarray | torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens spread evenly over a token stream -> [S, T] int64."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if tokens.numel() < seq_len:
        raise ValueError(f"calibration stream has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    starts = torch.linspace(0, tokens.numel() - seq_len, samples).long()
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


# ---- the unit loop shared by in-memory and streaming quantization -------------------------------
def model_units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(prefix, module, is_trunk_layer) of everything that holds quantizable weights, in forward order."""
    m = model.model
    units = [(f"model.layers.{i}", layer, True) for i, layer in enumerate(m.layers)]
    if len(m.mtp_block):
        units += [("model.mtp_linear_proj", m.mtp_linear_proj, False), ("model.mtp_block", m.mtp_block, False)]
    return units


def _hessian_names(prefix: str, targets: dict[str, Target]) -> list[str]:
    """Local names of the Linears / Experts inside `prefix` whose inputs GPTQ needs."""
    names = set()
    for name in targets:
        if name.startswith(prefix + "."):
            local = name[len(prefix) + 1:]
            parent, _, leaf = local.rpartition(".")
            names.add(parent if parent.endswith("experts") and leaf in EXPERT_PROJS and
                      targets[name].experts else local)
    return sorted(names)


def quantize_units(units: Iterable[tuple[str, nn.Module, bool]], targets: dict[str, Target], method: str,
                   calib: LayerInputs | None, min_tokens: int, progress: bool,
                   total: int | None = None) -> Iterator[tuple[str, nn.Module, dict]]:
    """Quantize each unit in turn (GPTQ on trunk layers when `calib`), yielding (prefix, unit, how)."""
    from . import quantize_unit

    units = list(units) if total is None else units
    bar = tqdm(units, total=total or len(units), desc=f"quantizing ({method})", unit="layer", disable=not progress)
    for prefix, unit, trunk in bar:
        hessians = calib.hessians(unit, _hessian_names(prefix, targets)) if calib is not None and trunk else None
        how = quantize_unit(unit, prefix, targets, method, hessians, min_tokens)
        del hessians
        if calib is not None and trunk:
            calib.run(unit, update=True)
        yield prefix, unit, how


# ---- checkpoint in, checkpoint out ---------------------------------------------------------------
class _Source:
    """The source checkpoint: strict key check against the meta model, then per-unit materialisation."""

    def __init__(self, path: Path, meta: nn.Module):
        self.cfg, files = meta.config, checkpoint_files(path)
        self.readers = {f: SafetensorsFile(f) for f in set(files.values())}
        self.where = {n: self.readers[f] for n, f in files.items()}
        problems = check_keys(meta, {n: r.tensors[n].shape for n, r in self.where.items()})
        if problems:
            self.close()
            raise CheckpointError(f"{path} does not match its config.json:\n  " + "\n  ".join(problems))

    def view(self, name: str) -> torch.Tensor:
        t = self.where[name].view(name)
        return t.t() if is_transposed_mtp_proj(name, tuple(t.shape), self.cfg) else t

    @torch.no_grad()
    def materialise(self, unit: nn.Module, prefix: str) -> nn.Module:
        unit.to_empty(device="cpu")
        for name, p in unit.named_parameters():
            sources = sources_of(f"{prefix}.{name}", p)
            for i, src in enumerate(sources):
                (p[i] if sources != [f"{prefix}.{name}"] else p).copy_(self.view(src))
                self.where[src].release(src)
        return unit

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


class _ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever `max_bytes` have gathered."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.files, self.total = 0, [], 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.detach().contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            path = self.out / f"part-{len(self.files):05d}.safetensors"
            save_file(self.pending, str(path), metadata={"format": "pt"})
            self.files.append((path, list(self.pending)))
            self.total += self.size
            self.pending, self.size = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        if len(self.files) == 1:
            final = self.out / SINGLE_FILE
            self.files[0][0].replace(final)
            return [final]
        n, weight_map, paths = len(self.files), {}, []
        for i, (path, names) in enumerate(self.files):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(final)
            weight_map.update({k: final.name for k in names})
            paths.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return paths


def _emit(writer: _ShardWriter, source: _Source, unit: nn.Module, prefix: str) -> None:
    """Write a quantized unit: packed tensors from the unit, everything else from the source bytes."""
    for name, p in unit.named_parameters():
        full = f"{prefix}.{name}"
        sources = sources_of(full, p)  # per-expert names for stacked expert tensors
        packed = isinstance(unit.get_submodule(name.rpartition(".")[0]), QuantWeight)
        for i, src in enumerate(sources):
            if packed:
                writer.add(src, p[i] if sources != [full] else p)
            else:
                writer.add(src, source.view(src))  # norms, router, bias: original dtype


def quantize_checkpoint(src: str | Path, out: str | Path, scheme: str, method: str = "rtn",
                        calib_ids: torch.Tensor | None = None, int4_moe_layers: int = DEFAULT_INT4_MOE_LAYERS,
                        min_tokens: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        progress: bool = True) -> dict[str, Any]:
    """Quantize the checkpoint directory `src` into `out`; returns a summary (bytes, files, fallbacks)."""
    from .gptq import DEFAULT_MIN_TOKENS

    check_scheme(scheme, method)
    src, out = Path(src), Path(out)
    if method == "gptq" and calib_ids is None:
        raise ValueError("--method gptq needs calibration text: pass --calib (see `ernie45 quantize --help`)")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source directory; write the quantized checkpoint elsewhere")
    t0 = time.perf_counter()
    cfg = ModelConfig.from_file(src)
    if cfg.quantization_config:
        raise ValueError(f"{src} is already quantized ({cfg.quantization_config.get('scheme')}); quantize the "
                         "original bf16/fp32 checkpoint instead")
    meta = build_model(cfg, torch.float32)
    targets = plan(cfg, scheme, int4_moe_layers)
    source = _Source(src, meta)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, max_shard_bytes)
    try:
        units = model_units(meta)
        prefixes = tuple(p + "." for p, _, _ in units)
        for name, p in meta.named_parameters():  # embeddings, final norm, head, MTP norms: bytes as they are
            if not name.startswith(prefixes):
                writer.add(name, source.view(name))
        calib = LayerInputs(cfg, calib_ids, source.view("model.embed_tokens.weight")) if method == "gptq" else None
        loaded = ((prefix, source.materialise(unit, prefix), trunk) for prefix, unit, trunk in units)
        how: dict[str, dict] = {}
        for prefix, unit, done in quantize_units(loaded, targets, method, calib, min_tokens or DEFAULT_MIN_TOKENS,
                                                 progress, total=len(units)):
            _emit(writer, source, unit, prefix)
            how.update(done)
            unit.to_empty(device="meta")  # drop this unit's memory before the next one
        files = writer.close()
    finally:
        source.close()
    info = None if calib is None else {"sequences": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1])}
    qcfg = quantization_config(scheme, method, targets, how, int4_moe_layers, info)
    (out / "config.json").write_text(json.dumps(cfg.replace(quantization_config=qcfg).to_hf_dict(), indent=2) + "\n")
    _copy_side_files(src, out)
    return {"files": [str(f) for f in files], "tensor_bytes": writer.total,
            "file_bytes": sum(f.stat().st_size for f in files), "group_fallbacks": group_fallbacks(targets),
            "seconds": time.perf_counter() - t0}


def _copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer and generation files travel with the weights (never weights or pickles)."""
    skip = {SINGLE_FILE, INDEX_FILE, "config.json"}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and f.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            shutil.copy2(f, out / f.name)
