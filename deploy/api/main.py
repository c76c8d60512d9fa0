"""create_api: the FastAPI app of the REST API, built from the routers of deploy.api.

Errors are JSON {"error": message}; bodies over api_max_request_bytes are refused (413); every request is counted
in the metrics. Each route declares its scope (deploy.api.deps): create_api refuses to build with a route that
declares none, or several.
"""
from fastapi import FastAPI

from deploy.api import ask, feeds, health, jobs, search, sources
from deploy.api.deps import ServiceContext, route_scopes
from deploy.api.errors import install_error_handlers
from deploy.api.middleware import RequestGuard

ROUTERS = (health.router, feeds.router, jobs.router, sources.router, search.router, ask.router)


def create_api(context: ServiceContext) -> FastAPI:
    """The app serving `context` (kept on app.state, where the `service` dependency finds it)."""
    for router in ROUTERS:
        unscoped = {route: scopes for route, scopes in route_scopes(router).items() if len(scopes) != 1}
        if unscoped:
            raise RuntimeError(f"routes must declare exactly one of public, reader_key, admin_key: {unscoped}")
    api = FastAPI(title="tubescope", version="0.1.0",
                  description="Ask questions over live and archived video. Bearer API keys; errors are "
                              "{\"error\": ...}.")
    api.state.service = context
    install_error_handlers(api)
    api.add_middleware(RequestGuard, max_request_bytes=context.settings.api_max_request_bytes)
    for router in ROUTERS:
        api.include_router(router)
    return api
