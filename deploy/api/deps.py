"""What routes depend on: the service context, who is calling, and the request limits.

Every route declares its scope as a dependency: reader_key (any valid key), admin_key, metrics_key, or public (no
key). Every router builds its routes as ScopedRoute, which checks that scope before the body is read (401/403 come
before 400/422/408) and lists the error statuses in the route's OpenAPI entry. `route_scopes` reads the declarations
back for the tests.
"""
import inspect
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from fastapi import Depends, HTTPException, Request, Response, params
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, StrictFloat, StrictInt

from deploy.api.errors import error_responses
from deploy.auth import AuthError, Authorizer, Caller, require_role, require_sources, visible
from pipeline.settings import Settings


# ---- the service context ---------------------------------------------------------------------------------------------
@dataclass
class ServiceContext:
    """What the routes of one ingress replica share. ApiIngress builds it; create_api puts it on app.state."""
    settings: Settings
    redis: Any                                  # redis.Redis
    index: Any                                  # pipeline.index.SegmentIndex (create=False)
    decoder: Any                                # DeploymentHandle of DecoderServer
    feed_service: Any = None                    # DeploymentHandle of FeedService; None without feeds
    retention: Any = None                       # DeploymentHandle of RetentionService
    captions: Any = None                        # DeploymentHandle of CaptionService; None with captions off
    caption_model_id: str | None = None         # the checkpoint whose captions listings show
    authorizer: Authorizer | None = None
    job_runners: Any = None                     # deploy.job_runner.JobRunners: the runners this replica started
    alerts: Any = None                          # DeploymentHandle of AlertService; None without live indexing

    @classmethod
    def create(cls, settings: Settings, decoder: Any, feed_service: Any = None,
               retention: Any = None, captions: Any = None, model_path: str | None = None) -> "ServiceContext":
        from pipeline.checkpoints import model_id
        from pipeline.index import SegmentIndex
        from pipeline.redis_server import as_client

        from deploy.job_runner import JobRunners

        return cls(settings=settings, redis=as_client(settings.redis_url),
                   index=SegmentIndex(settings.index_root, create=False), decoder=decoder,
                   feed_service=feed_service, retention=retention, captions=captions,
                   caption_model_id=model_id(settings.resolved_caption_model_path(model_path)),
                   authorizer=Authorizer(settings.api_keys), job_runners=JobRunners())

    def nudge_feeds(self) -> None:
        """Have the feed supervisor reconcile now (a feed was added or removed) rather than on its next round."""
        if self.feed_service is not None:
            self.feed_service.reconcile_now.remote()


async def service(request: Request) -> ServiceContext:
    """The service context of this app (async: it does no I/O, and FastAPI sends sync dependencies to a thread)."""
    context = getattr(request.app.state, "service", None)
    if context is None:
        raise RuntimeError("the API has no service context: build it with create_api(context)")
    return context


# ---- who is calling --------------------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="an API key from the settings (api_keys)")


def _authenticate(context: ServiceContext, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    if context.authorizer is None:
        raise RuntimeError("the service context has no key checker (authorizer)")
    return context.authorizer.authenticate(f"Bearer {credentials.credentials}" if credentials else None)


async def public() -> None:
    """No key: the route answers anyone (health and metrics only)."""


# The key checks do no I/O (a few constant-time compares), so they are async: no thread hop per request.
async def reader_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                     context: ServiceContext = Depends(service)) -> Caller:
    """Any valid key (reader or admin)."""
    return _authenticate(context, credentials)


async def admin_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    context: ServiceContext = Depends(service)) -> Caller:
    caller = _authenticate(context, credentials)
    require_role(caller, "admin")
    return caller


async def metrics_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                      context: ServiceContext = Depends(service)) -> Caller | None:
    """/metrics: open to anyone only when api_metrics_public; else an admin key for every source (the series name
    every source, with counts and bytes)."""
    if context.settings.api_metrics_public:
        return None
    caller = await admin_key(credentials, context)
    if caller.sources is not None:
        raise AuthError(403, "the metrics name every source: they need an admin key that is not limited to some")
    return caller


SCOPES = {public: "public", reader_key: "reader", admin_key: "admin", metrics_key: "metrics"}


def declared_scopes(endpoint: Callable, dependencies=()) -> list[Callable]:
    """The scope dependencies a route declares: in its endpoint's parameters or its `dependencies`."""
    declared = [p.default for p in inspect.signature(endpoint).parameters.values()] + list(dependencies or ())
    return [d.dependency for d in declared if isinstance(d, params.Depends) and d.dependency in SCOPES]


class ScopedRoute(APIRoute):
    """A route that declares exactly one scope, checks it before the body is read, and documents its errors.

    FastAPI reads and parses a JSON body before it solves any dependency, so on a plain APIRoute a malformed body
    is a 422 before a missing key is a 401: an anonymous caller would learn what a route accepts. Here the scope
    runs first; FastAPI runs it again with the other dependencies (a few compares), which hands the endpoint its
    Caller. Every router is APIRouter(route_class=ScopedRoute)."""

    def __init__(self, path: str, endpoint: Callable, *, dependencies=None, responses=None, **kwargs):
        scopes = declared_scopes(endpoint, dependencies)
        if len(scopes) != 1:
            raise RuntimeError(f"route {path} must declare exactly one of public, reader_key, admin_key, "
                               f"metrics_key; it declares {[SCOPES[s] for s in scopes]}")
        self.scope = scopes[0]
        key_errors = error_responses(401, 403) if self.scope is not public else {}
        super().__init__(path, endpoint, dependencies=dependencies, responses={**key_errors, **(responses or {})},
                         **kwargs)

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()
        scope = self.scope
        if scope is public:
            return handler

        async def key_first(request: Request) -> Response:
            await scope(await _bearer(request), await service(request))
            return await handler(request)

        return key_first


def route_scopes(router: APIRouter) -> dict[str, list[str]]:
    """Each route's "METHOD path" -> the scopes it declares (a ScopedRoute declares exactly one)."""
    return {f"{method} {route.path}": [SCOPES[s] for s in declared_scopes(route.endpoint, route.dependencies)]
            for route in router.routes if isinstance(route, APIRoute) for method in sorted(route.methods)}


# ---- source scopes ---------------------------------------------------------------------------------------------------
def require_named_source(caller: Caller, source_id: str | None, how: str) -> None:
    """A source-limited key may only create feeds/jobs whose source it names, and that it may use."""
    if caller.sources is None:
        return
    if source_id is None:
        raise AuthError(403, f"this API key is limited to sources {list(caller.sources)}: {how}")
    require_sources(caller, [source_id])


def sources_for(context: ServiceContext, caller: Caller, sources: list[str] | None) -> list[str]:
    """The sources a search or question covers: the ones asked for (403 unless all allowed), or every source the
    key may see. Reads the index: call it off the event loop."""
    if sources is None:
        return visible(caller, [s["source_id"] for s in context.index.sources()])
    if not sources or not all(isinstance(s, str) and s for s in sources):
        raise HTTPException(422, "sources must be a non-empty list of source ids")
    return resolve_names(context, caller, sources)


def resolve_names(context: ServiceContext, caller: Caller, sources: list[str]) -> list[str]:
    """Source ids for ids or feed names (pipeline.feeds.resolve_sources), each allowed for the caller (403)."""
    from pipeline.feeds import list_feeds, resolve_sources

    indexed = {s["source_id"] for s in context.index.sources()}
    # only names the caller may see: a name never reveals the id of a feed outside the key's sources
    feeds = None if all(s in indexed for s in sources) else \
        [f for f in list_feeds(context.redis) if caller.may_see(f["id"])]
    try:
        resolved = resolve_sources(sources, indexed, feeds)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    require_sources(caller, resolved)
    return resolved


# ---- request limits (api_* settings) ---------------------------------------------------------------------------------
# a start or end as people write it: epoch or media seconds, ISO 8601, "-2h", "yesterday 14:00" (pipeline.times)
Time = Annotated[StrictFloat | StrictInt | str | None, Field(union_mode="left_to_right")]


def parse_window(start, end, settings: Settings) -> tuple[float | None, float | None]:
    """(start, end) in seconds from times as people write them (pipeline.times); 422 naming the bad field."""
    from pipeline.times import parse_time

    now = time.time()
    try:
        return (parse_time(start, "start", tz=settings.time_zone, now=now),
                parse_time(end, "end", tz=settings.time_zone, now=now))
    except ValueError as e:
        raise HTTPException(422, str(e)) from None


def check_window(start, end, settings: Settings) -> tuple[float | None, float | None]:
    """Parsed (start, end) of an ask or search: end after start, within api_max_window_seconds."""
    start, end = parse_window(start, end, settings)
    if start is not None and end is not None:
        if end <= start:
            raise HTTPException(422, f"window end ({end}) must be after start ({start})")
        if end - start > settings.api_max_window_seconds:
            raise HTTPException(422, f"window of {end - start:g} s is longer than the limit "
                                     f"{settings.api_max_window_seconds:g} s (api_max_window_seconds)")
    return start, end


def check_length(what: str, text: str, limit: int, setting: str) -> None:
    if len(text) > limit:
        raise HTTPException(422, f"{what} has {len(text)} characters; the limit is {limit} ({setting})")


def request_images(images: list[str], settings: Settings, what: str = "images") -> list[bytes]:
    """The bytes of a request's base64 images (deploy.images.image_bytes): 422 past api_max_images or for text that
    is not base64, 413 for an image over api_max_image_bytes. Whether the bytes are an image the decoder says (422)."""
    from deploy.images import ImageTooLarge, image_bytes

    if len(images) > settings.api_max_images:
        raise HTTPException(422, f"{what}: {len(images)} images; the limit is {settings.api_max_images} "
                                 "(api_max_images)")
    try:
        return [image_bytes(text, settings.api_max_image_bytes, f"{what}[{i}]") for i, text in enumerate(images)]
    except ImageTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
