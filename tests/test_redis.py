"""Redis: the embedded server tubescope owns, the REDIS_URL path, and the test fixture itself. All real servers."""
from __future__ import annotations

import os
import socket

import pytest
import redis

from pipeline.redis_server import RedisServer, redis_client, redis_endpoint, redis_server_binary
from pipeline.settings import load_settings


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone once reaped
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_embedded_server_starts_answers_says_where_and_stops(tmp_path, caplog):
    settings = load_settings(data_dir=tmp_path / "data", redis_url=None)
    caplog.set_level("INFO", logger="tubescope.redis")
    with redis_endpoint(settings) as ep:
        assert ep.embedded
        server = ep.server
        assert ep.url.startswith(f"redis://:{server.password}@127.0.0.1:")
        shown = f"redis://:***@127.0.0.1:{server.port}/0"
        assert any(shown in r.getMessage() and "listening" in r.getMessage() for r in caplog.records)
        c = ep.client(decode_responses=True)
        assert c.ping()
        c.xadd("tubescope:test", {"k": "v"})
        assert c.xlen("tubescope:test") == 1
        assert c.info("server")["redis_version"]
        c.close()
        pid, port = server.pid, server.port
        assert _pid_alive(pid) and _port_open(port)
        assert (settings.redis_dir / "redis-server.log").is_file()
    assert not _pid_alive(pid)
    assert not _port_open(port)


def test_embedded_server_refuses_clients_without_its_password_and_never_shows_it(tmp_path, caplog, capsys):
    from pipeline.events import EventSink

    caplog.set_level("DEBUG")
    settings = load_settings(data_dir=tmp_path / "data", redis_url=None)
    with redis_endpoint(settings) as ep:
        password, port = ep.server.password, ep.server.port
        assert len(password) >= 32
        for stranger in (redis.Redis(host="127.0.0.1", port=port),                       # no password
                         redis.Redis(host="127.0.0.1", port=port, password="guess-" * 6)):  # a wrong one
            with pytest.raises(redis.AuthenticationError):
                stranger.set("tubescope:feeds:x", "rtsp://elsewhere/")
            stranger.close()
        with redis_client(settings) as c:            # the service itself: the URL carries the password
            c.set("k", "v")
            assert c.get("k") == "v"
        with open(f"/proc/{ep.server.pid}/cmdline", "rb") as f:       # never on a command line (`ps`)
            cmdline = f.read().decode(errors="replace")
        with pytest.raises(ValueError, match="bad Redis URL") as info:                 # errors show no password
            EventSink(f"redis://:{password}@127.0.0.1:no-port/0", tmp_path / "outbox")
        print(info.value)
        print(repr(ep.server), repr(settings.model_copy(update={"redis_url": ep.url})))
        log_file = ep.server.log_path.read_text()
    shown = capsys.readouterr()
    everything = "\n".join([cmdline, log_file, shown.out, shown.err, caplog.text])
    assert password not in everything
    assert f"redis://:***@127.0.0.1:{port}/0" in caplog.text


def test_embedded_data_persists_across_runs(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data")
    with redis_client(settings) as c:
        c.set("tubescope:feeds:cam1", "rtsp://example/1")
    assert (settings.redis_dir / "dump.rdb").is_file()
    with redis_client(settings) as c:                       # a new server process, same data dir
        assert c.get("tubescope:feeds:cam1") == "rtsp://example/1"


def test_redis_url_uses_that_server_and_starts_none(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    settings = load_settings(data_dir=tmp_path / "data")
    with redis_endpoint(settings) as ep:
        assert not ep.embedded and ep.server is None
        assert ep.url == redis_server.url
        with redis_client(settings) as c:
            c.set("written-through-settings", "1")
    assert redis_server.client().get("written-through-settings") == b"1"     # it really went to the fixture
    assert not settings.redis_dir.exists()                                  # no embedded server was started
    assert redis_server.running                                             # and we do not own it: still up


def test_unreachable_redis_url_is_a_clear_error(tmp_path):
    with socket.socket() as s:                 # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = load_settings(data_dir=tmp_path, redis_url=f"redis://:pw@127.0.0.1:{port}/0")
    with pytest.raises(ConnectionError, match=r"does not answer") as info:
        with redis_endpoint(settings):
            pass
    assert "pw" not in str(info.value)         # the password is not printed


def test_fixture_server_restarts_on_the_same_port(redis_server):
    c = redis_server.client()
    c.set("x", "1")
    port, url = redis_server.port, redis_server.url
    redis_server.stop()
    assert not redis_server.running and not _port_open(port)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    redis_server.start()
    assert redis_server.port == port and redis_server.url == url
    assert redis.Redis.from_url(url).ping()
    assert redis_server.client().get("x") is None        # test servers keep nothing across restarts


def test_fixture_prefers_the_system_binary(redis_server):
    assert redis_server.binary == redis_server_binary(prefer_system=True)
    assert redis_server.client().ping()


def test_session_server_is_shared(redis_session):
    assert redis_session.client().ping()


def test_a_taken_fixed_port_is_reported(tmp_path, redis_server):
    clash = RedisServer(tmp_path / "clash", port=redis_server.port)
    with pytest.raises(RuntimeError, match="did not start"):
        clash.start()
    assert not clash.running
