"""The egress proxy: what a feed's FFmpeg is told to fetch (redirects, playlist entries, CONNECT tunnels) is checked
against the host policy on every request, with real HTTP servers on loopback and real FFmpeg opens."""
from __future__ import annotations

import functools
import http.client
import http.server
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline.video.egress import EgressProxy
from pipeline.video.hosts import HostPolicy
from pipeline.video.sampler_config import SamplerConfig
from pipeline.video.stream import UNREACHABLE, StreamSampler
from streams import make_stream_video, wait_for

ONLY_127_0_0_1 = HostPolicy(allow=("127.0.0.1",))     # 127.0.0.2 is loopback too, so refused by this policy
WHOLE_LOOPBACK = HostPolicy(allow=("127.0.0.0/8",))
OPTIONS = dict(fps=2.0, segment_seconds=1.0, min_pixels=4 * 784, max_pixels=64 * 784, backoff_initial_s=0.2, backoff_max_s=1.0,
               open_timeout_s=3.0, read_timeout_s=3.0)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    redirect_to: str | None = None

    def do_GET(self):
        if self.redirect_to and self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def serve(host: str, folder: Path, redirect_to: str | None = None):
    handler = type("Handler", (_Quiet,), {"redirect_to": redirect_to})
    server = http.server.ThreadingHTTPServer((host, 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder with an MPEG-TS clip, served on 127.0.0.2 (the host the policy refuses)."""
    folder = tmp_path_factory.mktemp("egress")
    mp4 = make_stream_video(folder / "clip.mp4", seconds=3.0, width=160, height=120)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(mp4), "-c", "copy", "-f", "mpegts",
                    str(folder / "clip.ts")], check=True)
    server = serve("127.0.0.2", folder)
    yield folder, f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()


def proxied_get(proxy: EgressProxy, url: str, method: str = "GET") -> tuple[int, bytes]:
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, url) if method == "GET" else conn.request("CONNECT", url)
        response = conn.getresponse()
        return response.status, response.read() if method == "GET" else b""
    finally:
        conn.close()


def test_proxy_relays_allowed_hosts_and_refuses_the_rest(media):
    folder, far = media
    near = serve("127.0.0.1", folder)
    proxy = EgressProxy(ONLY_127_0_0_1)
    try:
        status, body = proxied_get(proxy, f"http://127.0.0.1:{near.server_address[1]}/clip.ts?x=1")
        assert status == 200 and body == (folder / "clip.ts").read_bytes()
        status, body = proxied_get(proxy, far + "/clip.ts")
        assert status == 403 and b"loopback" in body
        assert proxied_get(proxy, far.removeprefix("http://"), "CONNECT")[0] == 403
        assert proxied_get(proxy, "http://169.254.169.254/latest/meta-data/")[0] == 403   # never connected to
        assert proxy.refused == 3 and "169.254.169.254" in proxy.take_refusal() and proxy.take_refusal() is None
    finally:
        proxy.close()
    strict = EgressProxy(HostPolicy())            # no loopback at all: a name is resolved and checked by the proxy
    try:
        assert proxied_get(strict, f"http://localhost:{near.server_address[1]}/clip.ts")[0] == 403
    finally:
        strict.close()
        near.shutdown()


def _sampler(url: str, hosts: HostPolicy) -> StreamSampler:
    s = StreamSampler(SamplerConfig(source_id="cam", url=url, hosts=hosts, **OPTIONS))
    s.start()
    return s


@pytest.mark.parametrize("kind", ["redirect", "playlist"])
def test_feed_cannot_be_sent_to_a_refused_host(media, tmp_path, kind):
    """The feed's own URL names an allowed host, which sends FFmpeg on to a refused one: by a redirect, or by a
    playlist whose segments live there. Refused on the way; the same feed reads frames once the policy allows
    the second host (so the refusal is the policy's, not a broken setup)."""
    folder, far = media
    if kind == "redirect":
        near = serve("127.0.0.1", tmp_path, redirect_to=far + "/clip.ts")
        url = f"http://127.0.0.1:{near.server_address[1]}/redirect/clip.ts"
    else:
        (tmp_path / "list.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n"
                                            f"#EXTINF:3.0,\n{far}/clip.ts\n#EXT-X-ENDLIST\n")
        near = serve("127.0.0.1", tmp_path)
        url = f"http://127.0.0.1:{near.server_address[1]}/list.m3u8"
    try:
        refused = _sampler(url, ONLY_127_0_0_1)
        try:
            wait_for(lambda: refused.status()["open_failures"] >= 1 or refused.frames_sampled, 20, what="open")
            status = refused.status()
            assert refused.frames_sampled == 0, status
            assert status["last_error"] == UNREACHABLE                 # readers learn nothing of the far host
            assert "egress check refused" in status["last_error_detail"] and "127.0.0.2" in status[
                "last_error_detail"]
        finally:
            refused.stop()
        allowed = _sampler(url, WHOLE_LOOPBACK)
        try:
            wait_for(lambda: allowed.frames_sampled >= 2, 20, what="frames through the proxy")
        finally:
            allowed.stop()
    finally:
        near.shutdown()


def test_https_tunnels_are_checked_too(media, tmp_path):
    """https goes through the proxy as a CONNECT tunnel: read when the host is allowed, refused when it is not."""
    import ssl

    folder, _ = media
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    server = serve("127.0.0.1", folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server_address[1]}/clip.ts"
    try:
        allowed = _sampler(url, ONLY_127_0_0_1)
        try:
            wait_for(lambda: allowed.frames_sampled >= 2, 20, what="frames over https through the proxy")
            assert allowed._egress.requests >= 1                      # it did go through the tunnel
        finally:
            allowed.stop()
        refused = _sampler(url, HostPolicy(allow=("127.0.0.2",)))   # the URL's own host is refused at the check,
        try:                                                        # so the proxy never sees it
            wait_for(lambda: refused.status()["open_failures"] >= 1, 20, what="refusal")
            assert refused.frames_sampled == 0 and "loopback" in refused.status()["last_error_detail"]
        finally:
            refused.stop()
    finally:
        server.shutdown()
