"""HTTP/1.1 over a raw socket, for tests that play slow or odd clients: read one response, or everything until the
server closes the connection."""
from __future__ import annotations

import re
import select
import socket
import time


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
