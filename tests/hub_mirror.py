"""HubMirror: a folder of repos (`<root>/<owner>/<name>/<files>`) served over HTTP on loopback in the layout the
Hugging Face hub client asks for, so download code runs against the real client with no internet.

Routes: GET /api/models/<owner>/<name>/revision/<rev> (the repo's commit and files), HEAD/GET
/<owner>/<name>/resolve/<rev>/<file> (X-Repo-Commit, ETag, Content-Length; Range answered with 206). `cut_once`
names files whose first GET is cut halfway, as a dropped connection would: the client must resume with a Range.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path


class HubMirror:
    def __init__(self, root: Path, cut_once: set[str] | None = None):
        self.root = Path(root)
        self.cut_once = set(cut_once or ())
        self.requests: list[tuple[str, str, str | None]] = []       # (method, path, Range header)
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                mirror._answer(self, body=True)

            def do_HEAD(self):
                mirror._answer(self, body=False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str) -> str:
        h = hashlib.sha1()
        for f in sorted(p for p in (self.root / repo).rglob("*") if p.is_file()):
            h.update(f.relative_to(self.root / repo).as_posix().encode() + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    def file_gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name` so far."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + name)]

    def _answer(self, handler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/?]+)(\?.*)?", handler.path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", handler.path)
        repo = (info or resolve)[1] if (info or resolve) else None
        if repo is None or not (self.root / repo).is_dir():
            return self._send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                              body)
        sha = self.commit(repo)
        if info:
            files = sorted(p.relative_to(self.root / repo).as_posix() for p in (self.root / repo).rglob("*")
                           if p.is_file())
            data = json.dumps({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}).encode()
            return self._send(handler, 200, data, {"Content-Type": "application/json"}, body)
        path = self.root / repo / resolve[3]
        if not path.is_file():
            return self._send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, body)
        content = path.read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
                   "Accept-Ranges": "bytes"}
        status, start = 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if m:
            status, start = 206, int(m[1])
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        part = content[start:]
        if body and resolve[3] in self.cut_once:
            self.cut_once.discard(resolve[3])
            handler.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(part))}.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(part[:len(part) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)                     # the rest never comes: the client must resume
            return
        self._send(handler, status, part, headers, body)

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(k, v)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
