"""OpenAI-compatible routes (/v1/chat/completions, /v1/models): existing OpenAI and vLLM clients ask about indexed
footage through the same decoder, plans and limits as /v1/ask. docs/architecture.md, "OpenAI-compatible API".

A question is the last user turn's text (system and developer messages go before it); the images are the
`image_url` parts of the user turns (data:image/...;base64, URLs, and this API's own thumbnail URLs
/v1/segments/{id}/thumbnail, absolute or relative: the service fetches nothing else), shown first in the order given;
the footage is every `video_url` part of the user turns, tubescope://SOURCE?start=...&end=..., all naming one
window. Earlier turns'
text and the assistant's turns are not replayed: each request is one question over its footage. Errors are in
OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
import asyncio
import json
import time
import uuid
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.exceptions import BackPressureError

from deploy.api.deps import (ScopedRoute, ServiceContext, check_length, check_window, reader_key, request_images,
                             service, sources_for)
from deploy.api.errors import ERROR_STATUSES, overload_response, raise_decoder_error
from deploy.api.openai_models import ChatCompletionRequest, ImagePart, OpenAIErrorBody, TextPart, VideoPart
from deploy.api.segments import visible_source
from deploy.auth import Caller
from pipeline.thumbnails import ThumbnailStore
from pipeline.settings import Settings

VIDEO_SCHEME = "tubescope://"
THUMBNAIL_PREFIX, THUMBNAIL_SUFFIX = "/v1/segments/", "/thumbnail"
IMAGE_URLS = ("image_url takes data:image/...;base64, URLs and this API's own segment thumbnails "
              "(/v1/segments/{segment_id}/thumbnail, relative or on this server); other URLs are never fetched")
MODEL_ALIAS = "tubescope"          # accepted in requests besides the served model's name
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               503: "service_unavailable_error"}


class OpenAIRequestError(Exception):
    """An error of these routes that names the request field it is about (OpenAI's `param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def openai_route(path: str) -> bool:
    """Whether errors on `path` come in OpenAI's shape (the request guard's 413 too: deploy/api/middleware.py)."""
    return path == "/v1/models" or path.startswith(("/v1/models/", "/v1/chat/"))


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def reshaped(plain: JSONResponse) -> JSONResponse:
    """An {"error": message} response of the rest of the API in OpenAI's shape, headers (Retry-After,
    WWW-Authenticate) kept."""
    headers = {k: v for k, v in plain.headers.items() if k not in ("content-length", "content-type")}
    return openai_error(plain.status_code, json.loads(plain.body)["error"], headers=headers)


def openai_responses(*statuses: int) -> dict[int, dict]:
    return {s: {"model": OpenAIErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}


class OpenAIRoute(ScopedRoute):
    """A ScopedRoute whose errors, the key check's and validation's included, come in OpenAI's shape: each is
    answered by the app's own handler (deploy/api/errors.py) and reshaped."""

    def __init__(self, path: str, endpoint: Callable, *, responses=None, **kwargs):
        super().__init__(path, endpoint, responses={**openai_responses(401, 403), **(responses or {})}, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIRequestError as e:
                return openai_error(e.status, e.message, e.param, e.code)
            except Exception as e:  # noqa: BLE001 - every error is answered, by the handler the app has for it
                handlers = request.app.exception_handlers
                plain = next(handlers[c] for c in type(e).__mro__ if c in handlers)
                return reshaped(await plain(request, e))

        return openai_errors


router = APIRouter(route_class=OpenAIRoute)


def served_model(settings: Settings) -> str:
    """The name /v1/models lists: the repo id as configured, else the checkpoint folder's name."""
    ref = settings.model_path
    return ref if isinstance(ref, str) else (ref or settings.tiny_model_path).name


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tubescope"}


@router.get("/v1/models", responses=openai_responses(503))
async def list_models(caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    return {"object": "list", "data": [model_card(served_model(context.settings))]}


@router.get("/v1/models/{model}", responses=openai_responses(404, 422, 503))
async def get_model(model: str, caller: Caller = Depends(reader_key), context: ServiceContext = Depends(service)):
    return model_card(check_model(model, context.settings))


# ---- one request -> one /v1/ask question ----------------------------------------------------------------------------
def check_model(requested: str, settings: Settings) -> str:
    name = served_model(settings)
    if requested not in (name, MODEL_ALIAS):
        raise OpenAIRequestError(404, f"the model {requested!r} does not exist; this server serves {name!r} "
                                      f"(or say {MODEL_ALIAS!r})", "model", "model_not_found")
    return name


def parse_video_url(url: str) -> tuple[str, str | None, str | None]:
    """(source, start, end) of tubescope://SOURCE?start=...&end=... (times as /v1/ask takes them)."""
    if not url.startswith(VIDEO_SCHEME):
        raise OpenAIRequestError(422, f"video_url must name indexed footage as {VIDEO_SCHEME}SOURCE?start=...&end="
                                      f"..., got {url[:100]!r}", "messages")
    source, _, query = url[len(VIDEO_SCHEME):].partition("?")
    fields = parse_qs(query, keep_blank_values=True)
    unknown = set(fields) - {"start", "end"}
    if not source or unknown or any(len(v) > 1 for v in fields.values()):
        raise OpenAIRequestError(422, f"video_url {url[:100]!r}: give a source, then at most one start and one end "
                                      "(no other parameters)", "messages")
    return unquote(source), fields.get("start", [None])[0], fields.get("end", [None])[0]


def thumbnail_segment(url: str, host: str | None) -> str | None:
    """The segment id of a thumbnail URL of this API (a relative path, or an http(s) URL on `host`, the Host the
    request came to); None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        if parts.scheme not in ("http", "https") or host is None or parts.netloc.lower() != host.lower():
            return None
    path = parts.path
    if parts.query or parts.fragment or not path.startswith(THUMBNAIL_PREFIX) or not path.endswith(THUMBNAIL_SUFFIX):
        return None
    segment_id = unquote(path[len(THUMBNAIL_PREFIX):-len(THUMBNAIL_SUFFIX)])
    return segment_id or None


def image_of(url: str, context: ServiceContext, caller: Caller, host: str | None) -> bytes:
    """The bytes of an image_url: a data: URL's, or the JPEG of a thumbnail of this API, under the thumbnail route's
    scope (a segment of a source the key may not see is a 404 like a missing one)."""
    if url.startswith("data:"):
        try:
            return request_images([url], context.settings, "image_url")[0]
        except HTTPException as e:      # 413/422 of request_images, with OpenAI's param
            raise OpenAIRequestError(e.status_code, str(e.detail), "messages") from None
    segment_id = thumbnail_segment(url, host)
    if segment_id is None:
        raise OpenAIRequestError(422, f"{IMAGE_URLS}; got {url[:100]!r}", "messages")
    not_found = f"no thumbnail for segment {segment_id!r}"
    visible_source(caller, segment_id, not_found)
    try:
        return ThumbnailStore(context.index).read(segment_id)
    except KeyError:
        raise OpenAIRequestError(404, not_found, "messages") from None


def question_and_footage(body: ChatCompletionRequest) -> tuple[str, list[str], str | None, str | None, list[str]]:
    """(question, sources, start, end, image URLs) of the conversation: see the module's docstring."""
    if body.messages[-1].role != "user":
        raise OpenAIRequestError(422, "the last message must be the user's question", "messages")
    instructions, question, videos, images = [], [], [], []
    for i, message in enumerate(body.messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content or []
        for part in parts:
            if isinstance(part, (ImagePart, VideoPart)) and message.role != "user":
                raise OpenAIRequestError(422, f"{part.type} parts belong in user messages, not {message.role}",
                                         "messages")
            if isinstance(part, ImagePart):
                images.append(part.image_url.url)
            elif isinstance(part, VideoPart):
                videos.append(parse_video_url(part.video_url.url))
            elif message.role in ("system", "developer"):
                instructions.append(part.text)
            elif i == len(body.messages) - 1:
                question.append(part.text)
    if not "".join(question).strip():
        raise OpenAIRequestError(422, "the last user message has no question: give a text part", "messages")
    if not videos and not images:
        raise OpenAIRequestError(422, f"no footage: give a video_url part {VIDEO_SCHEME}SOURCE?start=...&end=... "
                                      "or an image_url part", "messages")
    windows = {(start, end) for _, start, end in videos} or {(None, None)}
    if len(windows) > 1:
        raise OpenAIRequestError(422, "all video_url parts must name the same start and end (one window per "
                                      f"question); got {sorted(windows, key=str)}", "messages")
    (start, end), = windows
    text = "\n\n".join(["\n".join(instructions)] * bool(instructions) + ["\n".join(question)])
    return text, list(dict.fromkeys(source for source, _, _ in videos)), start, end, images


def decoder_request(body: ChatCompletionRequest, context: ServiceContext, caller: Caller,
                    host: str | None = None) -> dict:
    """The DecoderServer request of /v1/ask for this chat request (reads the index: call it off the event loop)."""
    s = context.settings
    unsupported = {"stop": body.stop, "presence_penalty": body.presence_penalty,
                   "frequency_penalty": body.frequency_penalty, "logprobs": body.logprobs}
    for name, value in unsupported.items():
        if value:                     # None, 0, false and [] are the defaults clients send
            raise OpenAIRequestError(422, f"{name} is not supported: leave it out", name)
    question, names, start, end, image_urls = question_and_footage(body)
    check_length("question", question, s.api_max_question_chars, "api_max_question_chars")
    start, end = check_window(start, end, s)
    if len(image_urls) > s.api_max_images:
        raise OpenAIRequestError(422, f"{len(image_urls)} image_url parts; the limit is {s.api_max_images} "
                                      "(api_max_images)", "messages")
    images = [image_of(url, context, caller, host) for url in image_urls]
    sources = sources_for(context, caller, names) if names else []
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_new is not None and max_new > s.api_max_new_tokens:
        raise OpenAIRequestError(422, f"max_tokens {max_new} is over the maximum {s.api_max_new_tokens} "
                                      "(api_max_new_tokens)", "max_tokens")
    generation = {"temperature": body.temperature, "top_p": body.top_p, "repetition_penalty": body.repetition_penalty,
                  "seed": body.seed, "top_k": 0 if body.top_k == -1 else body.top_k}
    return {"question": question, "sources": sources, "start": start, "end": end, "max_new_tokens": max_new,
            "generation": generation, "images": images}


# ---- answers ----------------------------------------------------------------------------------------------------------
def usage(answer: dict) -> dict:
    t = answer["timings"]
    return {"prompt_tokens": t["prompt_tokens"], "completion_tokens": t["new_tokens"],
            "total_tokens": t["prompt_tokens"] + t["new_tokens"]}


def extension(answer: dict) -> dict:
    """What /v1/ask answers besides the text: the `tubescope` field of a completion (and of its last chunk)."""
    return {"answer_id": answer["id"], **{k: answer[k] for k in ("evidence", "boxes", "plan", "narrowed", "timings",
                                                                 "generation", "stream_entry")}}


def completion(answer: dict, model: str) -> dict:
    return {"id": f"chatcmpl-{answer['id']}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["answer"]},
                                         "logprobs": None, "finish_reason": answer["finish_reason"]}],
            "usage": usage(answer), "tubescope": extension(answer)}


def chunks(first: dict, stream, model: str, include_usage: bool):
    """The SSE body of a streamed completion: data lines of chat.completion.chunk, then data: [DONE]."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def data(choices: list, **extra) -> bytes:
        return f"data: {json.dumps({**head, 'choices': choices, **extra}, default=str)}\n\n".encode()

    def delta(content: dict, finish: str | None = None) -> list:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

    async def events():
        yield data(delta({"role": "assistant", "content": ""}))
        item = first
        try:
            while "token" in item:
                yield data(delta({"content": item["token"]}))
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            if "token" in item:         # the client went away mid-stream: the decoder stops work on it
                stream.cancel()
        if "error" in item:             # after the status line: the error travels as a data line, as vLLM's do
            status = int(item.get("status", 500))
            yield f"data: {json.dumps(json.loads(openai_error(status, item['error']).body))}\n\n".encode()
        else:
            answer = item["result"]
            yield data(delta({}, answer["finish_reason"]), tubescope=extension(answer))
            if include_usage:
                yield data([], usage=usage(answer))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/chat/completions", responses=openai_responses(404, 408, 413, 422, 503))
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Caller = Depends(reader_key),
                           context: ServiceContext = Depends(service)):
    model = check_model(body.model, context.settings)
    req = await asyncio.to_thread(decoder_request, body, context, caller, request.headers.get("host"))
    retry_after = context.settings.api_retry_after_seconds
    # BackPressureError is caught here: Serve's own handler for it would answer over ours (deploy/api/ask.py)
    if not body.stream:
        try:
            out = await context.decoder.ask.remote(req)
        except BackPressureError:
            return reshaped(overload_response(retry_after))
        raise_decoder_error(out)
        return completion(out["result"], model)
    stream = context.decoder.options(stream=True).ask_stream.remote(req)
    try:
        first = await stream.__anext__()     # a full queue or a bad request fails here, as plain HTTP
    except BackPressureError:
        return reshaped(overload_response(retry_after))
    raise_decoder_error(first)
    return chunks(first, stream, model, body.stream_options is not None and body.stream_options.include_usage)

