"""One indexed segment (/v1/segments/{segment_id}): its thumbnail and its metadata. Any key; the segment's source is
its scope (read from the id), and a segment of a source the key may not see is a 404 like an unknown one, so a
limited key cannot tell which segments other sources hold."""
import hashlib

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from deploy.api.deps import ScopedRoute, ServiceContext, reader_key, service
from deploy.api.errors import error_responses
from deploy.auth import Caller
from pipeline.captioning import with_captions
from pipeline.captions import CaptionStore
from pipeline.index_files import escape_source
from pipeline.records import source_of
from pipeline.thumbnails import ThumbnailStore
from pipeline.times import with_times

router = APIRouter(route_class=ScopedRoute)

# A thumbnail's bytes never change under its URL (one per segment id, written once), so clients keep it for a year;
# private: it was fetched with a key, and no shared cache may hand it to another caller.
THUMBNAIL_CACHE_CONTROL = "private, max-age=31536000, immutable"


def visible_source(caller: Caller, segment_id: str, not_found: str) -> str:
    """The segment's source id; 404 (the same answer as for a segment that does not exist) when the key may not see
    it, 422 for an id that is not a segment id."""
    try:
        source_id = source_of(segment_id)
        escape_source(source_id)                  # a source id no folder can hold (too long) is no segment's
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    if not caller.may_see(source_id):
        raise HTTPException(404, not_found)
    return source_id


# declared before the metadata route: {segment_id:path} there would also match ".../thumbnail"
@router.get("/v1/segments/{segment_id:path}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the segment's JPEG thumbnail"},
                       304: {"description": "the client's copy (If-None-Match) is current"},
                       **error_responses(404, 422, 503)})
def segment_thumbnail(segment_id: str, request: Request, caller: Caller = Depends(reader_key),
                      context: ServiceContext = Depends(service)):
    not_found = (f"no thumbnail for segment {segment_id!r} (not indexed, or indexed before thumbnails were written: "
                 "`tubescope index --thumbnails PATHS` fills them)")
    visible_source(caller, segment_id, not_found)
    try:
        jpeg = ThumbnailStore(context.index).read(segment_id)
    except KeyError:
        raise HTTPException(404, not_found) from None
    headers = {"ETag": f'"{hashlib.sha1(jpeg).hexdigest()[:20]}"', "Cache-Control": THUMBNAIL_CACHE_CONTROL}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(jpeg, media_type="image/jpeg", headers=headers)


@router.get("/v1/segments/{segment_id:path}", responses=error_responses(404, 422, 503))
def get_segment(segment_id: str, caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    """The segment's metadata: times, grid, model, caption (with captions on) and thumbnail_url when it has one."""
    not_found = f"no indexed segment {segment_id!r}"
    source_id = visible_source(caller, segment_id, not_found)
    # a segment stored under several checkpoints: the one the service runs first
    rows = sorted((r for r in context.index.list(source_id) if r["segment_id"] == segment_id),
                  key=lambda r: r["model_id"] != context.caption_model_id)
    if not rows:
        raise HTTPException(404, not_found)
    if context.settings.captions:
        rows = with_captions(CaptionStore(context.index), rows, context.caption_model_id, context.settings.index_root)
    [row] = ThumbnailStore(context.index).with_urls(rows[:1])
    return with_times({**row, "grid_thw": list(row["grid_thw"])}, context.settings.time_zone)
