"""Indexed sources and their segments with captions (/v1/sources): any key, limited to the sources it may see."""
from fastapi import APIRouter, Depends, HTTPException

from deploy.api.deps import ScopedRoute, ServiceContext, parse_window, reader_key, resolve_names, service
from deploy.api.errors import error_responses
from deploy.auth import Caller
from pipeline.captioning import with_captions
from pipeline.captions import CaptionStore
from pipeline.thumbnails import ThumbnailStore
from pipeline.times import with_times

router = APIRouter(route_class=ScopedRoute)


@router.get("/v1/sources", responses=error_responses(503))
def list_sources(caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    return {"sources": [s for s in context.index.sources() if caller.may_see(s["source_id"])]}


@router.get("/v1/sources/{source_id:path}/segments", responses=error_responses(404, 422, 503))
def list_segments(source_id: str, start: str | None = None, end: str | None = None,
                  caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    [source_id] = resolve_names(context, caller, [source_id])
    start, end = parse_window(start, end, context.settings)
    if start is not None and end is not None and end < start:
        raise HTTPException(422, f"window end ({end}) must be >= start ({start})")
    if source_id not in {s["source_id"] for s in context.index.sources()}:
        raise HTTPException(404, f"no indexed source {source_id!r}")
    rows = context.index.list(source_id, start=start, end=end)
    if context.settings.captions:
        rows = with_captions(CaptionStore(context.index), rows, context.caption_model_id, context.settings.index_root)
    rows = ThumbnailStore(context.index).with_urls(rows)          # one folder listing, no stat per segment
    tz = context.settings.time_zone
    return {"source_id": source_id, "segments": [with_times({**r, "grid_thw": list(r["grid_thw"])}, tz) for r in rows]}
