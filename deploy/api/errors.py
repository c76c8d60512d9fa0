"""Errors of the REST API, always JSON {"error": message}: the exception handlers and the helpers routes use."""
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.auth import AuthError
from pipeline.index import IndexUnavailable

log = logging.getLogger(__name__)


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


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}"[:1000])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(IndexUnavailable, _index_unavailable)
    app.add_exception_handler(Exception, _internal_error)
