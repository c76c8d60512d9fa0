"""The slow-client deadlines (deploy/http_deadlines.py: request head, send stall) on both of uvicorn's HTTP
protocols, httptools and h11, over real sockets to a real uvicorn server in a thread of this process (no Ray); the
Serve proxy that installs them is tested over HTTP in tests/test_api_hardening.py."""
from __future__ import annotations

import socket
import time

import pytest
from uvicorn.importer import import_from_string

from deploy import http_deadlines
from pipeline.settings import load_settings
from raw_http import BIG_BYTES, big_download, read_response, read_responses, read_until_closed, received, serving

HEADER_TIMEOUT_S = 0.5
KEEP_ALIVE_S = 2
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture(scope="module", params=["h11", "httptools"])
def port(request):
    protocol = import_from_string(http_deadlines.PROTOCOLS[request.param])
    protocol = type(protocol.__name__, (protocol,), {"header_timeout_s": HEADER_TIMEOUT_S})
    with serving(protocol, KEEP_ALIVE_S) as port:
        yield port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def assert_cut_off(sock: socket.socket) -> None:
    data, closed_after = read_until_closed(sock, HEADER_TIMEOUT_S + 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), data[:300]
    assert b"api_header_timeout_seconds" in body, data
    assert closed_after < HEADER_TIMEOUT_S + 1.0, closed_after


def test_a_connection_that_sends_nothing_is_cut_off(port):
    with connect(port) as sock:
        assert_cut_off(sock)


def test_a_trickled_head_is_cut_off_whatever_each_byte_does(port):
    with connect(port) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < HEADER_TIMEOUT_S + 0.5:    # each byte in time, the head never
                sock.sendall(b"a")
                time.sleep(0.2)
        except OSError:                      # cut off while sending: what the test wants
            pass
        assert_cut_off(sock)


def test_an_oversized_head_is_refused_and_a_large_one_served(port, request):
    """A head past MAX_HEAD_BYTES is refused at once, 431, and the connection closed, though its deadline is far
    (httptools would keep any head; h11 stops earlier, at uvicorn's own 16 KiB bound, with a 400 that a reset may
    overtake). A head of 12 KiB is served on both."""
    with connect(port) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 12_000 + b"\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    h11 = "h11" in request.node.callspec.id
    with connect(port) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * (http_deadlines.MAX_HEAD_BYTES + 1000))
        t0 = time.monotonic()
        try:
            data, _ = read_until_closed(sock, HEADER_TIMEOUT_S + 5)
        except ConnectionResetError:         # h11 closes with the rest of the head unread
            assert h11
            data = b""
        closed_after = time.monotonic() - t0
    assert closed_after < HEADER_TIMEOUT_S, closed_after          # refused for its size, not its time
    if not h11:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431") and b"connection: close" in head.lower(), data[:300]
        assert b"larger than 65536 bytes" in body, data
    else:
        assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:300]


def test_kept_alive_connections_idle_up_to_the_keep_alive_then_the_deadline_runs_again(port):
    with connect(port) as sock:
        for pause in (0.0, HEADER_TIMEOUT_S * 2):       # longer than the deadline, shorter than the keep-alive
            time.sleep(pause)
            sock.sendall(GET)
            assert read_response(sock).startswith(b"HTTP/1.1 200"), pause
        sock.sendall(b"GET /x HTTP/1.1\r\n")           # the next head starts, and never ends
        assert_cut_off(sock)


def test_pipelined_and_split_heads_are_answered(port):
    with connect(port) as sock:
        sock.sendall(GET + GET)
        assert [r[:12] for r in read_responses(sock, 2)] == [b"HTTP/1.1 200"] * 2
        for piece in (GET[:10], GET[10:20], GET[20:]):   # a head in pieces, all within the deadline
            sock.sendall(piece)
            time.sleep(0.1)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT_S * 1.5)               # idle between requests: still open
        sock.sendall(GET)
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_a_client_that_stops_reading_a_response_is_dropped(port):
    with big_download(port) as sock:
        time.sleep(KEEP_ALIVE_S + 1)          # reads nothing: its output waits on the server past the keep-alive
        assert received(sock) < BIG_BYTES      # dropped (reset) before the whole response was taken


def test_a_slow_but_reading_client_gets_the_whole_response(port):
    with big_download(port) as sock:
        time.sleep(KEEP_ALIVE_S / 2)           # a pause shorter than the keep-alive, then reads
        assert received(sock) > BIG_BYTES


def test_install_puts_both_protocols_in_uvicorns_table(monkeypatch):
    from uvicorn import config

    monkeypatch.setattr(config, "HTTP_PROTOCOLS", dict(config.HTTP_PROTOCOLS))
    deadline = http_deadlines.HttpDeadlines
    monkeypatch.setattr(deadline, "header_timeout_s", deadline.header_timeout_s)
    monkeypatch.setenv(http_deadlines.TIMEOUT_ENV, "2.5")
    assert http_deadlines.install() == []               # Serve's callback contract: a list of middlewares
    assert http_deadlines.HttpDeadlines.header_timeout_s == 2.5
    for name in ("auto", "h11", "httptools"):
        cls = import_from_string(config.HTTP_PROTOCOLS[name])
        assert issubclass(cls, http_deadlines.HttpDeadlines), name
    assert import_from_string(config.HTTP_PROTOCOLS["auto"]).__name__ == "HttpToolsWithDeadlines"
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv(http_deadlines.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=http_deadlines.TIMEOUT_ENV):
            http_deadlines.install()
    monkeypatch.delenv(http_deadlines.TIMEOUT_ENV)
    http_deadlines.install()
    assert http_deadlines.HttpDeadlines.header_timeout_s == 10.0          # the settings' default


def test_the_setting_is_checked_and_reaches_the_proxy_env(tmp_path):
    from deploy.app import controller_options

    settings = load_settings(data_dir=tmp_path, api_header_timeout_seconds=3)
    env = controller_options(settings)["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deploy.http_deadlines:install",
                   "TUBESCOPE_API_HEADER_TIMEOUT_SECONDS": "3.0"}
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="api_header_timeout_seconds"):
            load_settings(data_dir=tmp_path, api_header_timeout_seconds=bad)
