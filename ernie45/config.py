"""The one frozen model configuration, parsed from a checkpoint's ``config.json``.

Owns: reading both ERNIE 4.5 ``model_type``s (``ernie4_5_moe`` and ``ernie4_5``), resolving every
sentinel exactly once (``moe_layer_end_index = -1``, absent ``head_dim``, ``rope_theta`` vs the newer
``rope_parameters`` dict, ``torch_dtype`` vs ``dtype``), the derived fields model code relies on
(``head_dim``, ``moe_layers``) and the presets of the released models.

Model code reads attributes of :class:`ModelConfig` and nothing else: no ``getattr(cfg, x, default)``
anywhere downstream. Keys that do not change the forward pass are kept in ``extra`` so an exported
``config.json`` round-trips.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("ernie4_5_moe", "ernie4_5")
ARCHITECTURES = {"ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "ernie4_5": "Ernie4_5ForCausalLM"}
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "relu")


class ConfigError(ValueError):
    """A config.json that ernie45 cannot run faithfully; the message says which key and why."""


@dataclass(frozen=True)
class ModelConfig:
    """Normalised ERNIE 4.5 text-model configuration (all sentinels resolved).

    Dense models (``model_type == "ernie4_5"``) have ``moe_num_experts == 0`` and an all-False
    ``moe_layers``. ``head_dim`` is always a concrete int (0.3B: 128 while hidden/heads is 64).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"
    # MoE (zero / empty for dense models)
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    moe_use_aux_free: bool = True
    num_nextn_predict_layers: int = 0
    # Quantization recorded by `ernie45 quantize` (None for plain checkpoints).
    quantization_config: Mapping[str, Any] | None = None
    # Keys that do not affect the forward pass, kept verbatim for export.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type == "ernie4_5_moe"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """transformers/vLLM/Paddle rule: ``(l+1) % interval == 0 and start <= l <= end``."""
        return (
            self.is_moe
            and (layer_idx + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= layer_idx <= self.moe_layer_end_index
        )

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        return tuple(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the single shared-expert MLP (21B: 2 x 1536 = 3072; 0 when absent)."""
        return self.moe_intermediate_size * self.moe_num_shared_experts

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    # ---- parsing / export ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ModelConfig":
        return _parse(dict(raw))

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"no config.json at {path}: an ERNIE 4.5 checkpoint directory must contain the "
                "config.json written next to its safetensors (download or save_pretrained writes it)"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-copy the file from the checkpoint") from e
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The normalised config as a plain JSON-ready dict (what `ernie45 info` prints)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out["quantization_config"] = dict(self.quantization_config) if self.quantization_config else None
        out["moe_layers"] = [i for i, m in enumerate(self.moe_layers) if m]
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json in the official `-PT` layout (loadable by transformers and by us)."""
        out = dict(self.extra)
        out.update(architectures=[ARCHITECTURES[self.model_type]], model_type=self.model_type)
        skip = {"extra", "quantization_config", "torch_dtype", "eos_token_id"}
        skip |= set() if self.is_moe else {f.name for f in dataclasses.fields(self) if f.name.startswith("moe_")}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out["torch_dtype"] = self.torch_dtype
        if self.quantization_config:
            out["quantization_config"] = dict(self.quantization_config)
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
_DROPPED = {"architectures", "model_type", "rope_parameters", "dtype", "torch_dtype", "head_dim",
            "moe_layer_end_index", "eos_token_id"}


def _require(raw: dict, key: str) -> Any:
    if key not in raw:
        raise ConfigError(f"config.json has no '{key}', which every ERNIE 4.5 config carries; "
                          "the file is incomplete or not an ERNIE 4.5 config")
    return raw[key]


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope type '{rope_type}' is not used by any ERNIE 4.5 model; "
                          "ernie45 implements plain interleaved RoPE only")
    return float(params.get("rope_theta", raw.get("rope_theta", 500000.0)))


def _parse(raw: dict) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}: ernie45 runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                          "(the ERNIE 4.5 text models); VL and other architectures are not supported")
    if raw.get("use_bias"):
        raise ConfigError("use_bias=true: no released ERNIE 4.5 text model has projection biases and "
                          "ernie45 does not implement them")
    act = raw.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"hidden_act {act!r} is not supported (expected one of {SUPPORTED_ACTIVATIONS})")
    hidden, heads = int(_require(raw, "hidden_size")), int(_require(raw, "num_attention_heads"))
    n_layers = int(_require(raw, "num_hidden_layers"))
    kw: dict[str, Any] = {k: raw[k] for k in _FIELDS & raw.keys() if k not in _DROPPED}
    kw.update(
        model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size")),
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rope_theta=_rope_theta(raw),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
    )
    # transformers >= 5.25 writes `"num_nextn_predict_layers": null` (it ignores MTP): no MTP layer.
    kw["num_nextn_predict_layers"] = int(raw.get("num_nextn_predict_layers") or 0)
    eos = raw.get("eos_token_id", 2)
    kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
    if model_type == "ernie4_5_moe":
        end = raw.get("moe_layer_end_index", -1)
        kw["moe_layer_end_index"] = n_layers - 1 if end is None or end == -1 else int(end)
        kw.setdefault("moe_num_experts", 64)
        kw.setdefault("moe_k", 6)
        kw.setdefault("moe_num_shared_experts", 2)  # transformers' default; -PT configs state it
        kw.setdefault("moe_layer_start_index", 1)
        kw.setdefault("moe_intermediate_size", 1536)
        if isinstance(kw["moe_num_experts"], list):
            raise ConfigError("moe_num_experts as a list is the ERNIE-4.5-VL multimodal layout; not supported")
    else:
        for k in [k for k in kw if k.startswith("moe_")]:
            kw.pop(k)
    extra = {k: v for k, v in raw.items() if k not in _FIELDS and k not in _DROPPED}
    cfg = ModelConfig(extra=extra, **kw)
    _validate(cfg)
    return cfg


def _validate(cfg: ModelConfig) -> None:
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads={cfg.num_key_value_heads}; GQA needs whole groups")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim={cfg.head_dim} is odd; interleaved RoPE rotates pairs of dims")
    if cfg.is_moe:
        if not 0 < cfg.moe_k <= cfg.moe_num_experts:
            raise ConfigError(f"moe_k={cfg.moe_k} must be between 1 and moe_num_experts={cfg.moe_num_experts}")
        if cfg.moe_layer_interval < 1:
            raise ConfigError(f"moe_layer_interval={cfg.moe_layer_interval} must be >= 1")
    if cfg.num_nextn_predict_layers not in (0, 1):
        raise ConfigError(f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}: released models have 0 or 1 "
                          "MTP layer and ernie45 builds at most one")


# ---- presets (values: ../shared/spec/ernie45-architecture.md section 1) ---------------------
_COMMON = dict(vocab_size=103424, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
               hidden_act="silu", use_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               torch_dtype="bfloat16")

PRESETS: dict[str, dict[str, Any]] = {
    "ERNIE-4.5-300B-A47B": dict(
        _COMMON, model_type="ernie4_5_moe", hidden_size=8192, intermediate_size=28672, num_hidden_layers=54,
        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, moe_num_experts=64, moe_k=8,
        moe_intermediate_size=3584, moe_num_shared_experts=0, moe_layer_start_index=3, moe_layer_end_index=53,
        moe_layer_interval=1, moe_use_aux_free=True, moe_capacity=[64, 64, 64], moe_gate="topk",
        num_nextn_predict_layers=1),
    "ERNIE-4.5-21B-A3B": dict(
        _COMMON, model_type="ernie4_5_moe", hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
        num_attention_heads=20, num_key_value_heads=4, tie_word_embeddings=True, moe_num_experts=64, moe_k=6,
        moe_intermediate_size=1536, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27,
        moe_layer_interval=1, moe_use_aux_free=True, moe_capacity=[64, 64, 64], moe_gate="topk",
        num_nextn_predict_layers=1),
    "ERNIE-4.5-0.3B": dict(
        _COMMON, model_type="ernie4_5", hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
        num_attention_heads=16, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
}


def preset(name: str) -> ModelConfig:
    """A released model's config by name; case-insensitive, '-PT'/'-Base-PT' suffixes and 'baidu/' accepted."""
    key = name.strip().split("/")[-1].upper()
    for suffix in ("-BASE-PT", "-PT", "-BASE", "-PADDLE"):
        key = key.removesuffix(suffix)
    for pname, raw in {**PRESETS, **MINIATURES}.items():
        if pname.upper() == key:
            return ModelConfig.from_dict(raw)
    raise ConfigError(f"unknown model {name!r}: give a checkpoint directory or one of "
                      f"{', '.join([*PRESETS, *MINIATURES])}")


# The small trained model shipped inside the package (README, "The embedded default model").
DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default_model"


def resolve_model_dir(path: str | Path | None) -> Path:
    """`path`, or the default model shipped inside the package when no path is given (torch-free)."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no --model given and this installation has no embedded default model "
                                f"({DEFAULT_MODEL_DIR} is missing); pass --model DIR")
    return DEFAULT_MODEL_DIR


def resolve_config(name_or_dir: str | Path) -> ModelConfig:
    """A preset name or a checkpoint directory / config.json path -> ModelConfig."""
    path = Path(name_or_dir)
    if path.exists():
        return ModelConfig.from_file(path)
    return preset(str(name_or_dir))


# A miniature of ERNIE-4.5-300B-A47B for demos and tests when no real checkpoint is at hand: the same
# structure (leading dense layers, 64 experts with 8 active, no shared experts, GQA groups of 8, untied
# head, one MTP layer), every width scaled down. Not a released model.
MINIATURES: dict[str, dict[str, Any]] = {
    "mini-300B-A47B": dict(
        PRESETS["ERNIE-4.5-300B-A47B"], vocab_size=1024, hidden_size=128, intermediate_size=448,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=1, head_dim=16, moe_intermediate_size=56,
        moe_layer_start_index=2, moe_layer_end_index=5, max_position_embeddings=4096, torch_dtype="float32"),
    # The speed benchmark's "medium" model (shared/spec/field-notes.md): the 21B-A3B structure (shared
    # experts, top-6 of 64, tied head, first layer dense) at 516.9 M params / 197.6 M active, real vocab.
    "bench-medium": dict(
        PRESETS["ERNIE-4.5-21B-A3B"], hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=2, head_dim=128, moe_intermediate_size=256,
        moe_layer_start_index=1, moe_layer_end_index=7, num_nextn_predict_layers=0, torch_dtype="float32"),
}
