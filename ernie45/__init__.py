"""ernie45: run Baidu's ERNIE 4.5 language models (300B-A47B, 21B-A3B, 0.3B) faithfully.

Public names are imported lazily so that torch-free commands (`ernie45 plan`, `ernie45 info` on the
config only) start fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConfigError": "config", "ModelConfig": "config", "preset": "config", "resolve_config": "config",
    "GenerationConfig": "generation", "generate": "generation", "generate_stream": "generation",
    "Ernie45ForCausalLM": "model", "build_model": "model",
    "CheckpointError": "safetensors_mmap",
    "load_model": "weights", "save_checkpoint": "weights",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ernie45' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
