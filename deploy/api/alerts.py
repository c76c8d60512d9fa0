"""Standing alerts (/v1/alerts): an admin key makes and deletes them; any key lists those whose sources it may all
see, and reads their hits (recent ones, or as server-sent events while they happen). docs/architecture.md,
"Standing alerts"."""
import asyncio
import time

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from deploy.alerts import Alert, AlertStore, hit_from_entry, new_alert
from deploy.api.ask import sse
from deploy.api.deps import (ScopedRoute, ServiceContext, admin_key, check_length, reader_key,
                             resolve_names, service)
from deploy.api.errors import error_responses
from deploy.auth import Caller
from pipeline.events import ALERTS_STREAM

router = APIRouter(route_class=ScopedRoute)
HITS_SCAN_MAX = 10_000          # stream entries a hits listing reads at most to fill its page
STREAM_BLOCK_MS = 1_000         # an SSE reader waits this long for a hit, then sends a keep-alive comment


class AlertCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{"query": "a person at the door", "sources": ["lobby"],
                                                               "threshold": 2.0, "cooldown_seconds": 60}]})

    query: str = Field(description="what to watch for, as a search query")
    sources: list[str] = Field(min_length=1, description="source ids or feed names")
    threshold: float | None = Field(None, allow_inf_nan=False,
                                    description="score (logit yes - logit no) of a hit; default alert_threshold")
    cooldown_seconds: float | None = Field(None, ge=0, allow_inf_nan=False,
                                           description="no repeat hit on a source within this; default "
                                                       "alert_cooldown_seconds")
    webhook: str | None = Field(None, description="http(s) URL that each hit is POSTed to as JSON")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sees(caller: Caller, alert: Alert) -> bool:
    return all(caller.may_see(s) for s in alert.sources)


def _visible_alert(context: ServiceContext, caller: Caller, alert_id: str) -> Alert:
    """The alert, or 404 when there is none or the key may not see all its sources (its existence is not told)."""
    try:
        alert = AlertStore(context.redis).get(alert_id)
    except KeyError:
        alert = None
    if alert is None or not _sees(caller, alert):
        raise HTTPException(404, f"no alert with id {alert_id!r}")
    return alert


@router.post("/v1/alerts", status_code=201, responses=error_responses(403, 408, 409, 413, 422, 503))
def create_alert(body: AlertCreate, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    from pipeline.feeds import host_policy, list_feeds

    s = context.settings
    if not body.query.strip():
        raise HTTPException(422, "query must not be empty")
    check_length("query", body.query, s.api_max_alert_query_chars, "api_max_alert_query_chars")
    if not all(body.sources):
        raise HTTPException(422, "sources must be a non-empty list of source ids")
    sources = resolve_names(context, caller, body.sources)
    known = {r["source_id"] for r in context.index.sources()} | {f["id"] for f in list_feeds(context.redis)}
    unknown = [x for x in sources if x not in known]
    if unknown:
        raise HTTPException(422, f"unknown sources {unknown}: neither indexed nor a registered feed")
    try:
        alert = new_alert(body.query, sources, s.alert_threshold if body.threshold is None else body.threshold,
                          s.alert_cooldown_seconds if body.cooldown_seconds is None else body.cooldown_seconds,
                          body.webhook, max_query_chars=s.api_max_alert_query_chars, policy=host_policy(s))
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    try:
        AlertStore(context.redis).add(alert, s.alert_max_count)
    except ValueError as e:
        raise HTTPException(409, str(e)) from None
    return alert.public()


@router.get("/v1/alerts", responses=error_responses(503))
def list_alerts(caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    return {"alerts": [a.public() for a in AlertStore(context.redis).all() if _sees(caller, a)]}


@router.get("/v1/alerts/hits", responses=error_responses(422, 503))
def list_hits(alert_id: str | None = None, since: str | None = None,
              limit: int = Query(50, ge=1, le=1000), caller: Caller = Depends(reader_key),
              context: ServiceContext = Depends(service)):
    """Recent hits, newest first: of one alert or all, at or after `since` (any time form of the API)."""
    from pipeline.times import parse_time

    try:
        start = parse_time(since, "since", tz=context.settings.time_zone, now=time.time())
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    lowest = "-" if start is None else f"{max(0, int(start * 1000))}-0"
    hits, highest, scanned = [], "+", 0
    while len(hits) < limit and scanned < HITS_SCAN_MAX:
        entries = context.redis.xrevrange(ALERTS_STREAM, max=highest, min=lowest, count=500)
        if not entries:
            break
        for entry_id, fields in entries:
            hit = hit_from_entry(fields)
            if (alert_id is None or hit.get("alert_id") == alert_id) and caller.may_see(hit.get("source_id", "")):
                hits.append({**hit, "id": _text(entry_id)})
        scanned += len(entries)
        highest = f"({_text(entries[-1][0])}"           # the next page: older than this one's last entry
    return {"hits": hits[:limit]}


@router.get("/v1/alerts/hits/stream", responses=error_responses(422, 503))
async def stream_hits(request: Request, alert_id: str | None = None, caller: Caller = Depends(reader_key),
                      context: ServiceContext = Depends(service)):
    """Server-sent events: a `hit` event per hit from now on that the key may see (of one alert, or all)."""
    redis = context.redis
    newest = await asyncio.to_thread(redis.xrevrange, ALERTS_STREAM, count=1)   # a Redis outage is a 503 here
    cursor = newest[0][0] if newest else "0-0"

    async def events():
        nonlocal cursor
        yield b": connected\n\n"
        while not await request.is_disconnected():
            try:
                reply = await asyncio.to_thread(redis.xread, {ALERTS_STREAM: cursor}, 100, STREAM_BLOCK_MS)
            except Exception as e:  # noqa: BLE001 - Redis went away mid-stream: say so and end
                yield sse("error", {"error": f"hits unavailable: {type(e).__name__}", "status": 503})
                return
            if not reply:
                yield f": keep-alive {time.time():.0f}\n\n".encode()
                continue
            for entry_id, fields in reply[0][1]:
                cursor = entry_id
                hit = hit_from_entry(fields)
                if (alert_id is None or hit.get("alert_id") == alert_id) and caller.may_see(hit.get("source_id", "")):
                    yield sse("hit", {**hit, "id": _text(entry_id)})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/alerts/{alert_id}", responses=error_responses(404, 422, 503))
def get_alert(alert_id: str, caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    return _visible_alert(context, caller, alert_id).public()


@router.delete("/v1/alerts/{alert_id}", responses=error_responses(404, 422, 503))
def delete_alert(alert_id: str, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    _visible_alert(context, caller, alert_id)
    try:
        return {"deleted": AlertStore(context.redis).delete(alert_id).public()}
    except KeyError:                                  # deleted meanwhile by another request
        raise HTTPException(404, f"no alert with id {alert_id!r}") from None
