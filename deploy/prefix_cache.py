"""LRU of video-prefix KV caches, bounded in bytes. The KV helpers that build and combine prefixes live in
pipeline/kv.py (the captioner uses them too); they are re-exported here for existing imports.

A prefix is everything of a prompt before the question text (system turn, time labels, video blocks). Its KV
depends only on the model, the segments, their positions and the dtype, so the key is built from exactly those
(never from the question). Entries are never handed out for extension: `get` returns a clone, so two requests
over the same footage each extend their own copy.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

from pipeline.kv import prefill_kv, split_cache, stack_caches, suffix_hidden
from qwen2vl.text import KVCache

__all__ = ["PrefixCache", "cache_bytes", "prefill_kv", "split_cache", "stack_caches", "suffix_hidden"]


def cache_bytes(cache: KVCache) -> int:
    """Bytes held by the keys and values of a cache (its used length, not spare capacity)."""
    total = 0
    for i in range(cache.num_layers):
        if cache.lengths[i]:
            k, v = cache.layer(i)
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


class PrefixCache:
    """Thread-safe LRU of KVCache entries whose total bytes stay <= max_bytes."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[KVCache, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejected = 0          # entries larger than the whole budget: never stored

    def get(self, key: Hashable, copy: bool = True, spare: int = 0, into: KVCache | None = None) -> KVCache | None:
        """A private clone of the cached prefix (safe to extend; room for `spare` more positions; written into the
        buffers of `into` when they are large enough), or None. Counts a hit or a miss.

        copy=False returns the stored object itself, for callers that only read it (e.g. stack_caches)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            stored = entry[0]
        return stored.clone(spare, into) if copy else stored   # entries are never mutated: cloning outside the lock is safe

    def put(self, key: Hashable, cache: KVCache) -> bool:
        """Store `cache` (the caller must not mutate it afterwards; pass a clone). False when it cannot fit."""
        size = cache_bytes(cache)
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                self.rejected += 1
                return False
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self.bytes -= old
                self.evictions += 1
            self._entries[key] = (cache, size)
            self.bytes += size
            return True

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "entries": len(self._entries), "evictions": self.evictions, "rejected": self.rejected}
