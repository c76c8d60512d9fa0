"""Summarize (/v1/summarize): a summary of a window of any length, built bottom up (deploy/summaries.py), as one
JSON result or streamed as server-sent events: one `line` event per summary line as it is made, then `result`."""
import asyncio

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.exceptions import BackPressureError

from deploy.api.ask import sse_response
from deploy.api.deps import ScopedRoute, ServiceContext, Time, check_window, reader_key, service, sources_for
from deploy.api.errors import error_responses, overload_response, raise_decoder_error
from deploy.auth import Caller

router = APIRouter(route_class=ScopedRoute)


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{"source": "lobby", "max_new_tokens": 16,
                                                               "granularity": 600}]})

    sources: list[str] | None = None
    source: str | None = None
    start: Time = None
    end: Time = None
    granularity: float | None = Field(None, description="seconds per first-level period (60..86400; default 300)")
    max_new_tokens: int | None = Field(None, ge=1)
    stream: bool = False


@router.post("/v1/summarize", responses=error_responses(404, 408, 413, 422, 503))
async def summarize(body: SummarizeRequest, caller: Caller = Depends(reader_key),
                    context: ServiceContext = Depends(service)):
    s = context.settings
    if body.source is not None and body.sources is not None:
        raise HTTPException(422, "give either source or sources, not both")
    if body.source is None and body.sources is None:
        raise HTTPException(422, "give the footage to summarize: source (one id) or sources (a list of ids)")
    sources = await asyncio.to_thread(sources_for, context, caller,
                                      [body.source] if body.source is not None else body.sources)
    start, end = check_window(body.start, body.end, s)
    max_new = body.max_new_tokens or min(s.api_default_new_tokens, 64)
    if max_new > s.api_max_new_tokens:
        raise HTTPException(422, f"max_new_tokens {max_new} is over the maximum {s.api_max_new_tokens} "
                                 "(api_max_new_tokens)")
    req = {"sources": sources, "start": start, "end": end, "granularity": body.granularity,
           "max_new_tokens": max_new}
    stream = context.decoder.options(stream=True).summarize_stream.remote(req)
    try:
        first = await stream.__anext__()     # a full queue or a bad request fails here, as plain HTTP
    except BackPressureError:
        return overload_response(s.api_retry_after_seconds)
    raise_decoder_error(first)
    if not body.stream:
        item = first
        while "line" in item:
            item = await stream.__anext__()
        raise_decoder_error(item)
        return item["result"]

    return sse_response(first, stream, "line")
