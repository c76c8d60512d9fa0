"""Search (/v1/search): segments ranked against a text query or an image, over the sources the key may see."""
import asyncio

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.exceptions import BackPressureError

from deploy.api.deps import (ScopedRoute, ServiceContext, Time, check_length, check_window, reader_key,
                             request_images, service, sources_for)
from deploy.api.errors import error_responses, overload_response, raise_decoder_error
from deploy.auth import Caller

router = APIRouter(route_class=ScopedRoute)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{"query": "a person carrying a box",
                                                               "sources": ["lobby"], "limit": 5}]})

    query: str | None = Field(None, min_length=1)
    image: str | None = Field(None, description=(
        "the segments most like this image (base64, or a data:image/...;base64, URL): cosine of pooled visual "
        "tokens; with a query too, the image's best candidates are reranked by the query"))
    sources: list[str] | None = None
    start: Time = None
    end: Time = None
    limit: int = Field(10, ge=1)


@router.post("/v1/search", responses=error_responses(404, 408, 413, 422, 503))
async def search(body: SearchRequest, caller: Caller = Depends(reader_key),
                 context: ServiceContext = Depends(service)):
    s = context.settings
    if body.query is None and body.image is None:
        raise HTTPException(422, "give a query, an image, or both")
    image = request_images([body.image], s, "image")[0] if body.image is not None else None
    sources = await asyncio.to_thread(sources_for, context, caller, body.sources)    # index I/O off the loop
    if body.query is not None:
        check_length("query", body.query, s.api_max_query_chars, "api_max_query_chars")
    start, end = check_window(body.start, body.end, s)
    if body.limit > s.api_max_search_results:
        raise HTTPException(422, f"limit {body.limit} is over the maximum {s.api_max_search_results} "
                                 "(api_max_search_results)")
    if not sources:
        return {"results": [], "coverage": {"segments": 0, "captioned": 0, "retrieval": False}}
    try:
        out = await context.decoder.search.remote({"query": body.query, "sources": sources, "start": start,
                                                   "end": end, "limit": body.limit, "image": image})
    except BackPressureError:      # caught here: Serve's own handler for it would answer without Retry-After
        return overload_response(s.api_retry_after_seconds)
    raise_decoder_error(out)
    return out["result"]
