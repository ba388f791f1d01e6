"""nanoseek: DeepSeek's LLM system in miniature -- readable, tested against transformers, runnable on a CPU."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig, preset
from .model import LatentCache, Transformer

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "LatentCache", "ModelConfig", "Transformer", "load_model",
           "preset", "save_model"]
