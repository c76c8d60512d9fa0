"""create_api: the FastAPI app of the REST API, built from the routers of deploy.api.

Errors are JSON {"error": message} (the OpenAI-compatible routes: OpenAI's shape, deploy/api/openai.py); bodies
over api_max_request_bytes are refused (413); every request is counted in the metrics. Every route is a ScopedRoute
(deploy.api.deps): one declared scope, checked before the body is read; create_api refuses to build with any other
kind of route.
"""
from fastapi import FastAPI
from fastapi.routing import APIRoute

from deploy.api import (alerts, ask, clips, console, feeds, health, jobs, openai, search, segments, sources,
                        summarize)
from deploy.api.deps import ScopedRoute, ServiceContext
from deploy.api.errors import install_error_handlers
from deploy.api.middleware import RequestGuard, image_body_bytes

ROUTERS = (health.router, feeds.router, jobs.router, sources.router, search.router, ask.router, summarize.router,
           alerts.router,
           segments.router,
           clips.router,
           openai.router,
           console.router)


def create_api(context: ServiceContext) -> FastAPI:
    """The app serving `context` (kept on app.state, where the `service` dependency finds it)."""
    unscoped = [route.path for router in ROUTERS for route in router.routes
                if isinstance(route, APIRoute) and not isinstance(route, ScopedRoute)]
    if unscoped:
        raise RuntimeError(f"routes must be built by APIRouter(route_class=ScopedRoute): {unscoped}")
    api = FastAPI(title="tubescope", version="0.1.0",
                  description="Ask questions over live and archived video. Bearer API keys; errors are "
                              "{\"error\": ...}.")
    api.state.service = context
    install_error_handlers(api)
    s = context.settings
    api.add_middleware(RequestGuard, max_request_bytes=s.api_max_request_bytes,
                       body_timeout_s=s.api_body_timeout_seconds,
                       max_image_request_bytes=s.api_max_request_bytes + image_body_bytes(s))
    for router in ROUTERS:
        api.include_router(router)
    return api
