"""nanoseek: DeepSeek's LLM system in miniature -- readable, tested against transformers, runnable on a CPU.

The public names load lazily, so commands that need no model (curate, tokenize, ...) start
without importing torch.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "CheckpointError": "checkpoint", "load_model": "checkpoint", "save_model": "checkpoint",
    "ConfigError": "config", "ModelConfig": "config", "preset": "config",
    "LatentCache": "model", "Transformer": "model",
    "Tokenizer": "tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
