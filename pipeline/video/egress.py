"""EgressProxy: every HTTP request a feed's FFmpeg makes goes through a checking proxy on loopback.

`check_host` looks at the URL an admin registered, but FFmpeg's http and hls code then fetches what the server tells
it to: a redirect to 127.0.0.1:6379, playlist entries and key files on other hosts, and a name that resolved to a
camera at the check may resolve to the metadata service a second later (DNS rebinding). So a network feed over http
or https is opened with FFmpeg's `http_proxy` option pointing at this proxy (HLS hands the option on to every nested
open; https goes through it as a CONNECT tunnel). For every request the proxy resolves the host itself, checks each
address with the feed's HostPolicy, and connects to an address it checked, so nothing FFmpeg is told can reach a
host the policy refuses (docs/architecture.md, "Streams and protocols").

One request per connection: the request goes upstream with `Connection: close` and the response is relayed until
the server closes, so a second request on a kept-alive connection can never ride on a tunnel to another host.
A refused request gets 403 and is remembered (`last_refused`) for the feed's status detail.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
from urllib.parse import urlsplit

from pipeline.video.hosts import DEFAULT_PORTS, HostPolicy, UnresolvedHost, checked_addresses
from pipeline.video.protocols import scheme_of

log = logging.getLogger(__name__)

MAX_LINE = 8192
MAX_HEADERS = 100
_HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
                         "te", "trailer", "upgrade"})


class Refused(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


class EgressProxy:
    """A forward proxy on 127.0.0.1 (an ephemeral port) applying `policy` to every request and tunnel."""

    def __init__(self, policy: HostPolicy, connect_timeout_s: float = 10.0, idle_timeout_s: float = 60.0):
        self.policy = policy
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.requests = 0
        self.refused = 0
        self.last_refused: str | None = None
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        """The value of FFmpeg's http_proxy option (starts the proxy on first use)."""
        if self._server is None:
            self._start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _start(self) -> None:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.connection, self.rfile)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        threading.Thread(target=server.serve_forever, name="egress-proxy", daemon=True).start()
        self._server = server

    def take_refusal(self) -> str | None:
        """Why the last request was refused by the policy (None if none was since the last call)."""
        with self._lock:
            reason, self.last_refused = self.last_refused, None
        return reason

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- one client connection --------------------------------------------------------------------------------
    def _handle(self, client: socket.socket, rfile) -> None:
        client.settimeout(self.idle_timeout_s)
        try:
            method, target, version = _request_line(rfile)
            headers = _headers(rfile)
            with self._lock:
                self.requests += 1
            if method == "CONNECT":
                host, port = _authority(target, 443)
                upstream = self._connect("https", host, port)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                if parts.scheme != "http" or not parts.hostname:
                    raise Refused("400 Bad Request", f"not an absolute http URL: {target[:200]!r}")
                upstream = self._connect("http", parts.hostname, parts.port or DEFAULT_PORTS["http"])
                path = parts.path or "/"
                if parts.query:
                    path += "?" + parts.query
                kept = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
                head = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in kept] + ["Connection: close", "", ""]
                length = _content_length(headers)
                upstream.sendall("\r\n".join(head).encode("latin-1") + (rfile.read(length) if length else b""))
        except Refused as e:
            self._refuse(client, e.status, str(e))
            return
        except (OSError, ValueError) as e:
            self._refuse(client, "400 Bad Request", f"bad proxy request: {e}")
            return
        with upstream:
            _relay(client, upstream, self.idle_timeout_s)

    def _connect(self, scheme: str, host: str, port: int) -> socket.socket:
        """A connection to an address of `host` that the policy allows; Refused when none may be reached."""
        try:
            addresses = checked_addresses(scheme, host, port, self.policy)
        except UnresolvedHost as e:
            raise Refused("502 Bad Gateway", str(e)) from None
        except ValueError as e:
            raise Refused("403 Forbidden", str(e)) from None
        last: OSError | None = None
        for address in addresses:
            try:
                return socket.create_connection((str(address), port), timeout=self.connect_timeout_s)
            except OSError as e:
                last = e
        # the same answer for a closed port and an unreachable host: a feed is no port scanner
        raise Refused("502 Bad Gateway", f"cannot connect to {host}: {type(last).__name__}")

    def _refuse(self, client: socket.socket, status: str, reason: str) -> None:
        with self._lock:
            self.refused += 1
            if status.startswith("403"):
                self.last_refused = reason
        log.info("egress proxy refused a request: %s", reason)
        body = (reason + "\n").encode()
        try:
            client.sendall(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                           f"Connection: close\r\n\r\n".encode() + body)
        except OSError:
            pass


PROXIED_SCHEMES = ("http", "https")


def through_proxy(feed_url: str, url: str, options: dict[str, str], proxy: EgressProxy) -> tuple[str, dict[str, str]]:
    """av.open arguments that send every http(s) request of the feed through `proxy`: FFmpeg's http_proxy option
    (nested HLS opens inherit it; https tunnels through it with CONNECT, FFmpeg's httpproxy protocol), and no
    persistent HLS connections (each request is checked on its own). Other schemes are returned unchanged."""
    if scheme_of(feed_url) not in PROXIED_SCHEMES:
        return url, options
    whitelist = options.get("protocol_whitelist")
    return url, {**options, "http_proxy": proxy.url, "http_persistent": "0",
                 **({"protocol_whitelist": whitelist + ",httpproxy"} if whitelist else {})}


def _request_line(rfile) -> tuple[str, str, str]:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ValueError("request line too long")
    parts = line.decode("latin-1").strip().split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("malformed request line")
    return parts[0].upper(), parts[1], parts[2]


def _headers(rfile) -> list[tuple[str, str]]:
    headers = []
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ValueError("header line too long")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            return headers
        if len(headers) >= MAX_HEADERS or ":" not in text:
            raise ValueError("malformed headers")
        name, value = text.split(":", 1)
        headers.append((name.strip(), value.strip()))


def _content_length(headers: list[tuple[str, str]]) -> int:
    """The request body's length; ValueError for a chunked one (FFmpeg's requests carry none or a length)."""
    values = {k.lower(): v for k, v in headers}
    if "transfer-encoding" in values:
        raise ValueError("chunked request bodies are not relayed")
    length = int(values.get("content-length", "0") or 0)
    if not 0 <= length <= 1 << 20:
        raise ValueError("request body too large")
    return length


def _authority(target: str, default_port: int) -> tuple[str, int]:
    """(host, port) of a CONNECT target "host:port" or "[v6]:port"."""
    parts = urlsplit("//" + target)
    if not parts.hostname:
        raise ValueError(f"bad CONNECT target {target[:200]!r}")
    return parts.hostname, parts.port or default_port


def _relay(a: socket.socket, b: socket.socket, idle_timeout_s: float) -> None:
    """Copy bytes both ways until either side closes (or stays silent for idle_timeout_s)."""
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    for s in (a, b):
        s.settimeout(idle_timeout_s)
    back = threading.Thread(target=pump, args=(b, a), daemon=True)
    back.start()
    pump(a, b)
    back.join(idle_timeout_s)


__all__ = ["PROXIED_SCHEMES", "EgressProxy", "through_proxy"]
