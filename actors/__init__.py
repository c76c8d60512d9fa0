"""Ray wrappers: the vision encoder pool, live feed readers and their supervisor, the live indexer.

Public names resolve lazily so that importing one actor does not import the others (and torch) everywhere.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "VisionEncoder": "encoder",
    "FeedReader": "feeds", "FeedSupervisor": "feeds",
    "LiveIndexer": "live",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
