"""Service health: /healthz answers without a key (probes) and is 503 while Redis is unreachable or the index is
missing or takes no writes; /metrics needs an admin key for every source unless api_metrics_public; /v1/status needs
an admin key and shows a limited one only its own sources."""
import asyncio
from typing import Any

import redis as redis_lib
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deploy.api.deps import ScopedRoute, ServiceContext, admin_key, metrics_key, public, service
from deploy.api.errors import error_responses
from deploy.auth import Caller
from pipeline import metrics
from pipeline.index_files import IndexUnavailable
from pipeline.index_health import check_writable

router = APIRouter(route_class=ScopedRoute)
DEGRADED = {503: {"description": "Redis or the index is unavailable: {status: degraded, redis, index, error}"}}


@router.get("/healthz", dependencies=[Depends(public)], responses=DEGRADED)
def healthz(context: ServiceContext = Depends(service)):
    try:
        context.redis.ping()
    except redis_lib.RedisError as e:
        return JSONResponse({"status": "degraded", "redis": False, "error": str(e)}, status_code=503)
    try:
        context.index.check_root()
    except IndexUnavailable as e:
        return JSONResponse({"status": "degraded", "redis": True, "index": False, "error": str(e)},
                            status_code=503)
    try:
        check_writable(context.index)       # a read-only or full volume still reads fine: try a write
    except OSError as e:
        return JSONResponse({"status": "degraded", "redis": True, "index": True, "index_writable": False,
                             "error": str(e)}, status_code=503)
    return {"status": "ok", "redis": True, "index": True, "index_writable": True}


# Response (no media type of its own), so the error statuses are documented as JSON and only the 200 as text
@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_key)],
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
def metrics_text():
    """This node's tubescope_* metrics (from every actor and replica on it, via Ray's metrics export) followed by
    this replica's process metrics. A Prometheus server should scrape Ray's export port on every node instead
    (dashboards/prometheus.yml); this endpoint is for a quick look without one."""
    return PlainTextResponse(metrics.node_exposition() + generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/status", responses=error_responses(503))
async def status(caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    if caller.sources is not None:            # a limited admin: its own sources and feeds, nothing service-wide
        return await _limited_status(context, caller)
    out: dict[str, Any] = {"index": await asyncio.to_thread(context.index.stats)}
    out["decoder"] = await context.decoder.stats.remote()
    if context.retention is not None:
        out["retention"] = await context.retention.status.remote()
    if context.captions is not None:
        out["captions"] = await context.captions.status.remote()
    if context.alerts is not None:
        out["alerts"] = await context.alerts.status.remote()
    if context.feed_service is not None:
        out.update(await context.feed_service.status.remote())
    return out


async def _limited_status(context: ServiceContext, caller: Caller) -> dict:
    sources = [s for s in await asyncio.to_thread(context.index.sources) if caller.may_see(s["source_id"])]
    out: dict[str, Any] = {"index": {"sources": len(sources), "segments": sum(s["segments"] for s in sources),
                                     "bytes": sum(s["bytes"] for s in sources)}}
    if context.feed_service is not None:
        feeds = (await context.feed_service.status.remote()).get("feeds", {})
        out["feeds"] = {fid: st for fid, st in feeds.items() if caller.may_see(fid)}
    return out
