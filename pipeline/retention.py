"""Retention: the index keeps to `retention_max_age_hours` and `retention_max_bytes`, whatever writes to it.

`sweep_retention` applies the settings once (every archive job ends with it); `RetentionSchedule` applies them every
`retention_sweep_seconds` in a thread of the service, so footage ages out with or without live feeds. Recordings
(pipeline/recordings.py) follow the same settings: the same age, and one byte budget for segments and recordings
together, oldest first.
"""
from __future__ import annotations

import logging
import threading
import time

from pipeline import metrics

log = logging.getLogger(__name__)


def sweep_retention(index, settings) -> int:
    """Delete what the retention settings no longer keep; returns segments deleted (0 when none are set).
    Deleted segments take their captions with them (the index) and leave the retrieval index (prune_retrieval).
    Recordings go by the same rules (their own count is logged)."""
    from pipeline.recordings import sweep_recordings

    metrics.configure(settings)
    if settings.retention_max_age_hours is None and settings.retention_max_bytes is None:
        return 0
    max_age = None if settings.retention_max_age_hours is None else settings.retention_max_age_hours * 3600.0
    now = time.time()
    index_budget, doomed_recordings = share_bytes(index, settings, max_age, now)
    deleted = index.sweep(max_age_s=max_age, max_bytes=index_budget, now=now)
    removed = sweep_recordings(settings, doomed_recordings, max_age, now)
    if removed:
        log.info("retention deleted %d recording files", removed)
    if deleted and settings.captions:
        from pipeline.captioning import prune_retrieval
        from pipeline.retrieval import RetrievalIndex, RetrievalUnavailable

        try:
            prune_retrieval(index, RetrievalIndex(settings.index_root))
        except RetrievalUnavailable:
            pass                    # nothing to prune: a rebuild derives the table from what is left
    return deleted


def share_bytes(index, settings, max_age_s: float | None, now: float) -> tuple[int | None, list]:
    """One byte budget for segments and recordings: walk both oldest first (segments by when they were indexed,
    recordings by when they end) and drop until the rest fits. Returns the index's share of the budget (its
    sweep then drops exactly its oldest) and the recordings to delete."""
    from pipeline.recordings import all_recordings

    if settings.retention_max_bytes is None:
        return None, []
    oldest = now - max_age_s if max_age_s is not None else float("-inf")
    items = [(r["indexed_at"], r["bytes"], None) for s in index.sources() for r in index.list(s["source_id"])
             if r["indexed_at"] >= oldest]
    items += [(f.end, f.bytes, f) for f in all_recordings(settings) if f.end >= oldest]
    index_bytes = sum(size for _, size, f in items if f is None)
    total, doomed = sum(size for _, size, _ in items), []
    for _, size, f in sorted(items, key=lambda x: x[0]):
        if total <= settings.retention_max_bytes:
            break
        total -= size
        if f is None:
            index_bytes -= size
        else:
            doomed.append(f)
    return index_bytes, doomed


class RetentionSchedule:
    """Sweeps at start, then every `settings.retention_sweep_seconds`, until stop(). A failed sweep is logged and
    shown in status(); the next one runs as planned."""

    def __init__(self, index, settings):
        self.index, self.settings = index, settings
        self.interval_s = float(settings.retention_sweep_seconds)
        self.swept = 0
        self.sweeps = 0
        self.last_error = ""
        self.last_sweep: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RetentionSchedule":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def sweep_now(self) -> int:
        try:
            deleted = sweep_retention(self.index, self.settings)
        except Exception as e:  # noqa: BLE001 - an unreachable volume must not end the schedule
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("retention sweep failed")
            return 0
        self.swept += deleted
        self.sweeps += 1
        self.last_error = ""
        self.last_sweep = time.time()
        return deleted

    def status(self) -> dict:
        return {"running": bool(self._thread and self._thread.is_alive()), "interval_s": self.interval_s,
                "sweeps": self.sweeps, "swept": self.swept, "last_sweep": self.last_sweep,
                "last_error": self.last_error}

    def _loop(self) -> None:
        while True:
            self.sweep_now()
            if self._stop.wait(self.interval_s):
                return
