"""The alert follower: every new live segment, scored against the standing alerts of its source (docs/architecture.md,
"Standing alerts").

It follows the `tubescope:segments` stream (XREAD from a cursor kept in Redis, so a restarted service goes on where
the last one stopped; entries older than RESUME_MAX_AGE_S are skipped, since a hit that late is no alert). Each
round takes what arrived (up to READ_COUNT entries), keeps the live segments of sources some alert watches, and
scores them all in one call: every segment against its own alerts' queries, batched across alerts and feeds by the
yes/no scorer (deploy.search.SegmentRanker.score_questions, in the Decoder deployment). A score >= the alert's
threshold, past its cooldown on that source, is a hit: an entry in `tubescope:alerts`, a count in
tubescope_alert_hits_total, and a webhook POST queued for the sender's threads (deploy.webhooks).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from deploy.alerts import AlertStore, make_hit
from deploy.webhooks import WebhookSender
from pipeline import metrics
from pipeline.events import ALERTS_STREAM, ERRORS_STREAM, SEGMENTS_STREAM

log = logging.getLogger(__name__)

CURSOR_KEY = "tubescope:alerts:cursor"
RESUME_MAX_AGE_S = 300.0
READ_COUNT = 64
RETRY_S = 1.0

Scorer = Callable[[list[dict], list[list[str]]], list]      # (segments, queries per segment) -> scores or None each


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def segment_of(fields: dict) -> dict:
    """The parts of a `tubescope:segments` entry the follower uses, or None for an archive segment."""
    f = {_text(k): _text(v) for k, v in fields.items()}
    if f.get("live") != "1":
        return None
    return {"segment_id": f["segment_id"], "source_id": f["source_id"], "t0": float(f["t0"]), "t1": float(f["t1"])}


class AlertFollower:
    def __init__(self, redis, store: AlertStore, score: Scorer, events, webhooks: WebhookSender | None = None,
                 caption: Callable[[dict], str | None] | None = None, block_ms: int = 1000):
        self.redis, self.store, self.score, self.events = redis, store, score, events
        self.webhooks, self.caption, self.block_ms = webhooks, caption, int(block_ms)
        self.cursor: str | None = None
        self.counts = {"segments": 0, "scored": 0, "hits": 0, "cooled": 0, "failed": 0, "stale": 0}
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one round ---------------------------------------------------------------------------------------------
    def run_round(self) -> list[dict]:
        """Read what arrived on the segments stream (waiting up to block_ms), score it, return the hits."""
        if self.cursor is None:
            stored = self.redis.get(CURSOR_KEY)
            newest = None if stored else self.redis.xrevrange(SEGMENTS_STREAM, count=1)
            self.cursor = _text(stored) if stored else (_text(newest[0][0]) if newest else "0-0")
        reply = self.redis.xread({SEGMENTS_STREAM: self.cursor}, count=READ_COUNT, block=self.block_ms)
        entries = reply[0][1] if reply else []
        if not entries:
            return []
        oldest_ms = (time.time() - RESUME_MAX_AGE_S) * 1000
        segments = []
        for entry_id, fields in entries:
            segment = segment_of(fields)
            if segment is None:
                continue
            if int(_text(entry_id).split("-")[0]) < oldest_ms:
                self.counts["stale"] += 1
                continue
            segments.append(segment)
        hits = self.score_segments(segments)
        self.cursor = _text(entries[-1][0])
        self.redis.set(CURSOR_KEY, self.cursor)
        return hits

    def score_segments(self, segments: list[dict]) -> list[dict]:
        """Score live segments against the alerts of their sources; record and return the hits."""
        self.counts["segments"] += len(segments)
        alerts = self.store.all() if segments else []
        work = [(s, [a for a in alerts if s["source_id"] in a.sources]) for s in segments]
        work = [(s, watching) for s, watching in work if watching]
        if not work:
            return []
        started = time.perf_counter()
        try:
            scores = self.score([s for s, _ in work], [[a.query for a in watching] for _, watching in work])
        except Exception as e:  # noqa: BLE001 - the decoder gone or overloaded: report the segments, go on
            self._failed(len(work), f"{type(e).__name__}: {e}")
            return []
        metrics.record_alert_scoring(time.perf_counter() - started)
        hits = []
        for (segment, watching), row in zip(work, scores):
            if row is None:                     # deleted since it was announced
                continue
            self.counts["scored"] += len(row)
            for alert, score in zip(watching, row):
                if score < alert.threshold:
                    continue
                if not self.store.claim_hit(alert, segment["source_id"], segment["t0"]):
                    self.counts["cooled"] += 1
                    continue
                hit = make_hit(alert, segment, score, self.caption(segment) if self.caption else None)
                self.events.emit(ALERTS_STREAM, hit)
                metrics.record_alert_hit(alert.alert_id)
                if alert.webhook and self.webhooks is not None:
                    self.webhooks.send(alert.webhook, hit)
                hits.append(hit)
        self.counts["hits"] += len(hits)
        return hits

    def _failed(self, n: int, error: str) -> None:
        self.counts["failed"] += n
        self.last_error = error[:500]
        log.warning("alert scoring of %d segments failed: %s", n, error)
        self.events.emit(ERRORS_STREAM, {"kind": "alert_scoring_failed", "stage": "alerts", "count": str(n),
                                         "error": error[:500]})

    # ---- as a service ------------------------------------------------------------------------------------------
    def start(self) -> "AlertFollower":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="alerts", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.webhooks is not None:
            self.webhooks.stop()

    def status(self) -> dict:
        out = {"running": bool(self._thread and self._thread.is_alive()), **self.counts,
               "last_error": self.last_error}
        if self.webhooks is not None:
            out["webhooks"] = self.webhooks.stats()
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_round()
            except Exception as e:  # noqa: BLE001 - Redis away: wait and read on from the same cursor
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("alert follower round failed: %s", self.last_error)
                self._stop.wait(RETRY_S)


def decoder_scorer(decoder, timeout_s: float = 120.0) -> Scorer:
    """Scores through the Decoder deployment's handle (its model, no second copy in memory)."""
    def score(segments: list[dict], queries: list[list[str]]) -> list:
        out = decoder.score_segments.remote({"segments": segments, "queries": queries}).result(timeout_s=timeout_s)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out["result"]
    return score


def alert_follower(settings, redis, score: Scorer, events, model_path: str | None = None) -> AlertFollower:
    """An AlertFollower over the service's Redis, with the webhook sender and caption lookup its settings give."""
    from pipeline.captions import CaptionStore
    from pipeline.checkpoints import model_id
    from pipeline.feeds import host_policy
    from pipeline.index import SegmentIndex

    caption = None
    if settings.captions:
        store = CaptionStore(SegmentIndex(settings.index_root, create=False))
        captioner = model_id(settings.caption_model_path or model_path or settings.resolved_model_path())

        def caption_of(segment: dict) -> str | None:
            try:
                return store.texts([segment], captioner).get(segment["segment_id"])
            except OSError:                 # the index volume away: the hit goes out without its caption
                return None
        caption = caption_of
    webhooks = WebhookSender(lambda: host_policy(settings), timeout_s=settings.alert_webhook_timeout_seconds,
                             attempts=settings.alert_webhook_attempts, queue_max=settings.alert_webhook_queue)
    return AlertFollower(redis, AlertStore(redis), score, events, webhooks, caption)
