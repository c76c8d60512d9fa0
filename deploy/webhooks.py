"""Alert webhooks: each hit is POSTed as JSON from worker threads, never from the thread that scores.

`WebhookSender.send` only queues (a bounded queue: when full the oldest waiting hit is dropped and counted), so a
webhook that hangs or refuses never holds up scoring or ingest; it costs its workers' time only. Each delivery
checks the URL's host again (a name may resolve elsewhere since the alert was made), never follows a redirect,
and makes up to `attempts` POSTs `timeout_s` each, waiting backoff_s, 2 * backoff_s, ... between them; a 2xx is
delivered, anything else a failure. Counts: delivered, failed, dropped (and tubescope_alert_webhook_total).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

import httpx

from pipeline import metrics
from pipeline.video.hosts import HostPolicy, check_host
from pipeline.video.protocols import redact_url

log = logging.getLogger(__name__)
WORKERS = 4            # one hanging webhook holds one worker; the others go on delivering


class WebhookSender:
    def __init__(self, policy: Callable[[], HostPolicy], *, timeout_s: float = 5.0, attempts: int = 3,
                 queue_max: int = 256, backoff_s: float = 0.5, workers: int = WORKERS):
        if attempts < 1 or queue_max < 1 or workers < 1:
            raise ValueError("attempts, queue_max and workers must be >= 1")
        self.policy, self.timeout_s, self.attempts = policy, float(timeout_s), int(attempts)
        self.queue_max, self.backoff_s, self.workers = int(queue_max), float(backoff_s), int(workers)
        self.counts = {"delivered": 0, "failed": 0, "dropped": 0}
        self.last_error = ""
        self._queue: deque[tuple[str, dict]] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def send(self, url: str, payload: dict) -> None:
        """Queue one POST of `payload` to `url`; returns at once."""
        with self._cond:
            if len(self._queue) >= self.queue_max:
                self._queue.popleft()
                self._count("dropped")
            self._queue.append((url, payload))
            self._cond.notify()
            if not self._threads:
                self._threads = [threading.Thread(target=self._work, name=f"webhook-{i}", daemon=True)
                                 for i in range(self.workers)]
                for t in self._threads:
                    t.start()

    def stats(self) -> dict:
        with self._cond:
            return {**self.counts, "queued": len(self._queue), "last_error": self.last_error}

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout_s)

    def _count(self, result: str) -> None:
        self.counts[result] += 1
        metrics.record_alert_webhook(result)

    def _work(self) -> None:
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            while not self._stop.is_set():
                with self._cond:
                    while not self._queue and not self._stop.is_set():
                        self._cond.wait()
                    if self._stop.is_set():
                        return
                    url, payload = self._queue.popleft()
                error = self._deliver(client, url, payload)
                with self._cond:
                    if error is None:
                        self._count("delivered")
                    else:
                        self._count("failed")
                        self.last_error = f"{redact_url(url)}: {error}"
                        log.warning("alert webhook failed: %s", self.last_error)

    def _deliver(self, client: httpx.Client, url: str, payload: dict) -> str | None:
        """None when delivered, else why not (after every attempt)."""
        error = ""
        for attempt in range(self.attempts):
            if attempt and self._stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                return "stopped"
            try:
                check_host(url, self.policy())
            except ValueError as e:           # refused now: retrying cannot help
                return f"refused: {e}"
            try:
                response = client.post(url, json=payload)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}".replace(url, redact_url(url))[:300]
                continue
            if 200 <= response.status_code < 300:
                return None
            error = f"HTTP {response.status_code}"
        return error
