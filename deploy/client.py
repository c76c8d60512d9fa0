"""HTTP client of the tubescope REST API (used by the CLI; usable from notebooks).

URL and key default to $TUBESCOPE_API_URL and $TUBESCOPE_API_KEY. Every error answer raises ApiError with the
status and the server's message.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

URL_ENV = "TUBESCOPE_API_URL"
KEY_ENV = "TUBESCOPE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs of a text/event-stream, data decoded from JSON."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, json.loads("\n".join(data))


def image_base64(path: str | Path) -> str:
    """An image file as the API takes it: its bytes in base64 (the server checks that they are an image)."""
    return base64.b64encode(Path(path).read_bytes()).decode()


class TubescopeClient:
    def __init__(self, url: str | None = None, key: str | None = None, timeout_s: float = 300.0):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.key = key if key is not None else os.environ.get(KEY_ENV)
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "TubescopeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            raise ApiError(0, f"cannot reach the tubescope API at {self.url} ({e}); is `tubescope serve` running? "
                              f"(--url or ${URL_ENV})") from None
        if r.status_code >= 400:
            raise ApiError(r.status_code, _message(r), r.headers.get("retry-after"))
        return r.json()

    # ---- health ---------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._call("GET", "/healthz")

    # ---- feeds ----------------------------------------------------------------------------------------------------
    def add_feed(self, url: str, name: str | None = None, fps: float | None = None, max_pixels: int | None = None,
                 feed_id: str | None = None, record: bool | None = None) -> dict:
        body = {k: v for k, v in dict(url=url, name=name, fps=fps, max_pixels=max_pixels, id=feed_id,
                                      record=record).items() if v is not None}
        return self._call("POST", "/v1/feeds", json=body)

    def list_feeds(self) -> list[dict]:
        return self._call("GET", "/v1/feeds")["feeds"]

    def get_feed(self, feed_id: str) -> dict:
        return self._call("GET", f"/v1/feeds/{feed_id}")

    def remove_feed(self, feed_id: str) -> dict:
        return self._call("DELETE", f"/v1/feeds/{feed_id}")["deleted"]

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def create_job(self, paths: list[str], source_id: str | None = None) -> dict:
        body: dict[str, Any] = {"paths": list(paths)}
        if source_id is not None:
            body["source_id"] = source_id
        return self._call("POST", "/v1/jobs", json=body)

    def get_job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    # ---- footage --------------------------------------------------------------------------------------------------
    def sources(self) -> list[dict]:
        return self._call("GET", "/v1/sources")["sources"]

    def segments(self, source_id: str, start: float | str | None = None, end: float | str | None = None) -> list[dict]:
        params = {k: v for k, v in dict(start=start, end=end).items() if v is not None}
        return self._call("GET", f"/v1/sources/{source_id}/segments", params=params)["segments"]

    def clip(self, source_id: str, start: float | str, end: float | str, path: str, exact: bool = False) -> dict:
        """Save the MP4 of [start, end] to `path` (written whole, then renamed); returns {path, start, end, bytes}
        with the seconds the clip covers."""
        params = {"start": start, "end": end, **({"exact": "true"} if exact else {})}
        tmp = f"{path}.part"
        try:
            with self.http.stream("GET", f"/v1/sources/{source_id}/clip", params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, _message(r), r.headers.get("retry-after"))
                with open(tmp, "wb") as out:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                covered = float(r.headers["x-clip-start"]), float(r.headers["x-clip-end"])
            os.replace(tmp, path)
        except httpx.ConnectError as e:
            raise ApiError(0, f"cannot reach the tubescope API at {self.url} ({e})") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {"path": path, "start": covered[0], "end": covered[1], "bytes": os.path.getsize(path)}

    def search(self, query: str | None = None, sources: list[str] | None = None, start: float | str | None = None,
               end: float | str | None = None, limit: int | None = None,
               image: str | Path | None = None) -> list[dict]:
        """Segments ranked for the query, or the segments most like the image file (both: the image's best
        candidates reranked by the query)."""
        body = {k: v for k, v in dict(query=query, sources=sources, start=start, end=end, limit=limit,
                                      image=None if image is None else image_base64(image)).items()
                if v is not None}
        return self._call("POST", "/v1/search", json=body)["results"]

    def ask(self, question: str, sources: list[str] = (), start: float | str | None = None,
            end: float | str | None = None, max_new_tokens: int | None = None,
            on_token: Callable[[str], None] | None = None, images: list[str | Path] = (), **generation) -> dict:
        """The answer record (answer, boxes, evidence, plan, ...); with on_token the answer is streamed (SSE) and each
        token (clean text: a box's label, never its markup) handed to on_token. images: image files asked about
        (shown before the footage; sources may then be empty). generation: temperature, top_p, top_k,
        repetition_penalty, seed (the checkpoint's own when not given)."""
        body = {k: v for k, v in dict(question=question, sources=list(sources) or None, start=start, end=end,
                                      max_new_tokens=max_new_tokens,
                                      images=[image_base64(i) for i in images] or None, **generation).items()
                if v is not None}
        if on_token is None:
            return self._call("POST", "/v1/ask", json=body)
        return self._stream("/v1/ask", body, {"token": lambda data: on_token(data["text"])})

    def summarize(self, sources: list[str], start: float | str | None = None, end: float | str | None = None,
                  granularity: float | None = None, max_new_tokens: int | None = None,
                  on_line: Callable[[dict], None] | None = None) -> dict:
        """The summary; with on_line each line is handed over as it is made (SSE)."""
        body = {k: v for k, v in dict(sources=list(sources), start=start, end=end, granularity=granularity,
                                      max_new_tokens=max_new_tokens).items() if v is not None}
        if on_line is None:
            return self._call("POST", "/v1/summarize", json=body)
        return self._stream("/v1/summarize", body, {"line": on_line})

    def _stream(self, path: str, body: dict, handlers: dict[str, Callable[[dict], None]]) -> dict:
        """POST `body` with stream=true; each SSE event goes to its handler until `result` (returned) or `error`."""
        try:
            with self.http.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, _message(r), r.headers.get("retry-after"))
                for event, data in parse_sse(r.iter_lines()):
                    if event in handlers:
                        handlers[event](data)
                    elif event == "error":
                        raise ApiError(int(data.get("status", 500)), data.get("error", "stream failed"))
                    elif event == "result":
                        return data
        except httpx.ConnectError as e:
            raise ApiError(0, f"cannot reach the tubescope API at {self.url} ({e})") from None
        raise ApiError(502, "the stream ended without a result")


__all__ = ["ApiError", "TubescopeClient", "parse_sse", "URL_ENV", "KEY_ENV", "DEFAULT_URL"]
