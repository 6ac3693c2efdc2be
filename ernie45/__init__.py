"""ernie45: run Baidu's ERNIE 4.5 language models (300B-A47B, 21B-A3B, 0.3B) faithfully."""

from .config import ConfigError, ModelConfig, preset, resolve_config
from .generate import GenerationConfig, generate, generate_stream
from .model import Ernie45ForCausalLM, build_model
from .safetensors_mmap import CheckpointError
from .weights import load_model, save_checkpoint

__all__ = ["CheckpointError", "ConfigError", "Ernie45ForCausalLM", "GenerationConfig", "ModelConfig", "build_model",
           "generate", "generate_stream", "load_model", "preset", "resolve_config", "save_checkpoint"]
__version__ = "0.1.0"
