"""tubescope's Qwen2-VL in plain PyTorch (imports only torch, safetensors, tokenizers, numpy, PIL).

Public names resolve lazily (PEP 562), so `import qwen2vl.tokenizer` does not build the model stack.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Qwen2VLConfig": "config", "VisionConfig": "config", "TextConfig": "config",
    "Qwen2VL": "model", "Qwen2VLOutput": "model", "GenerationDefaults": "model",
    "KVCache": "text",
    "get_rope_index": "rope",
    "TokenIteratorStreamer": "generate",
    "Tokenizer": "tokenizer", "Processor": "processor",
    "load_pretrained": "checkpoint", "load_vision": "checkpoint", "write_tiny_checkpoint": "checkpoint",
    "tiny_config": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
