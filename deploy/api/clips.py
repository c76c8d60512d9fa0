"""Clips of a source's footage (/v1/sources/{id}/clip): any key, limited to the sources it may see.

The MP4 is made by pipeline/clips.py (packets copied from the recording or the archive file; re-encoded only with
exact=true) into a cached file, served by Starlette's FileResponse, which answers Range requests (206, 416)."""
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from deploy.api.deps import ScopedRoute, ServiceContext, parse_window, reader_key, resolve_names, service
from deploy.api.errors import error_responses
from deploy.auth import Caller

router = APIRouter(route_class=ScopedRoute)


@router.get("/v1/sources/{source_id:path}/clip", response_class=FileResponse,
            responses={200: {"content": {"video/mp4": {}}, "description": "the clip (206 for a Range)"},
                       **error_responses(404, 416, 422, 503)})
def get_clip(source_id: str, start: str, end: str, exact: bool = False, caller: Caller = Depends(reader_key),
             context: ServiceContext = Depends(service)):
    """An MP4 of [start, end] (times as other routes take them), cut at keyframes unless exact=true; headers
    X-Clip-Start and X-Clip-End give the seconds it covers."""
    from pipeline.clips import NoFootage, make_clip

    [source_id] = resolve_names(context, caller, [source_id])
    t0, t1 = parse_window(start, end, context.settings)
    try:
        clip = make_clip(context.settings, source_id, t0, t1, exact)
    except NoFootage as e:
        raise HTTPException(404, str(e)) from None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return FileResponse(clip.path, media_type="video/mp4",
                        headers={"X-Clip-Start": f"{clip.start:.3f}", "X-Clip-End": f"{clip.end:.3f}",
                                 "Cache-Control": "private, max-age=60"})
