"""Live feeds (/v1/feeds): an admin key registers and removes them; any key lists and inspects those it may see.

The registry is in Redis (actors.feeds); FeedService's supervisor starts and stops the readers. A reader key sees a
feed's errors as its readers do ("source unreachable"); the cause and the failure timings are for admins only."""
import ray
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from deploy.api.deps import ScopedRoute, ServiceContext, admin_key, reader_key, require_named_source, service
from deploy.api.errors import error_responses
from deploy.auth import Caller, require_sources
from pipeline.video.protocols import redact_url
from pipeline.video.stream import DETAIL_FIELDS

router = APIRouter(route_class=ScopedRoute)
STATUS_TIMEOUT_S = 5.0


class FeedCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{"url": "rtsp://192.168.1.20:554/stream1",
                                                               "name": "Lobby", "id": "lobby"}]})

    url: str = Field(description="rtsp://, http(s)://, udp://, srt://...; or a local file under file_roots")
    name: str | None = None
    fps: float | None = Field(None, allow_inf_nan=False)
    max_pixels: int | None = None
    id: str | None = Field(None, description="feed id (= source id); default: a random 12-character id")
    record: bool = Field(True, description="record the feed for clips (when the service records at all)")


def public_feed(record: dict) -> dict:
    """A registry record as the API shows it: credentials in the URL redacted."""
    return {**record, "url": redact_url(record["url"])}


def status_for(caller: Caller, status: dict) -> dict:
    """A reader's status as `caller` may see it: without the cause of failures and their timings (which tell a
    closed port from a filtered one) unless an admin asks."""
    return status if caller.is_admin else {k: v for k, v in status.items() if k not in DETAIL_FIELDS}


@router.post("/v1/feeds", status_code=201, responses=error_responses(408, 409, 413, 422, 503))
def create_feed(body: FeedCreate, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    from deploy.capacity import check_reader_capacity
    from pipeline.feeds import add_feed, list_feeds

    require_named_source(caller, body.id, "give the feed an id among them")
    settings = context.settings
    try:
        check_reader_capacity(settings, len(list_feeds(context.redis)), ray.cluster_resources().get("CPU", 0.0))
    except ValueError as e:           # the registry is full for this cluster: a conflict, not a passing overload
        raise HTTPException(409, str(e)) from None
    schemes = list(settings.feed_schemes) + (["file"] if settings.file_roots else [])
    try:
        record = add_feed(context.redis, body.url, body.name, body.fps, body.max_pixels, feed_id=body.id,
                          record=body.record, schemes=schemes, file_roots=list(settings.file_roots), settings=settings)
    except ValueError as e:
        status = 409 if "already exists" in str(e) else 422
        raise HTTPException(status, str(e)) from None
    context.nudge_feeds()
    return public_feed(record)


@router.get("/v1/feeds", responses=error_responses(503))
def list_feeds(caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    from pipeline.feeds import list_feeds

    return {"feeds": [public_feed(f) for f in list_feeds(context.redis) if caller.may_see(f["id"])]}


@router.get("/v1/feeds/{feed_id}", responses=error_responses(404, 422, 503))
def get_feed(feed_id: str, caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    from actors.feeds import NAMESPACE, reader_name
    from pipeline.feeds import get_feed

    require_sources(caller, [feed_id])
    try:
        record = get_feed(context.redis, feed_id)
    except KeyError:
        raise HTTPException(404, f"no feed with id {feed_id!r}") from None
    try:
        reader = ray.get_actor(reader_name(feed_id), namespace=NAMESPACE)
        status = ray.get(reader.status.remote(), timeout=STATUS_TIMEOUT_S)
        status = {"state": "running" if status.get("running") else "stopped", **status}
    except ValueError:               # no reader yet: the supervisor starts it on its next round
        status = {"state": "pending", "running": False, "connected": False}
    except Exception as e:  # noqa: BLE001 - a dead or stuck reader is a status, not a server error
        status = {"state": "unreachable", "running": False, "connected": False,
                  "error": f"{type(e).__name__}: {e}"[:500]}
    return {**public_feed(record), "status": status_for(caller, status)}


@router.delete("/v1/feeds/{feed_id}", responses=error_responses(404, 422, 503))
def delete_feed(feed_id: str, caller: Caller = Depends(admin_key), context: ServiceContext = Depends(service)):
    from pipeline.feeds import remove_feed

    require_sources(caller, [feed_id])
    try:
        record = remove_feed(context.redis, feed_id)
    except KeyError:
        raise HTTPException(404, f"no feed with id {feed_id!r}") from None
    context.nudge_feeds()
    return {"deleted": public_feed(record)}
