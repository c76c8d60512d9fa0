"""Retention: the index keeps to `retention_max_age_hours` and `retention_max_bytes`, whatever writes to it.

`sweep_retention` applies the settings once (every archive job ends with it); `RetentionSchedule` applies them every
`retention_sweep_seconds` in a thread of the service, so footage ages out with or without live feeds.
"""
from __future__ import annotations

import logging
import threading
import time

from pipeline import metrics

log = logging.getLogger(__name__)


def sweep_retention(index, settings) -> int:
    """Delete what the retention settings no longer keep; returns segments deleted (0 when none are set).
    Deleted segments take their captions with them (the index) and leave the retrieval index (prune_retrieval)."""
    metrics.configure(settings)
    if settings.retention_max_age_hours is None and settings.retention_max_bytes is None:
        return 0
    max_age = None if settings.retention_max_age_hours is None else settings.retention_max_age_hours * 3600.0
    deleted = index.sweep(max_age_s=max_age, max_bytes=settings.retention_max_bytes)
    if deleted and settings.captions:
        from pipeline.captioning import prune_retrieval
        from pipeline.retrieval import RetrievalIndex, RetrievalUnavailable

        try:
            prune_retrieval(index, RetrievalIndex(settings.index_root))
        except RetrievalUnavailable:
            pass                    # nothing to prune: a rebuild derives the table from what is left
    return deleted


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
