"""ASGI middleware of the REST API: the request-body limits (413 for size, 408 for time) and the request metrics."""
import asyncio
import time

from fastapi import HTTPException

from deploy.api.errors import error_response
from deploy.api.openai import openai_route, reshaped
from pipeline import metrics


# routes whose bodies may carry images (docs/architecture.md, "Images")
IMAGE_PATHS = frozenset({"/v1/ask", "/v1/search", "/v1/chat/completions"})


def image_body_bytes(settings) -> int:
    """Room for api_max_images base64 images of api_max_image_bytes each (and a data: URL prefix each)."""
    return settings.api_max_images * ((settings.api_max_image_bytes + 2) // 3 * 4 + 64)


class RequestGuard:
    """Refuses bodies over max_request_bytes (413, setting api_max_request_bytes; max_image_request_bytes on the
    routes that take images) and bodies that have not fully arrived body_timeout_s after the request started (408
    and the connection closed, api_body_timeout_seconds), and records every request's endpoint, status and latency
    (pipeline.metrics.record_query)."""

    def __init__(self, app, max_request_bytes: int, body_timeout_s: float, max_image_request_bytes: int | None = None):
        self.app = app
        self.max_request_bytes = int(max_request_bytes)
        self.max_image_request_bytes = int(max_image_request_bytes or max_request_bytes)
        self.body_timeout_s = float(body_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path") in IMAGE_PATHS:
            limit = self.max_image_request_bytes
            too_big = (f"request body over {limit} bytes (api_max_request_bytes plus api_max_images images of "
                       "api_max_image_bytes)")
        else:
            limit = self.max_request_bytes
            too_big = f"request body over {limit} bytes (api_max_request_bytes)"
        status_seen: list[int] = []
        t0 = time.perf_counter()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            refusal = error_response(413, too_big)
            if openai_route(scope.get("path", "")):
                refusal = reshaped(refusal)
            await refusal(scope, receive, send_counted)
        else:
            received, body_done = 0, False
            deadline = t0 + self.body_timeout_s

            async def receive_limited():
                nonlocal received, body_done
                if body_done:                # later reads wait for a disconnect (a streamed answer): no deadline
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    raise HTTPException(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                             "(api_body_timeout_seconds)", headers={"Connection": "close"}) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:     # a chunked body without Content-Length
                        raise HTTPException(413, too_big)
                    body_done = not message.get("more_body", False)
                return message

            await self.app(scope, receive_limited, send_counted)
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        metrics.record_query(f'{scope["method"]} {route}', status_seen[0] if status_seen else 500,
                             time.perf_counter() - t0)
