"""Real live-stream servers on 127.0.0.1 for tests (see docs/architecture.md, "Streams and protocols").

- RtspServer: a GStreamer RTSP server (Debian's /usr/bin/python3 with gi; apt packages
  gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,bad,ugly}) serving a live test pattern.
- HlsServer: ffmpeg writing a live HLS playlist from a looped file, served by `python -m http.server`.
- UdpSender: ffmpeg sending MPEG-TS over UDP from a looped file.
- TcpRelay: a TCP forwarder in front of a server; cut() drops every open connection while the server stays up (a
  network blip: RTSP over TCP runs in one connection).
- make_stream_video: a small H.264 file (keyframe every second, no B-frames) for HLS/UDP/file feeds.

Every server is a context manager and can be killed (SIGKILL), paused (SIGSTOP), resumed and restarted on the
same port, which is how tests make a source die, hang and come back. close() kills whatever is still running.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np

from pipeline.video.hosts import HostPolicy

GST_PYTHON = "/usr/bin/python3"        # Debian's interpreter: it has PyGObject (gi); the venv does not
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
APT_HINT = ("apt-get install -y --no-install-recommends gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
            "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly ffmpeg")

# A live test pattern over RTSP at rtsp://127.0.0.1:PORT/cam. argv: PORT WIDTH HEIGHT FPS KEYFRAME_EVERY (frames).
# The media is shared (one pipeline for all clients, like a camera) and torn down when the last client leaves.
_RTSP_SERVER_SCRIPT = r"""
import sys, gi
gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer, GLib
Gst.init(None)
port, width, height, fps, gop = sys.argv[1:6]
launch = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=%s,height=%s,framerate=%s/1 "
          "! x264enc tune=zerolatency speed-preset=ultrafast bitrate=500 key-int-max=%s "
          "! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 )"
          % (width, height, fps, gop))
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(launch)
factory.set_shared(True)
server.get_mount_points().add_factory("/cam", factory)
if server.attach(None) == 0:
    sys.exit("could not bind the RTSP port " + port)
print("ready", flush=True)
GLib.MainLoop().run()
"""


# ---------------------------------------------------------------- ports and files

def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value, or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def _tcp_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def make_stream_video(path: str | Path, seconds: float = 4.0, width: int = 320, height: int = 240,
                      fps: int = 25) -> Path:
    """Encode an H.264 baseline MP4 with a keyframe every second and no B-frames (streams cut and join cleanly).

    Each frame differs (a moving bar over a gradient), so sampled frames are distinguishable.
    """
    path = Path(path)
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps
        stream.codec_context.max_b_frames = 0
        stream.options = {"preset": "ultrafast", "profile": "baseline", "bf": "0", "g": str(fps)}
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        base = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
        bar_w = max(4, width // 16)
        for i in range(n):
            img = base.copy()
            x = (i * 4) % (width - bar_w)
            img[:, x:x + bar_w] = (255, (i * 7) % 256, 0)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


# ---------------------------------------------------------------- process base

class _Server:
    """One child process with kill / pause / resume / restart; subclasses say how to launch and when ready."""

    ready_timeout_s = 15.0

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self):
        if self.alive:
            raise RuntimeError(f"{type(self).__name__} is already running (pid {self.proc.pid})")
        self._log.seek(0)
        self._log.truncate()                     # readiness checks read this run's output only
        self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited with {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{type(self).__name__} not ready after {self.ready_timeout_s} s: {self.output()}")
            time.sleep(0.05)
        return self

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the source abruptly (default) or with another signal, and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGCONT)     # a paused process must run to handle SIGTERM
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """Hang the source (SIGSTOP): its sockets stay open but nothing is sent."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self):
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- servers

class RtspServer(_Server):
    """GStreamer RTSP server with a live test pattern at rtsp://127.0.0.1:PORT/cam."""

    def __init__(self, port: int | None = None, width: int = 320, height: int = 240, fps: int = 25,
                 keyframe_every: int | None = None):
        super().__init__()
        self.keyframe_every = keyframe_every or fps     # frames; a client joining the shared stream waits for one
        if not os.path.exists(GST_PYTHON):
            raise RuntimeError(f"{GST_PYTHON} (with python3-gi) is needed for the RTSP server; {APT_HINT}")
        self.port = port or free_tcp_port()
        self.width, self.height, self.fps = width, height, fps

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def _command(self) -> list[str]:
        return [GST_PYTHON, "-c", _RTSP_SERVER_SCRIPT, str(self.port), str(self.width), str(self.height),
                str(self.fps), str(self.keyframe_every)]

    def _ready(self) -> bool:
        return "ready" in self.output() and _tcp_listening(self.port)

    def start(self):
        try:
            return super().start()
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n(the RTSP server needs: {APT_HINT})") from None


class TcpRelay:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port, one pair of pump threads per connection; cut() closes every
    connection open now (the server never notices a difference from a dropped network path), new ones still pass."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/cam") -> str:
        return f"rtsp://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                return
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            dropped, self._open = self._open, []
        for sock in dropped:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HlsServer:
    """A live HLS stream at http://127.0.0.1:PORT/live.m3u8: an ffmpeg writer (1-s segments, 5 in the playlist,
    old ones deleted) looping `video`, and http.server serving its folder. kill_writer() makes the playlist stale."""

    def __init__(self, video: str | Path, port: int | None = None):
        self.video = Path(video)
        self.port = port or free_tcp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hls-"))
        self.writer = _Command(self._writer_command, lambda: (self.dir / "live.m3u8").exists())
        self.http = _Command(lambda: [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(self.dir)], lambda: _tcp_listening(self.port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/live.m3u8"

    def _writer_command(self) -> list[str]:
        return [FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.video),
                "-c", "copy", "-f", "hls", "-hls_time", "1", "-hls_list_size", "5", "-hls_flags", "delete_segments",
                "-hls_segment_filename", str(self.dir / "seg%05d.ts"), str(self.dir / "live.m3u8")]

    def start(self) -> "HlsServer":
        self.http.start()
        self.start_writer()
        return self

    def start_writer(self) -> None:
        for f in self.dir.iterdir():             # a fresh writer starts a fresh playlist
            f.unlink()
        self.writer.start()

    def kill_writer(self, sig: int = signal.SIGKILL) -> None:
        self.writer.kill(sig)

    def close(self) -> None:
        self.writer.close()
        self.http.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class UdpSender(_Server):
    """ffmpeg sending `video` (looped, real time) as MPEG-TS to udp://127.0.0.1:PORT; the reader binds that port."""

    def __init__(self, video: str | Path, port: int | None = None):
        super().__init__()
        self.video = Path(video)
        self.port = port or free_udp_port()

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.video),
                "-c", "copy", "-f", "mpegts", f"udp://127.0.0.1:{self.port}?pkt_size=1316"]

    def _ready(self) -> bool:
        return True                              # UDP has no listener to wait for: the sender just sends


class _Command(_Server):
    """A child process given by a command factory and a readiness check."""

    def __init__(self, command, ready):
        super().__init__()
        self._cmd, self._is_ready = command, ready

    def _command(self) -> list[str]:
        return self._cmd()

    def _ready(self) -> bool:
        return self._is_ready()


__all__ = ["APT_HINT", "HlsServer", "RtspServer", "TcpRelay", "UdpSender", "free_tcp_port", "free_udp_port",
           "make_stream_video", "wait_for"]


# Reader settings the stream tests share: small frames keep them light on 2 cores; the test servers listen on
# 127.0.0.1, which feeds read only when allowed; retries fast enough for a test to watch several.
SMALL = dict(min_pixels=4 * 784, max_pixels=64 * 784)
LOOPBACK = HostPolicy(allow=("127.0.0.1",))
FAST_RETRY = dict(backoff_initial_s=0.2, backoff_max_s=1.0, open_timeout_s=2.0, read_timeout_s=2.0)
