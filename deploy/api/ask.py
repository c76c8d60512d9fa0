"""Ask (/v1/ask): a question answered from footage and uploaded images, as one JSON answer or streamed as server-sent
events."""
import asyncio
import json
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.exceptions import BackPressureError

from deploy.api.deps import (ScopedRoute, ServiceContext, Time, check_length, check_window, reader_key,
                             request_images, service, sources_for)
from deploy.api.errors import error_responses, overload_response, raise_decoder_error
from deploy.auth import Caller
from deploy.generation import FIELDS, LIMITS

router = APIRouter(route_class=ScopedRoute)


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,   # JSON true is no number, "2" no int
                              json_schema_extra={"examples": [{"question": "Who came in through the door?",
                                                               "source": "lobby"}]})

    question: str = Field(min_length=1)
    sources: list[str] | None = None
    source: str | None = None
    start: Time = None
    end: Time = None
    max_new_tokens: int | None = Field(None, ge=1)
    # the checkpoint's generation_config.json unless given (deploy/generation.py); temperature 0: greedy
    temperature: float | None = Field(None, ge=LIMITS["temperature"][0], le=LIMITS["temperature"][1])
    top_p: float | None = Field(None, gt=0, le=LIMITS["top_p"][1])
    top_k: int | None = Field(None, ge=LIMITS["top_k"][0], le=LIMITS["top_k"][1])
    repetition_penalty: float | None = Field(None, ge=LIMITS["repetition_penalty"][0],
                                             le=LIMITS["repetition_penalty"][1])
    seed: int | None = Field(None, ge=LIMITS["seed"][0], le=LIMITS["seed"][1])
    stream: bool = False
    images: list[str] | None = Field(None, description=(
        "images asked about, shown to the model before the footage: each base64, or a data:image/...;base64, URL "
        "(JPEG, PNG, WebP, GIF, BMP, TIFF; at most api_max_images of api_max_image_bytes each). With images, the "
        "footage (source or sources) may be left out."))


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def sse_response(first: dict, stream, kind: str, payload: Callable[[Any], Any] = lambda v: v) -> StreamingResponse:
    """Server-sent events of a decoder stream that began with `first`: one `kind` event per {kind: value} item
    (its data is payload(value)), then `result`, or `error` if the stream ends with one."""
    async def events():
        item = first
        try:
            while kind in item:
                yield sse(kind, payload(item[kind]))
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            if kind in item:            # the client went away mid-stream: the decoder stops work on it
                stream.cancel()
        if "error" in item:
            yield sse("error", item)
        else:
            yield sse("result", item["result"])

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/ask", responses=error_responses(404, 408, 413, 422, 503))
async def ask(body: AskRequest, caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    s = context.settings
    if body.source is not None and body.sources is not None:
        raise HTTPException(422, "give either source or sources, not both")
    if body.source is None and body.sources is None and not body.images:
        raise HTTPException(422, "give the footage to ask about: source (one id) or sources (a list of ids), "
                                 "or images")
    images = request_images(body.images or [], s)
    sources = [] if body.source is None and body.sources is None else await asyncio.to_thread(
        sources_for, context, caller, [body.source] if body.source is not None else body.sources)
    check_length("question", body.question, s.api_max_question_chars, "api_max_question_chars")
    start, end = check_window(body.start, body.end, s)
    max_new = body.max_new_tokens            # None: the checkpoint's default, else api_default_new_tokens
    if max_new is not None and max_new > s.api_max_new_tokens:
        raise HTTPException(422, f"max_new_tokens {max_new} is over the maximum {s.api_max_new_tokens} "
                                 "(api_max_new_tokens)")
    req = {"question": body.question, "sources": sources, "start": start, "end": end, "images": images,
           "max_new_tokens": max_new, "generation": {name: getattr(body, name) for name in FIELDS}}
    # Caught here, not by an exception handler: Serve installs its own handler for BackPressureError (a 503
    # without our message or Retry-After) over any the app registers.
    if not body.stream:
        try:
            out = await context.decoder.ask.remote(req)
        except BackPressureError:
            return overload_response(s.api_retry_after_seconds)
        raise_decoder_error(out)
        return out["result"]
    stream = context.decoder.options(stream=True).ask_stream.remote(req)
    try:
        first = await stream.__anext__()     # a full queue or a bad request fails here, as plain HTTP
    except BackPressureError:
        return overload_response(s.api_retry_after_seconds)
    raise_decoder_error(first)
    return sse_response(first, stream, "token", lambda text: {"text": text})
