"""The deadlines Serve's HTTP proxy keeps for slow clients (docs/architecture.md, "Slow clients").

- Request head: a connection must deliver a complete request head (request line and headers) within
  api_header_timeout_seconds of connecting, or of the first byte of its next request on a kept-alive connection (the
  idle wait between requests is the keep-alive timeout's); past that the proxy answers 408 and closes it.
- Head size: a request head larger than MAX_HEAD_BYTES is answered 431 and the connection closed (httptools keeps
  any head it is sent in memory; h11 has its own, smaller bound, uvicorn's h11_max_incomplete_event_size).
- Send stall: a connection whose client reads nothing for api_keep_alive_seconds while a response waits in the
  proxy's write buffer is dropped (its buffer freed, its request task ended as for a disconnect).
uvicorn keeps neither: its only timer, keep-alive, runs between a response's end and the next request's first
byte, and a transport closed with unsent output waits for the client forever. Both are counted in
tubescope_http_timeouts_total{phase="head"|"send"}.

Serve starts uvicorn itself, but first calls, inside the proxy process, the function that
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names: `install` puts subclasses of both of uvicorn's HTTP protocols
(httptools and h11, whichever "auto" picks) in the protocol table uvicorn's config reads when the server starts.
`proxy_env` is the environment that makes a proxy do it; the proxy inherits it from the Serve controller's
runtime_env (deploy.app.run_app, the cluster configs' controller_options) or from the node's environment."""
from __future__ import annotations

import asyncio
import json
import math
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:                          # httptools not installed: uvicorn's "auto" is h11
    HttpToolsProtocol = None

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
TIMEOUT_ENV = "TUBESCOPE_API_HEADER_TIMEOUT_SECONDS"
CALLBACK = "deploy.http_deadlines:install"
MAX_HEAD_BYTES = 64 * 1024           # a request line and headers; browsers and clients send a few KiB


def proxy_env(header_timeout_s: float) -> dict[str, str]:
    """The environment variables that arm the deadline in every Serve proxy started with them."""
    return {PROXY_CALLBACK_ENV: CALLBACK, TIMEOUT_ENV: repr(float(header_timeout_s))}


def timeout_response(timeout_s: float) -> bytes:
    """The raw 408 written to a connection whose head is late: the API's JSON error shape, then close."""
    body = json.dumps({"error": f"the request head did not arrive within {timeout_s:g} s "
                                "(api_header_timeout_seconds)"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


def too_large_response() -> bytes:
    """The raw 431 written to a connection whose head outgrows MAX_HEAD_BYTES, then close."""
    body = json.dumps({"error": f"the request head is larger than {MAX_HEAD_BYTES} bytes"}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


class HttpDeadlines:
    """Mixin over a uvicorn HTTP protocol. Both implementations start a new request cycle (self.cycle) the moment a
    head is complete, from data_received or, for a pipelined request under h11, from on_response_complete: the head
    deadline ends there; while a request is in flight none runs (the body has the app's own). The transport calls
    pause_writing when the client stops reading and its output piles up, resume_writing when it reads again."""
    header_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _head_bytes: int = 0                 # bytes of the head under way (while _head_timer runs)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._between_requests():
            self._arm_head()                 # the first byte of the next request on a kept-alive connection
        cycle = self.cycle
        super().data_received(data)
        self._end_if_head_done(cycle)
        if self._head_timer is not None:     # the head is still incomplete after these bytes
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_too_large()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        self._end_if_head_done(cycle)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.timeout_keep_alive, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_timer = _cancelled(self._send_timer)

    def connection_lost(self, exc) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._send_timer = _cancelled(self._send_timer)
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _end_if_head_done(self, cycle_before) -> None:
        # a WebSocket upgrade hands the transport to another protocol: its head is complete too
        if self.cycle is not cycle_before or self.transport.get_protocol() is not self:
            self._head_timer = _cancelled(self._head_timer)

    def _arm_head(self) -> None:
        _cancelled(self._head_timer)
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        from pipeline import metrics

        metrics.record_http_timeout("head")
        if self._between_requests():        # no response of this connection under way: a 408 fits in
            self.transport.write(timeout_response(self.header_timeout_s))
        self.transport.close()

    def _head_too_large(self) -> None:
        self._head_timer = _cancelled(self._head_timer)
        if self._between_requests():
            self.transport.write(too_large_response())
        self.transport.close()

    def _send_stalled(self) -> None:
        self._send_timer = None
        from pipeline import metrics

        metrics.record_http_timeout("send")
        self.transport.abort()               # close() would wait for the client to take the buffered output


def _cancelled(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


class H11WithDeadlines(HttpDeadlines, H11Protocol):
    pass


# uvicorn's protocol table maps a name to an import string; "auto" is httptools when it is installed, as uvicorn's
PROTOCOLS = {"h11": f"{__name__}:H11WithDeadlines", "auto": f"{__name__}:H11WithDeadlines"}
if HttpToolsProtocol is not None:
    class HttpToolsWithDeadlines(HttpDeadlines, HttpToolsProtocol):
        pass

    PROTOCOLS["httptools"] = PROTOCOLS["auto"] = f"{__name__}:HttpToolsWithDeadlines"


def header_timeout_from_env() -> float:
    """TIMEOUT_ENV, checked as the settings check it; the settings' default when unset."""
    from pipeline.settings import Settings

    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return float(Settings.model_fields["api_header_timeout_seconds"].default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def install(header_timeout_s: float | None = None) -> list:
    """Serve's proxy callback: uvicorn servers configured after this in the process keep the deadline (the
    environment's, unless given). Returns the ASGI middlewares Serve expects from the callback: none."""
    from uvicorn import config

    HttpDeadlines.header_timeout_s = header_timeout_s if header_timeout_s is not None else header_timeout_from_env()
    config.HTTP_PROTOCOLS.update(PROTOCOLS)
    return []
