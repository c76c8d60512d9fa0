"""Feed URLs and paths: one scheme per URL from one allowlist, FFmpeg's pseudo-protocols refused, a protocol
whitelist on every open, stored URLs checked again at every open, FIFOs and devices refused before opening
(docs/architecture.md, "Streams and protocols")."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.video.hosts import HostPolicy, Service
from pipeline.video.protocols import (check_protocol, check_roots, ffmpeg_protocols, local_file_path, open_arguments,
                                      scheme_of, validate_url)
from streams import FAST_RETRY, RtspServer, wait_for

pytestmark = pytest.mark.timeout(30)


def test_validate_feed_url_allowlist():
    for ok in ("rtsp://cam.local:554/stream1", "rtsps://u:p@10.0.0.2/live", "http://h/live.m3u8",
               "https://h/x.ts", "udp://127.0.0.1:5600", "udp://:5600", "file:///tmp/a.mp4",
               "/tmp/a.mp4", "  rtsp://h/x  "):
        assert validate_url(ok) == ok.strip()
    # srt is allowed, but registration needs PyAV's FFmpeg to have the protocol (the wheel here has no libsrt)
    protocols = ffmpeg_protocols()
    assert {"file", "tcp", "udp", "http", "https", "tls"} <= protocols
    assert validate_url("srt://h:9000") == "srt://h:9000"
    for url in ("rtsp://h/x", "RTSPS://h/x", "https://h/x.m3u8", "udp://:5600", "/tmp/a.mp4", "file:///tmp/a.mp4"):
        check_protocol(url)
    if "srt" in protocols:
        check_protocol("srt://h:9000")
    else:
        with pytest.raises(ValueError, match="srt:// feeds need FFmpeg's 'srt' protocol"):
            check_protocol("srt://h:9000")
    with pytest.raises(ValueError, match="'nosuchproto' protocol"):
        check_protocol("nosuchproto://h/x")
    for bad, words in (("ftp://h/a.mp4", "scheme 'ftp'"), ("rtmp://h/live", "scheme 'rtmp'"),
                       ("javascript://x", "scheme"), ("", "non-empty"), (None, "non-empty"),
                       ("rtsp://", "names no host"), ("http://h:99999/x", "bad port"), ("file://", "no path"),
                       ("rtsp://h/a\nb", "control")):
        with pytest.raises(ValueError, match=words):
            validate_url(bad)
    with pytest.raises(ValueError, match="no scheme"):
        validate_url("/tmp/a.mp4", schemes=("rtsp",))
    with pytest.raises(ValueError) as e:                          # passwords never reach messages
        validate_url("gopher://admin:s3cret@h/x")
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("url,words", [
    # FFmpeg reads "<scheme>:" as a protocol whether or not "//" follows: every form is parsed to one scheme
    ("file:/etc/passwd", "must be written file://"), ("http:evil.example/x", "must be written http://"),
    ("concat:/a.mp4|/b.mp4", "scheme 'concat'"), ("subfile,,start,0,end,0,,:/etc/passwd", "scheme 'subfile'"),
    ("cache:http://h/x", "scheme 'cache'"), ("async:file:/x", "scheme 'async'"), ("tcp:h:80", "scheme 'tcp'"),
    ("data:video/mp4;base64,AAAA", "scheme 'data'"), ("crypto:file:/x", "scheme 'crypto'"),
    ("cam:1.mp4", "scheme 'cam'")])
def test_pseudo_protocols_and_prefix_forms_are_refused(url, words):
    with pytest.raises(ValueError, match=words):
        validate_url(url)
    assert local_file_path(url) is None                           # never taken for a local path either


def test_paths_stay_paths_and_every_open_has_a_protocol_whitelist(tmp_path):
    assert validate_url("/data/a:b.mp4") == "/data/a:b.mp4" and local_file_path("/data/a:b.mp4") == "/data/a:b.mp4"
    assert scheme_of("clips/a:b.mp4") == "file" and scheme_of("Concat:x") == "concat"
    url, opts = open_arguments("clips/x.mp4", 5, 3)               # a relative path opens by its absolute path
    assert url == str((Path.cwd() / "clips/x.mp4").resolve()) and opts["protocol_whitelist"] == "file"
    assert "mov" in opts["format_whitelist"].split(",") and "hls" not in opts["format_whitelist"].split(",")
    assert open_arguments("file:///tmp/a.mp4", 5, 3) == ("/tmp/a.mp4", opts)
    for url in ("rtsp://h/x", "https://h/x.m3u8", "udp://:5600", "srt://h:1"):
        whitelist = open_arguments(url, 5, 3)[1]["protocol_whitelist"].split(",")
        assert "file" not in whitelist and "concat" not in whitelist and whitelist
    # folders are checked after links are resolved
    root, outside = tmp_path / "root", tmp_path / "outside.mp4"
    root.mkdir()
    outside.write_bytes(b"x")
    (root / "link.mp4").symlink_to(outside)
    check_roots(str(root / "x.mp4"), [root])
    for sneaky in (str(root / "link.mp4"), str(root / ".." / "outside.mp4"), f"file://{root}/../outside.mp4"):
        with pytest.raises(ValueError, match="outside the allowed roots"):
            check_roots(sneaky, [root])


def test_a_playlist_or_list_file_opens_nothing_it_names(tmp_path, stream_video):
    """A playlist (hls) or list file (concat) among the archives, local or on object storage, must not pull in other
    files: only video containers are read."""
    from pipeline.video.media import DecodeError, open_container

    playlist = tmp_path / "evil.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nfile://{stream_video}\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "evil.ffconcat"
    concat.write_text(f"ffconcat version 1.0\nfile {stream_video}\n")
    for path in (f"file://{playlist}", str(playlist), str(concat)):
        with pytest.raises(DecodeError):
            container, file_obj = open_container(path)
            list(container.decode(video=0))
    container, file_obj = open_container(f"file://{stream_video}")      # a real video through a file object: fine
    assert any(True for _ in container.decode(video=0))
    container.close()
    file_obj.close()


def test_a_stored_url_is_checked_again_at_every_open(samplers, tmp_path):
    """A feed stored under older rules (a pseudo-protocol, a file outside today's roots, a host on loopback or the
    link, a port of the service itself, a udp listener) is refused when the reader opens it: it never reads, and
    its status says why."""
    with RtspServer() as srv:                   # a live source there: only the check stands between it and a read
        port = srv.port
        for url, cfg, words in (
                ("concat:/a.mp4|/b.mp4", {}, "scheme 'concat'"),
                (str(tmp_path / "x.mp4"), {"file_roots": (str(tmp_path / "elsewhere"),)}, "outside"),
                ("rtsp://h/x", {"schemes": ("https",)}, "scheme 'rtsp'"),
                (srv.url, {"hosts": HostPolicy()}, "'127.0.0.1' is a loopback address"),
                (f"rtsp://localhost:{port}/cam", {"hosts": HostPolicy()}, "'localhost' resolves to 127.0.0.1"),
                ("http://169.254.169.254/latest/meta-data/", {}, "link-local"),
                (srv.url, {"hosts": HostPolicy(allow=("127.0.0.1",), services=(Service("Redis", "", port),))},
                 "this service's own Redis"),
                ("udp://:5600", {}, "feed_udp_listen")):
            _refused_at_open(samplers, url, cfg, words)


def test_a_fifo_or_a_device_is_refused_at_open_and_never_hangs_the_reader(samplers, tmp_path):
    """Opening a FIFO blocks until someone writes to it, and /dev/zero never ends: a reader refuses both (and a link
    to either) before it opens anything, and stops when asked."""
    root = tmp_path / "videos"
    root.mkdir()
    os.mkfifo(root / "cam.mp4")
    (root / "zero.mp4").symlink_to("/dev/zero")
    _refused_at_open(samplers, str(root / "cam.mp4"), {"file_roots": (str(root),)}, "is a FIFO, not a regular file")
    _refused_at_open(samplers, f"file://{root}/cam.mp4", {}, "is a FIFO")              # trusted: no roots
    _refused_at_open(samplers, "/dev/zero", {}, "is a character device")
    _refused_at_open(samplers, str(root / "zero.mp4"), {}, "is a character device")
    _refused_at_open(samplers, str(root / "zero.mp4"), {"file_roots": (str(root),)}, "outside the allowed roots")


def _refused_at_open(samplers, url, cfg, words):
    s = samplers(url, **FAST_RETRY, **cfg)
    st = wait_for(lambda: (st := s.status())["open_failures"] >= 1 and st, 10, what=f"{url} refused")
    assert st["last_error"].startswith("refused: ") and words in st["last_error"], st["last_error"]
    assert st["frames_decoded"] == 0 and st["connects"] == 0


def test_open_arguments_per_protocol():
    url, opts = open_arguments("rtsp://h/cam", 4, 3)
    assert opts["rtsp_transport"] == "tcp" and opts["timeout"] == "2000000"   # µs, half the read timeout
    url, opts = open_arguments("http://h/live.m3u8", 5, 3)
    assert opts == {"live_start_index": "-1", "m3u8_hold_counters": "3",
                    "protocol_whitelist": "http,https,tcp,tls,crypto"}
    url, opts = open_arguments("udp://127.0.0.1:5600", 5, 3)
    assert url == "udp://127.0.0.1:5600?fifo_size=1000000&overrun_nonfatal=1"
    assert opts == {"protocol_whitelist": "udp"}
    url, _ = open_arguments("udp://127.0.0.1:5600?fifo_size=10", 5, 3)
    assert url == "udp://127.0.0.1:5600?fifo_size=10&overrun_nonfatal=1"      # the caller's value wins

