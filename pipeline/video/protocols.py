"""Where video comes from: one table of URL schemes -> the FFmpeg protocol each needs -> its open options.

Every other module asks this table: the feed registry (which schemes a URL may use), the settings (which schemes
`feed_schemes` may name), the stream reader (how to open one) and the check that PyAV's FFmpeg has the protocol at
all. Adding a protocol is one row in PROTOCOLS, plus an options function when it needs settings of its own
(docs/architecture.md, "Adding things").
"""
from __future__ import annotations

import functools
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

OpenOptions = Callable[[str, float, int], tuple[str, dict[str, str]]]   # (url, read_s, hls_hold) -> (url, options)


def _no_options(url: str, read_s: float, hls_hold_counters: int) -> tuple[str, dict[str, str]]:
    return url, {}


def _rtsp_options(url: str, read_s: float, hls_hold_counters: int) -> tuple[str, dict[str, str]]:
    return url, {
        "rtsp_transport": "tcp",
        # Socket timeout in µs. A stalled server raises after about twice this value, so half the read timeout
        # makes it fire at about read_s (PyAV's own timeout alone takes ~2x read_s).
        "timeout": str(max(250_000, int(read_s * 1e6 / 2))),
        "analyzeduration": "100000",      # fast probe: open in ~0.2 s instead of ~1.2 s, a short start burst
        "probesize": "32768",
    }


def _http_options(url: str, read_s: float, hls_hold_counters: int) -> tuple[str, dict[str, str]]:
    # HLS demuxer options (the other HTTP demuxers ignore them): start at the live edge, and end after a few
    # playlist reloads without a new segment instead of reloading a dead writer's playlist forever.
    return url, {"live_start_index": "-1", "m3u8_hold_counters": str(hls_hold_counters)}


def _udp_options(url: str, read_s: float, hls_hold_counters: int) -> tuple[str, dict[str, str]]:
    # A big FIFO (counted in 188-byte packets) so a burst is not an EIO; overruns drop data, not the stream.
    # These are URL options of FFmpeg's udp protocol; values the URL already sets win.
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    extra = {k: v for k, v in (("fifo_size", "1000000"), ("overrun_nonfatal", "1")) if k not in query}
    if extra:
        q = parts.query + ("&" if parts.query else "") + urlencode(extra)
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, q, parts.fragment))
    return url, {}


CONTAINER_FORMATS = "mov,matroska,avi,mpegts,flv,mpeg,mpegvideo,asf,mxf,h264,hevc,ivf,ogg,m4v,rawvideo"


@dataclass(frozen=True)
class Protocol:
    ffmpeg: str                              # the FFmpeg protocol the scheme runs on (rtsp over tcp, rtsps over tls)
    options: OpenOptions = _no_options       # how to open it
    network: bool = True                     # False: a local file (played at real time by the stream reader)
    # FFmpeg's protocol_whitelist while reading: the protocol itself and what it opens underneath. A playlist or
    # an RTSP server can name other URLs; nothing outside this list (file:, concat:, data:, ...) is ever opened.
    whitelist: str = ""
    formats: str = ""                        # FFmpeg's format_whitelist (demuxers); empty: any


PROTOCOLS: dict[str, Protocol] = {
    "rtsp": Protocol("tcp", _rtsp_options, whitelist="rtsp,rtp,tcp,udp"),
    "rtsps": Protocol("tls", _rtsp_options, whitelist="rtsp,rtsps,rtp,tcp,udp,tls"),
    "http": Protocol("http", _http_options, whitelist="http,https,tcp,tls,crypto"),   # redirects may go to https
    "https": Protocol("https", _http_options, whitelist="https,http,tcp,tls,crypto"),
    "udp": Protocol("udp", _udp_options, whitelist="udp"),
    "srt": Protocol("srt", whitelist="srt"),
    # local files: video containers only, so a playlist (hls), a list (concat) or an image pattern that names other
    # files is never read from an allowed folder
    "file": Protocol("file", network=False, whitelist="file", formats=CONTAINER_FORMATS),
}
NO_PROTOCOLS = "none"             # the whitelist of a container read through a Python file object: no nested opens
NETWORK_SCHEMES: tuple[str, ...] = tuple(s for s, p in PROTOCOLS.items() if p.network)
ALL_SCHEMES: tuple[str, ...] = tuple(PROTOCOLS)


# What FFmpeg reads as a protocol prefix: scheme characters then ":" ("concat:", "file:/x", "http:host/x"), or
# "subfile,<options>:". Anything else is a path of the file protocol.
_FFMPEG_PREFIX = re.compile(r"([A-Za-z0-9+.\-]+)(?:,[^:]*)?:")


def scheme_of(url: str) -> str:
    """The scheme FFmpeg would use for `url`, in lower case: "file" for a path; for anything else the prefix
    before ":", whether or not "//" follows (so "concat:a|b" is "concat", "file:/x" is "file")."""
    m = _FFMPEG_PREFIX.match(url)
    return m.group(1).lower() if m else "file"


def _is_path(url: str) -> bool:
    return _FFMPEG_PREFIX.match(url) is None


def local_file_path(url: str) -> str | None:
    """The local path of a file source (a path or file:///path), or None for a network source."""
    if _is_path(url):
        return url
    if scheme_of(url) == "file" and url[len("file"):].startswith("://"):
        return unquote(urlsplit(url).path)
    return None


def validate_url(url: Any, schemes: tuple[str, ...] | list[str] = ALL_SCHEMES) -> str:
    """Return the URL stripped of surrounding blanks, or raise ValueError saying what is wrong.

    One parse decides the scheme, the same way FFmpeg will (scheme_of): a path is a local file (allowed only when
    "file" is in `schemes`); anything with a protocol prefix must be `scheme://...` with a scheme of PROTOCOLS that
    `schemes` allows, so FFmpeg's other protocols ("concat:", "subfile,,...:", "cache:", "async:", "data:",
    "tcp:") and prefix forms without "//" ("file:/x", "http:host/x") are refused. Network URLs need a host or a
    port ("udp://:5600" listens on every interface).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"feed url must be a non-empty string, got {url!r}")
    url = url.strip()
    if any(ord(c) < 32 for c in url):
        raise ValueError(f"feed url must not contain control characters, got {redact_url(url)!r}")
    allowed = tuple(s.lower() for s in schemes)
    scheme = scheme_of(url)
    if _is_path(url):
        if "file" not in allowed:
            raise ValueError(f"feed url {url!r} has no scheme; expected one of {', '.join(allowed)}")
        return url
    if scheme not in allowed or scheme not in PROTOCOLS:
        raise ValueError(f"unsupported feed url scheme {scheme!r} in {redact_url(url)!r}; "
                         f"expected one of {', '.join(s for s in allowed if s in PROTOCOLS)}")
    if not url[len(scheme):].startswith("://"):
        raise ValueError(f"feed url {redact_url(url)!r} must be written {scheme}://...")
    parts = urlsplit(url)
    if not PROTOCOLS[scheme].network:
        if not unquote(parts.path):
            raise ValueError(f"file url {url!r} names no path; expected file:///absolute/path.mp4")
        return url
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"feed url {redact_url(url)!r} has a bad port: {e}") from None
    if not parts.hostname and port is None:
        raise ValueError(f"feed url {redact_url(url)!r} names no host; expected {scheme}://HOST[:PORT]/...")
    return url


def check_roots(url: str, roots: list | tuple | None) -> None:
    """ValueError when `url` is a local file outside every folder of `roots` (after resolving links and "..");
    None accepts any local path (trusted callers), network URLs pass."""
    path = local_file_path(url)
    if path is None or roots is None:
        return
    if not under_roots(path, roots):
        real_roots = [os.path.realpath(os.path.expanduser(str(r))) for r in roots]
        raise ValueError(f"local file {path!r} is outside the allowed roots "
                         f"({', '.join(real_roots) or 'none configured'})")


def under_roots(path: str, roots: list | tuple) -> bool:
    """Whether `path` lies in one of the folders `roots` once links and ".." are resolved on both sides."""
    real = os.path.realpath(os.path.expanduser(path))
    return any(real == r or real.startswith(r.rstrip("/") + "/")
               for r in (os.path.realpath(os.path.expanduser(str(x))) for x in roots))


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path: str) -> str | None:
    """What `path` names once links are followed ("a regular file", "a folder", "a FIFO", "a character device",
    ...), or None when nothing is there. Only a stat: never opens it."""
    try:
        mode = os.stat(os.path.expanduser(path)).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:                     # a loop of links, a folder it may not search
        return f"unreadable ({e.strerror})"
    return next((kind for is_kind, kind in _KINDS if is_kind(mode)), "not a regular file")


def check_regular_file(url: str) -> None:
    """ValueError when `url` is a local path that exists but is no regular file once links are followed: opening a
    FIFO blocks until someone writes to it, a device such as /dev/zero never ends, so a reader would hang. A path
    that does not exist yet passes (a feed's reader retries it); network URLs pass. Check check_roots first, so
    that nothing is told about what lies outside the roots."""
    path = local_file_path(url)
    kind = None if path is None else path_kind(path)
    if kind is not None and kind != "a regular file":
        raise ValueError(f"local file {path!r} is {kind}, not a regular file")


def local_open_options() -> dict[str, str]:
    """av.open options of a local file: the file protocol only, video containers only."""
    return {"protocol_whitelist": PROTOCOLS["file"].whitelist, "format_whitelist": PROTOCOLS["file"].formats}


def open_arguments(url: str, read_s: float, hls_hold_counters: int) -> tuple[str, dict[str, str]]:
    """(url, options) for av.open, from the URL's row of PROTOCOLS: its own options and its protocol whitelist.
    A local file opens by its absolute path (never read as a protocol prefix) with only the file protocol."""
    path = local_file_path(url)
    if path is not None:
        return os.path.abspath(os.path.expanduser(path)), local_open_options()
    protocol = PROTOCOLS.get(scheme_of(url))
    if protocol is None:
        raise ValueError(f"unsupported feed url scheme {scheme_of(url)!r} in {redact_url(url)!r}")
    url, options = protocol.options(url, read_s, hls_hold_counters)
    return url, {**options, "protocol_whitelist": protocol.whitelist}


@functools.cache
def ffmpeg_protocols() -> frozenset[str] | None:
    """Names of the input protocols of the libavformat PyAV runs (its avio_enum_protocols), or None when that
    library cannot be found (then nothing is refused up front and a missing protocol shows as the open error)."""
    import ctypes
    import ctypes.util
    import glob
    import os

    import av

    wheel_libs = os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs")
    found = sorted(glob.glob(os.path.join(wheel_libs, "libavformat*"))) or [ctypes.util.find_library("avformat")]
    if not found[0]:
        return None
    try:
        lib = ctypes.CDLL(found[0])
        lib.avio_enum_protocols.restype = ctypes.c_char_p
        lib.avio_enum_protocols.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    except (OSError, AttributeError):
        return None
    cursor, names = ctypes.c_void_p(None), set()
    while (name := lib.avio_enum_protocols(ctypes.byref(cursor), 0)) is not None:    # 0: input protocols
        names.add(name.decode())
    return frozenset(names)


def check_protocol(url: str) -> None:
    """ValueError when the FFmpeg PyAV runs lacks the protocol the URL's scheme needs (srt in the PyAV wheel).

    Registration calls this; a feed stored earlier (or under another PyAV) stays registered and shows "Protocol not
    found" as its open error."""
    scheme = scheme_of(url)
    protocol = PROTOCOLS[scheme].ffmpeg if scheme in PROTOCOLS else scheme
    protocols = ffmpeg_protocols()
    if protocols is not None and protocol not in protocols:
        import av

        raise ValueError(f"{scheme}:// feeds need FFmpeg's {protocol!r} protocol, which the FFmpeg that "
                         f"PyAV {av.__version__} runs here was built without; use another scheme or a PyAV built "
                         "against an FFmpeg that has it")


# query parameters that carry credentials in camera and CDN URLs (tokens, signed-URL signatures, passwords)
_SECRET_PARAM = re.compile(r"(?i)(pass|pwd|secret|token|key|auth|sig|credential|session)")


def redact_url(url: str | None) -> str | None:
    """The URL with its password, and the value of every credential-looking query parameter, replaced by ***."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:            # the host as written: a bad port must not raise here
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = "&".join(f"{k}=***" if _SECRET_PARAM.search(k) else f"{k}={v}" for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def describe_error(exc: BaseException, url: str) -> str:
    """'TypeName: message' with any password in the URL hidden."""
    text = f"{type(exc).__name__}: {exc}"
    safe = redact_url(url)
    return text.replace(url, safe) if safe != url else text
