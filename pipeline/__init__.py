"""Ingestion: decoding at 2 fps, tubes, packing, the footage index, events. Public names resolve lazily."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Settings": "settings", "load_settings": "settings",
    "Segment": "records", "Tubes": "records", "IndexedSegment": "records",
    "SegmentIndex": "index", "EventSink": "events",
    "index_archive": "archive", "JobReport": "archive",
    "pack_tubes": "packing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
