"""Standing alerts: their records, checks and Redis store, and the hits they produce (docs/architecture.md,
"Standing alerts").

An alert is one JSON string per alert (`tubescope:alert:<id>`) plus the set of ids (`tubescope:alert-ids`), so a
restarted service, or another replica, reads the same alerts. The last hit of an alert on each source
(`tubescope:alert:<id>:last`, source -> segment start) carries the cooldown across restarts. Hits go to the stream
`tubescope:alerts` (pipeline.events.ALERTS_STREAM); `hit_from_entry` reads one back.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass
from urllib.parse import quote, urlsplit

from deploy.footage import check_question
from pipeline.video.hosts import HostPolicy, check_host
from pipeline.video.protocols import redact_url

ALERT_KEY = "tubescope:alert:{}"
LAST_HIT_KEY = "tubescope:alert:{}:last"
IDS_KEY = "tubescope:alert-ids"
HIT_NUMBERS = ("t0", "t1", "score", "at")       # hit fields that are numbers (the stream holds text)


@dataclass(frozen=True)
class Alert:
    alert_id: str
    query: str
    sources: list[str]
    threshold: float
    cooldown_seconds: float
    webhook: str | None          # as given, credentials included: only the webhook sender reads it
    created_at: float

    def public(self) -> dict:
        """The alert as the API shows it: the webhook's credentials redacted."""
        return {**asdict(self), "webhook": redact_url(self.webhook)}

    @classmethod
    def from_json(cls, text: str | bytes) -> "Alert":
        return cls(**json.loads(text))


def thumbnail_url(segment_id: str) -> str:
    """Where a segment's thumbnail is served (GET /v1/segments/{id}/thumbnail), the id URL-quoted."""
    return f"/v1/segments/{quote(segment_id, safe='')}/thumbnail"


# ---- checks ----------------------------------------------------------------------------------------------------------
def check_query(query: str, max_chars: int) -> str:
    """The query as stored; ValueError when empty, over max_chars, or holding a special token of the model."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if len(query) > max_chars:
        raise ValueError(f"query has {len(query)} characters; the limit is {max_chars} (api_max_alert_query_chars)")
    return check_question(query.strip())


def check_webhook(url: str, policy: HostPolicy) -> str:
    """A webhook is an http(s) URL whose host the feed rule allows (pipeline/video/hosts.py): the service POSTs to
    it, so it must not reach the service's own ports, loopback or the metadata service. ValueError says why not;
    the message shows the URL redacted."""
    shown = redact_url(url) if isinstance(url, str) else url
    if not isinstance(url, str) or any(ord(c) < 33 for c in url):
        raise ValueError(f"webhook must be an http(s) URL without spaces or control characters, got {shown!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook must be an http:// or https:// URL with a host, got {shown!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"webhook {shown!r} has a bad port") from None
    try:
        check_host(url, policy)
    except ValueError as e:         # the feed rule's words ("feed host ... is loopback"), said of a webhook
        raise ValueError(f"webhook refused: {e}".replace("feed url", "url").replace("feed host", "host")) from None
    return url


def new_alert(query: str, sources: list[str], threshold: float, cooldown_seconds: float, webhook: str | None,
              *, max_query_chars: int, policy: HostPolicy) -> Alert:
    """A checked Alert with a fresh id (sources already resolved and allowed by the caller)."""
    if not sources or not all(isinstance(s, str) and s for s in sources):
        raise ValueError("sources must be a non-empty list of source ids")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if isinstance(cooldown_seconds, bool) or not isinstance(cooldown_seconds, (int, float)) \
            or not math.isfinite(cooldown_seconds) or cooldown_seconds < 0:
        raise ValueError(f"cooldown_seconds must be a finite number >= 0, got {cooldown_seconds!r}")
    return Alert(alert_id=uuid.uuid4().hex[:12], query=check_query(query, max_query_chars),
                 sources=list(dict.fromkeys(sources)), threshold=float(threshold),
                 cooldown_seconds=float(cooldown_seconds),
                 webhook=None if webhook is None else check_webhook(webhook, policy), created_at=time.time())


# ---- the store -------------------------------------------------------------------------------------------------------
class AlertStore:
    """Alerts in Redis (a redis.Redis client). Errors of Redis itself propagate (the API turns an outage into 503)."""

    def __init__(self, redis):
        self.redis = redis

    def add(self, alert: Alert, max_count: int) -> Alert:
        """Store a new alert; ValueError when max_count alerts already stand (each costs scoring on every segment)."""
        if self.redis.scard(IDS_KEY) >= max_count:
            raise ValueError(f"{max_count} alerts already stand (alert_max_count): delete one first")
        with self.redis.pipeline(transaction=True) as tx:
            tx.set(ALERT_KEY.format(alert.alert_id), json.dumps(asdict(alert)))
            tx.sadd(IDS_KEY, alert.alert_id)
            tx.execute()
        return alert

    def all(self) -> list[Alert]:
        """Every alert, oldest first (ids whose record is gone are skipped)."""
        ids = sorted(i.decode() if isinstance(i, bytes) else i for i in self.redis.smembers(IDS_KEY))
        if not ids:
            return []
        texts = self.redis.mget([ALERT_KEY.format(i) for i in ids])
        return sorted((Alert.from_json(t) for t in texts if t is not None), key=lambda a: (a.created_at, a.alert_id))

    def get(self, alert_id: str) -> Alert:
        text = self.redis.get(ALERT_KEY.format(alert_id))
        if text is None:
            raise KeyError(alert_id)
        return Alert.from_json(text)

    def delete(self, alert_id: str) -> Alert:
        alert = self.get(alert_id)
        with self.redis.pipeline(transaction=True) as tx:
            tx.delete(ALERT_KEY.format(alert_id), LAST_HIT_KEY.format(alert_id))
            tx.srem(IDS_KEY, alert_id)
            tx.execute()
        return alert

    def claim_hit(self, alert: Alert, source_id: str, t0: float) -> bool:
        """Whether a hit of `alert` on `source_id` at segment start t0 is past the cooldown of its last hit there;
        if so it becomes the last hit. (One follower claims hits, so read-then-write does not race.)"""
        key = LAST_HIT_KEY.format(alert.alert_id)
        last = self.redis.hget(key, source_id)
        if last is not None and abs(t0 - float(last)) < alert.cooldown_seconds:
            return False
        self.redis.hset(key, source_id, repr(float(t0)))
        return True


# ---- hits ------------------------------------------------------------------------------------------------------------
def make_hit(alert: Alert, segment: dict, score: float, caption: str | None, at: float | None = None) -> dict:
    """One hit: {alert_id, query, source_id, segment_id, t0, t1, score, caption, thumbnail_url, at}."""
    return {"alert_id": alert.alert_id, "query": alert.query, "source_id": segment["source_id"],
            "segment_id": segment["segment_id"], "t0": float(segment["t0"]), "t1": float(segment["t1"]),
            "score": float(score), "caption": caption or "", "thumbnail_url": thumbnail_url(segment["segment_id"]),
            "at": time.time() if at is None else at}


def hit_from_entry(fields: dict) -> dict:
    """A hit read back from its `tubescope:alerts` entry (field names and values as bytes or text)."""
    text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}
    return {k: float(v) if k in HIT_NUMBERS else v for k, v in text.items()}
