"""The web console (deploy/console/): static files served at / by the API's own app.

The files hold no data: every panel reads the REST API with the key the person signs in with, so the routes are
public. They are left out of the OpenAPI (they are pages, not API). Each answer carries a Content-Security-Policy
that allows only this origin's scripts, styles and connections, and blob: media (thumbnails and clips are fetched
with the key and shown through blob URLs), so no inline or foreign script can run with a signed-in key.
"""
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import Response

from deploy.api.deps import ScopedRoute, public

router = APIRouter(route_class=ScopedRoute)
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' blob:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def console_files(folder: Path = CONSOLE_DIR) -> dict[str, tuple[bytes, str]]:
    """name -> (content, media type) of the files that may be served, read once: no request path reaches the disk."""
    return {p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix])
            for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


FILES = console_files()


def _file(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(404, f"no console file {name!r}")
    content, media_type = FILES[name]
    return Response(content, media_type=media_type, headers=PAGE_HEADERS)


@router.get("/", dependencies=[Depends(public)], include_in_schema=False)
async def console_page():
    return _file("index.html")


@router.get("/console/{name}", dependencies=[Depends(public)], include_in_schema=False)
async def console_file(name: str):
    return _file(name)
