"""Checkpoint <-> model: file discovery, the one HF<->native name table, strict loading, export.

The name table (`native_sources`) is the only place where checkpoint names and module names differ:
per-expert tensors `...mlp.experts.{e}.{gate,up,down}_proj.weight` stack into `...mlp.experts.{proj}`
[E, ...]. Export (`save_checkpoint`) walks the same table backwards. Two tolerated quirks of released
files, both decided by config or shape, never by file name:
- tied models (21B, 0.3B) may carry a redundant `lm_head.weight`: accepted and ignored;
- the 300B-PT `model.mtp_linear_proj.0.weight` was stored transposed ([2H, H] instead of [H, 2H]):
  detected by shape and transposed.
Loading is strict: every missing, unexpected or misshaped tensor is collected and reported in one error.
Weights are built on `meta`, then each parameter is allocated once in its final dtype and filled from
the mmap (pages released right after), so peak RSS stays near one copy of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol

import torch
from tqdm import tqdm

from .config import DEFAULT_MODEL_DIR, ModelConfig, resolve_model_dir  # noqa: F401 (re-exported)
from .layers import rope_inv_freq
from .model import Ernie45ForCausalLM, build_model, keeps_fp32
from .safetensors_mmap import CheckpointError, SafetensorsFile

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PROGRESS_BYTES = 256 * 1024 * 1024  # show a progress bar above this much checkpoint data


# ---- name table -------------------------------------------------------------------------------
def native_sources(model: torch.nn.Module) -> dict[str, list[str]]:
    """native parameter name -> checkpoint names it is made of (E names for stacked experts, else 1)."""
    return {name: sources_of(name, p, _first_expert(model, name)) for name, p in model.named_parameters()}


def sources_of(native: str, p: torch.Tensor, first_expert: int = 0) -> list[str]:
    """`P.mlp.experts.{proj}` <- `P.mlp.experts.{e}.{proj}.weight`; `P.mlp.experts.{proj}.{leaf}` (a quantized
    expert tensor) <- `P.mlp.experts.{e}.{proj}.{leaf}`; anything else maps to itself.

    `first_expert` is the global id of local expert 0 (non-zero when expert parallelism splits them).
    """
    parts = native.split(".")
    for j, leaf in ((-1, ["weight"]), (-2, [])):  # j: index of the projection name
        if len(parts) >= 2 - j and parts[j] in EXPERT_PROJS and parts[j - 1:j - 3:-1] == ["experts", "mlp"]:
            prefix, rest = ".".join(parts[:j]), ".".join(parts[j:] + leaf)
            return [f"{prefix}.{first_expert + e}.{rest}" for e in range(p.shape[0])]
    return [native]


def _first_expert(model: torch.nn.Module, native: str) -> int:
    if ".mlp.experts." not in native:
        return 0
    experts = model.get_submodule(native[:native.index(".mlp.experts.") + len(".mlp.experts")])
    return getattr(experts, "first_expert", 0)


def tolerated_extra(cfg: ModelConfig, name: str) -> bool:
    """Checkpoint tensors we accept and ignore: a tied model's redundant lm_head."""
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def is_transposed_mtp_proj(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> bool:
    H = cfg.hidden_size
    return name.startswith("model.mtp_linear_proj.") and shape == (2 * H, H) and H != 2 * H


# ---- checkpoint files --------------------------------------------------------------------------
def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it, from model.safetensors or the sharded index."""
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE} is not a valid index (need a 'weight_map'): {e}") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} lists shard(s) that are not in {path}: {', '.join(missing)}; "
                                  "the download is incomplete")
        return {k: path / f for k, f in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        return {k: path / SINGLE_FILE for k in SafetensorsFile(path / SINGLE_FILE).tensors}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = (f" It has {', '.join(pickles)}: ernie45 never loads pickled weights (they can run code); "
            "convert them to safetensors with a trusted tool first." if pickles else "")
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}.{hint}")


def check_keys(model: Ernie45ForCausalLM, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Compare the checkpoint's names/shapes with the model's; returns human-readable problems."""
    cfg, expected = model.config, {}
    params = dict(model.named_parameters())
    for native, sources in native_sources(model).items():
        shape = tuple(params[native].shape[1:] if sources != [native] else params[native].shape)
        expected.update({s: shape for s in sources})
    problems = [f"missing: {k} {list(v)}" for k, v in expected.items() if k not in shapes]
    for k, shape in shapes.items():
        if k not in expected:
            if not tolerated_extra(cfg, k):
                problems.append(f"unexpected: {k} {list(shape)}")
        elif shape != expected[k] and not is_transposed_mtp_proj(k, shape, cfg):
            problems.append(f"misshaped: {k} is {list(shape)} in the checkpoint, the config implies {list(expected[k])}")
    return problems


# ---- loading -----------------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    """None/'auto' -> the checkpoint's torch_dtype; strings like 'bf16', 'float32' accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = cfg.torch_dtype if dtype in (None, "auto") else dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    return resolved


class LoadTransform(Protocol):
    """Changes the model between the strict key check and filling (e.g. a tensor/expert-parallel plan)."""

    def prepare(self, model: Ernie45ForCausalLM) -> None:
        """Replace or resize modules of the meta model in place (local shapes)."""

    def source_slice(self, native: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of each checkpoint tensor feeding `native` that this process reads, or None."""


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
               progress: bool | None = None, transform: LoadTransform | None = None) -> Ernie45ForCausalLM:
    """Build an ERNIE 4.5 model on meta and load a checkpoint directory into it, strictly.

    dtype: None/'auto' = the checkpoint's `torch_dtype`; router weight and correction bias stay fp32.
    A quantized checkpoint (`quantization_config` in config.json) gets its quantized modules swapped in
    on meta first. `transform` (a parallel plan) then shards modules; each process reads only its slices.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the checkpoint folder holding config.json "
                              "and model.safetensors")
    cfg = ModelConfig.from_file(path)
    model = build_model(cfg, resolve_dtype(dtype, cfg))
    if cfg.quantization_config:
        from .quant import apply_quant_config  # the quantized weight format (issue: quantization)

        apply_quant_config(model, cfg.quantization_config)
    files = checkpoint_files(path)
    readers = {f: SafetensorsFile(f) for f in set(files.values())}
    try:
        located = _locate(files, readers)
        problems = check_keys(model, {k: r.tensors[k].shape for k, r in located.items()})
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match its config.json ({len(problems)} problem(s)):\n  "
                                  + "\n  ".join(problems))
        if transform is not None:
            transform.prepare(model)
        _fill(model, located, device, progress, transform)
    finally:
        for r in readers.values():
            r.close()
    model.model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)  # non-persistent buffer
    return model.eval()


def _locate(files: dict[str, Path], readers: dict[Path, SafetensorsFile]) -> dict[str, SafetensorsFile]:
    located = {}
    for name, f in files.items():
        if name not in readers[f].tensors:
            raise CheckpointError(f"the index says {name} is in {f.name}, but that file does not contain it; "
                                  "the shard or the index is from a different download")
        located[name] = readers[f]
    for f, r in readers.items():  # tensors present in a shard but absent from the index are unexpected too
        located.update({n: r for n in r.tensors if n not in located})
    return located


def _fill(model: Ernie45ForCausalLM, located: dict[str, SafetensorsFile], device: str, progress: bool | None,
          transform: LoadTransform | None = None):
    """Allocate each parameter once in its final dtype and copy its (sliced) sources into it."""
    params = dict(model.named_parameters())
    plan = {native: (sources, transform.source_slice(native) if transform else None)
            for native, sources in native_sources(model).items()}
    total = sum(located[s].tensors[s].nbytes for sources, _ in plan.values() for s in sources)
    show = total >= PROGRESS_BYTES if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show)
    with torch.no_grad():
        for native, (sources, cut) in plan.items():
            meta = params[native]
            out = torch.empty(meta.shape, dtype=meta.dtype, device=device)
            for i, src in enumerate(sources):
                (out[i] if sources != [native] else out).copy_(_read(located[src], src, cut, model.config))
                located[src].release(src)
                bar.update(located[src].tensors[src].nbytes)
            _set_param(model, native, out)
    bar.close()


def _read(reader: SafetensorsFile, name: str, cut: tuple[int, int, int] | None, cfg: ModelConfig) -> torch.Tensor:
    """A zero-copy view of a checkpoint tensor (transposed if it is the 300B's [2H, H] MTP proj), sliced."""
    if cut is not None and cut[0] == 0 and not is_transposed_mtp_proj(name, reader.tensors[name].shape, cfg):
        return reader.view(name, rows=slice(cut[1], cut[2]))  # contiguous rows: touch only their pages
    t = reader.view(name)
    if is_transposed_mtp_proj(name, tuple(t.shape), cfg):
        t = t.t()
    return t if cut is None else t.narrow(cut[0], cut[1], cut[2] - cut[1])


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))


# ---- export ------------------------------------------------------------------------------------
def hf_state_dict(model: Ernie45ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Native parameters -> (checkpoint name, tensor) in the official layout (experts unstacked)."""
    for native, p in model.named_parameters():
        sources = sources_of(native, p, _first_expert(model, native))
        for i, src in enumerate(sources):
            yield src, (p[i] if sources != [native] else p).detach().contiguous()


def save_checkpoint(model: Ernie45ForCausalLM, out_dir: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write config.json + model.safetensors (or shards + index) + generation_config.json, official layout.

    `dtype` casts everything except the fp32 router/bias; None keeps the model's dtypes.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (t if dtype is None or keeps_fp32(k) else t.to(dtype)) for k, t in hf_state_dict(model)}
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.config
    hf = cfg.to_hf_dict()
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes and shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards
