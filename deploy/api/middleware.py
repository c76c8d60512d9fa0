"""ASGI middleware of the REST API: the request-body limit (413) and the request metrics."""
import time

from fastapi import HTTPException

from deploy.api.errors import error_response
from pipeline import metrics


class RequestGuard:
    """Refuses bodies over max_request_bytes (413, setting api_max_request_bytes) and records every request's
    endpoint, status and latency (pipeline.metrics.record_query)."""

    def __init__(self, app, max_request_bytes: int):
        self.app = app
        self.max_request_bytes = int(max_request_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
            await error_response(413, too_big)(scope, receive, send_counted)
        else:
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:     # a chunked body without Content-Length
                        raise HTTPException(413, too_big)
                return message

            await self.app(scope, receive_limited, send_counted)
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        metrics.record_query(f'{scope["method"]} {route}', status_seen[0] if status_seen else 500,
                             time.perf_counter() - t0)
