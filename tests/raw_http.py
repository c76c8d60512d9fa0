"""HTTP/1.1 over a raw socket, for tests that play slow or odd clients (read one response, everything until the server
closes the connection, or a big download), and a real uvicorn server in a thread to play them against."""
from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from typing import Iterator

BIG_BYTES, CHUNK = 8 << 20, 1 << 20           # GET /big: more than the kernel's socket buffers hold on loopback


async def answer_small_or_big(scope, receive, send):
    """GET /big: BIG_BYTES in CHUNK pieces; anything else: a small JSON body."""
    if scope["path"] == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % BIG_BYTES)]})
        for offset in range(0, BIG_BYTES, CHUNK):
            await send({"type": "http.response.body", "body": b"x" * CHUNK, "more_body": offset + CHUNK < BIG_BYTES})
        return
    body = b'{"ok": true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(protocol: type, keep_alive_s: int) -> Iterator[int]:
    """answer_small_or_big on a uvicorn server with this HTTP protocol class, in a thread; yields its port."""
    import uvicorn

    from pipeline.redis_server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(answer_small_or_big, host="127.0.0.1", port=port, http=protocol,
                                           lifespan="off", timeout_keep_alive=keep_alive_s, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def big_download(port: int) -> socket.socket:
    """A connection that asked for GET /big through a small receive window (set before connecting)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    return sock


def received(sock: socket.socket) -> int:
    """Bytes read until the connection ends or the whole response (head and body) is in."""
    total = 0
    try:
        while total < BIG_BYTES + 100 and (chunk := sock.recv(1 << 20)):
            total += len(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return total


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; and when it closed (seconds from now)."""
    t0, data = time.monotonic(), b""
    while time.monotonic() - t0 < limit_s:
        ready, _, _ = select.select([sock], [], [], 0.1)
        if ready:
            chunk = sock.recv(65536)
            if not chunk:
                return data, time.monotonic() - t0
            data += chunk
    raise AssertionError(f"the server kept the connection open for {limit_s} s; it sent {data[:200]!r}")


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and a Content-Length body) from a kept-alive connection."""
    return read_responses(sock, 1)[0]


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """The next `count` whole responses (pipelined requests' answers may arrive in one read); nothing more."""
    responses, data = [], b""
    while len(responses) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        found = re.search(rb"^content-length: *(\d+)", head, re.I | re.M)
        if sep and len(rest) >= (size := int(found.group(1)) if found else 0):
            responses.append(head + sep + rest[:size])
            data = rest[size:]
            continue
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; it sent {data[:200]!r}"
        data += chunk
    assert not data, f"more than {count} responses: {data[:200]!r}"
    return responses
