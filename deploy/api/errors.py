"""Errors of the REST API, always JSON {"error": message}: the exception handlers, the helpers routes use, and
the OpenAPI description of each error status."""
import logging

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.auth import AuthError
from pipeline.index_files import IndexUnavailable

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The body of every error response."""
    error: str = Field(description="what went wrong, in words; never a secret")


ERROR_STATUSES = {
    401: "no API key, or an unknown one (header WWW-Authenticate: Bearer)",
    403: "the key's role or sources do not allow this",
    404: "no such feed, job, source or footage",
    408: "the request body did not arrive within api_body_timeout_seconds",
    409: "conflicts with what exists (a feed id taken, a job already finished)",
    413: "request body over api_max_request_bytes",
    416: "a Range beyond the end of the file (header Content-Range: bytes */SIZE)",
    422: "invalid request; the message names the field",
    503: "Redis, the index or the decoder is unavailable or busy; retry after the Retry-After header's seconds",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` of a route for these error statuses, each with the ErrorBody model."""
    return {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def overload_response(retry_after_s: float) -> JSONResponse:
    """503 with Retry-After: the decoder's queue is full (Serve's max_queued_requests)."""
    retry = int(retry_after_s)
    return error_response(503, f"the decoder is busy (its queue is full); retry in {retry} s",
                          {"Retry-After": str(retry)})


def raise_decoder_error(result: dict) -> None:
    """Raise the error a DecoderServer call answered with ({"error", "status"}), if any."""
    if "error" in result:
        raise HTTPException(int(result.get("status", 500)), result["error"])


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's answer to a body it cannot decode (not UTF-8): an invalid request like malformed JSON, 422
        return error_response(422, f"invalid request: body: not JSON in UTF-8 ({type(exc.__cause__).__name__})")
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return error_response(422, "invalid request: " + "; ".join(parts))


async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.message, headers)


async def _index_unavailable(request: Request, exc: IndexUnavailable) -> JSONResponse:
    return error_response(503, str(exc))


async def _redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
    # the details (host, port, the client's words) go to the log, not to callers
    log.warning("Redis unreachable on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    retry = int(request.app.state.service.settings.api_retry_after_seconds)
    return error_response(503, f"Redis is unreachable (feeds and jobs live there); retry in {retry} s",
                          {"Retry-After": str(retry)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}"[:1000])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(IndexUnavailable, _index_unavailable)
    # an outage (refused, timed out, loading); other Redis errors are bugs and stay 500
    app.add_exception_handler(redis.ConnectionError, _redis_unavailable)
    app.add_exception_handler(redis.TimeoutError, _redis_unavailable)
    app.add_exception_handler(Exception, _internal_error)
