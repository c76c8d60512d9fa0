"""Clips: an MP4 of one source's footage over [start, end], from a live feed's recordings or an archive source's
file (docs/architecture.md, "Recordings and clips").

The packets are copied, not re-encoded: the clip starts at the keyframe at or before `start` and ends with the
packet that covers `end`, so it may hold a little more than asked; `Clip.start`/`Clip.end` say what it covers.
`exact=True` decodes and re-encodes (H.264) only the frames inside the window. Recordings are joined while they
follow each other (a gap over GAP_S or other codec parameters end the clip there); the chunk a live feed is
still writing is read up to its last complete fragment. The MP4 has its index at the
front (faststart), so a browser plays it as it arrives, and it is a plain file, so HTTP range requests work.
Clips are cached by what they are made of under `<data_dir>/clips` for CACHE_S.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from fractions import Fraction

import av

from pipeline.recordings import archive_pointer, list_recordings
from pipeline.video.recording import complete_length

GAP_S = 1.0                     # recordings further apart than this are not joined into one clip
CACHE_S = 600.0                 # a cached clip unused this long is removed
EXACT_CRF = "20"


class NoFootage(LookupError):
    """The window holds no recorded or archived footage of the source."""


@dataclass(frozen=True)
class Clip:
    path: str
    start: float                # the times the clip actually covers, on the source's axis
    end: float


@dataclass(frozen=True)
class Piece:
    """A file holding footage: source time = origin + stream time of a packet."""
    path: str
    origin: float
    length: int | None = None   # the bytes to read (an open chunk's complete fragments); None: the whole file


def make_clip(settings, source_id: str, start: float, end: float, exact: bool = False) -> Clip:
    """The clip of [start, end]; NoFootage when nothing covers it, ValueError for a bad window."""
    if not end > start:
        raise ValueError(f"end ({end}) must be after start ({start})")
    if end - start > settings.clip_max_seconds:
        raise ValueError(f"a clip of {end - start:g} s is longer than the limit {settings.clip_max_seconds:g} s "
                         f"(clip_max_seconds)")
    pieces = footage(settings, source_id, start, end)
    if not pieces:
        raise NoFootage(f"no footage of {source_id!r} between {start:g} and {end:g}")
    cache = settings.data_dir / "clips"
    cache.mkdir(parents=True, exist_ok=True)
    _clean(cache)
    key = _key(source_id, start, end, exact, pieces)
    path, meta = cache / f"{key}.mp4", cache / f"{key}.json"
    try:
        covered = json.loads(meta.read_text())
        os.utime(path)
        return Clip(str(path), covered["start"], covered["end"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    part = cache / f".{key}.{os.getpid()}.part"
    try:
        with av.open(str(part), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            covered = (_reencode if exact else _remux)(out, pieces, start, end)
        if covered is None:
            raise NoFootage(f"no footage of {source_id!r} between {start:g} and {end:g}")
        meta.write_text(json.dumps({"start": covered[0], "end": covered[1]}))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return Clip(str(path), *covered)


def footage(settings, source_id: str, start: float, end: float) -> list[Piece]:
    """The files that hold the window: one run of recordings that follow each other, or the archive file."""
    files = list_recordings(settings, source_id, start, end)
    if files:
        run = [files[0]]
        for f in files[1:]:
            if f.start - run[-1].end > GAP_S:
                break
            run.append(f)
        return [piece for piece in map(_piece, run) if piece.length != 0]
    pointer = archive_pointer(settings, source_id)     # a local file that is still there (not an object-store URI)
    if pointer is None or "://" in pointer.path or not os.path.isfile(pointer.path):
        return []
    return [Piece(pointer.path, -pointer.media_start)]


def _piece(f) -> Piece:
    try:
        return Piece(f.path, f.start, complete_length(f.path) if f.open else None)
    except FileNotFoundError:                       # an open chunk that closed since the listing: read it next time
        return Piece(f.path, f.start, 0)


def _key(source_id: str, start: float, end: float, exact: bool, pieces: list[Piece]) -> str:
    parts = [source_id, repr(start), repr(end), str(exact)]
    for p in pieces:
        if p.length is not None:                    # an open chunk: the same fragments, the same clip
            parts += [p.path, str(p.length)]
        else:
            st = os.stat(p.path)
            parts += [p.path, str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _clean(cache) -> None:
    cutoff = time.time() - CACHE_S
    for entry in os.scandir(cache):
        try:
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def _opened(piece: Piece, start: float):
    """The piece opened at the keyframe at or before `start`: (container, stream), or (None, None) when it cannot
    seek there (a time far past its end)."""
    source = piece.path
    if piece.length is not None:
        try:
            source = _Prefix(open(piece.path, "rb"), piece.length)
        except FileNotFoundError:                   # the open chunk closed since the listing: the clip ends here
            yield None, None
            return
    with contextlib.ExitStack() as stack:
        if isinstance(source, _Prefix):
            stack.enter_context(source)
        container = stack.enter_context(av.open(source))
        stream = container.streams.video[0]
        target = max(0.0, start - piece.origin)
        try:
            container.seek(int(Fraction(target) / stream.time_base), stream=stream, backward=True, any_frame=False)
        except (OverflowError, av.error.FFmpegError):
            container, stream = None, None
        yield container, stream


class _Prefix(io.RawIOBase):
    """The first `length` bytes of a file, for FFmpeg: an open chunk as far as its complete fragments go."""

    def __init__(self, file, length: int):
        super().__init__()
        self._file, self._length = file, length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._file.tell()))
        return self._file.readinto(memoryview(buffer)[:n]) if n else 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            offset, whence = self._length + offset, io.SEEK_SET
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def _remux(out, pieces: list[Piece], start: float, end: float) -> tuple[float, float] | None:
    """Copy the packets from the keyframe at or before start to the one covering end; the covered times."""
    out_stream, template, first, last_dts, covered_end = None, None, None, None, None
    for piece in pieces:
        with _opened(piece, start) as (container, stream):
            if container is None:
                break
            if template is not None and not _same_codec(template, stream):
                break
            tb = stream.time_base
            started = first is not None
            for packet in container.demux(stream):
                if packet.pts is None or packet.dts is None or packet.size == 0:
                    continue
                t, t_dts = piece.origin + float(packet.pts * tb), piece.origin + float(packet.dts * tb)
                if t_dts >= end or t >= end and packet.is_keyframe:
                    break
                if not started:
                    if not packet.is_keyframe:
                        continue
                    started = True
                    if first is None:
                        first, template = t, stream
                        out_stream = out.add_stream_from_template(stream)
                # times continue across pieces of one source: rebase them on the clip's first keyframe
                dts = max(round((t_dts - first) / tb), -1 if last_dts is None else last_dts + 1)
                pts = max(round((t - first) / tb), dts)
                packet.stream, packet.pts, packet.dts = out_stream, pts, dts
                packet.time_base = tb
                out.mux(packet)
                last_dts = dts
                covered_end = max(covered_end or t, t + float((packet.duration or 0) * tb))
    if first is None or covered_end <= start:             # the file ends before the window
        return None
    return first, covered_end


def _same_codec(a, b) -> bool:
    ca, cb = a.codec_context, b.codec_context
    return (ca.name, ca.width, ca.height, ca.extradata) == (cb.name, cb.width, cb.height, cb.extradata)


def _reencode(out, pieces: list[Piece], start: float, end: float) -> tuple[float, float] | None:
    """Decode the pieces and encode only the frames inside [start, end) (exact=True)."""
    out_stream, first, last_t, period = None, None, None, 1 / 30
    for piece in pieces:
        with _opened(piece, start) as (container, stream):
            if container is None:
                break
            if stream.average_rate:
                period = float(1 / stream.average_rate)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = piece.origin + float(frame.pts * frame.time_base)
                if t >= end:
                    break
                if t < start or (last_t is not None and t <= last_t):
                    continue
                if out_stream is None:
                    out_stream = out.add_stream("libx264", rate=stream.average_rate or 30)
                    out_stream.width, out_stream.height, out_stream.pix_fmt = frame.width, frame.height, "yuv420p"
                    out_stream.time_base = Fraction(1, 1000)
                    out_stream.options = {"preset": "veryfast", "crf": EXACT_CRF}
                    first = t
                frame = frame.reformat(format="yuv420p")
                frame.pts, frame.time_base = round((t - first) * 1000), Fraction(1, 1000)
                for packet in out_stream.encode(frame):
                    out.mux(packet)
                last_t = t
    if out_stream is None:
        return None
    for packet in out_stream.encode(None):
        out.mux(packet)
    return first, last_t + period
