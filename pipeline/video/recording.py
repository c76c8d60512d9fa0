"""Recording a live source as it is read: its compressed video packets remuxed (never re-encoded) into short MP4
files (docs/architecture.md, "Recordings and clips").

StreamSampler (pipeline/video/stream.py) hands every demuxed packet to a Recorder after decoding it:

    connect -> begin(stream)   packet -> write(packet, clock)   disconnect -> end()

A file starts at a keyframe and holds about `chunk_seconds`. It is a fragmented MP4 (a fragment at every keyframe
and at least every FRAGMENT_US), so the file being written is readable up to its last complete fragment: it is
named `.<start_ms>.<tag>.part` once the clock knows its start (`.<tag>.part` before), and renamed, once closed, to
`<start_ms>-<end_ms>.mp4`, where the numbers are the epoch milliseconds (the times segments carry, from the feed's
PtsClock) of its first frame and of the end of its last one. So a listing of the folder is the index of the
recording, the open chunk included (clips read it up to `complete_length`). A new connection, pts that go
backwards or jump (a looped file, a restarted sender) and a change of codec parameters start a new file.

A write that fails (a full disk, a read-only volume) pauses recording: the open file is dropped, `error` says why,
and recording starts again at the first keyframe after `retry_s`. Reading and indexing never see the failure.
"""
from __future__ import annotations

import itertools
import logging
import os
import struct
import time

import av

log = logging.getLogger(__name__)

SUFFIX = ".mp4"
PART_SUFFIX = ".part"
MAX_JUMP_S = 10.0                 # a larger forward pts jump inside one connection starts a new file
RETRY_S = 10.0                    # after a failed write, recording waits this long before trying again
FRAGMENT_US = 1_000_000           # longest fragment: how far the open chunk's readable end may lag behind the feed
MUXER_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": str(FRAGMENT_US),
                 "flush_packets": "1"}     # each fragment reaches the file as it is cut, not when a buffer fills


def recording_name(start: float, end: float) -> str:
    """The file name of a recording covering epoch seconds [start, end)."""
    return f"{round(start * 1000)}-{round(end * 1000)}{SUFFIX}"


def parse_recording_name(name: str) -> tuple[float, float] | None:
    """(start, end) epoch seconds of a recording's file name; None for any other name."""
    if not name.endswith(SUFFIX):
        return None
    start, sep, end = name[:-len(SUFFIX)].partition("-")
    if not sep or not start.isdigit() or not end.isdigit():
        return None
    return int(start) / 1000.0, int(end) / 1000.0


def part_name(start: float, tag: str) -> str:
    """The file name of an open chunk that starts at epoch seconds `start`; `tag` keeps writers apart."""
    return f".{round(start * 1000)}.{tag}{PART_SUFFIX}"


def parse_part_name(name: str) -> float | None:
    """The start (epoch seconds) of an open chunk's file name; None for any other name."""
    if not name.startswith(".") or not name.endswith(PART_SUFFIX):
        return None
    start, sep, _ = name[1:-len(PART_SUFFIX)].partition(".")
    return int(start) / 1000.0 if sep and start.isdigit() else None


def complete_length(path: str | os.PathLike) -> int:
    """The bytes of a fragmented MP4 up to the end of its last complete fragment (its last whole `mdat` box); 0 when
    it holds none. A file being written may end inside a box: what follows the last whole one is not read."""
    length, offset = 0, 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while offset + 8 <= size:
            f.seek(offset)
            box_size, kind = struct.unpack(">I4s", f.read(8))
            if box_size == 1 and offset + 16 <= size:
                box_size = struct.unpack(">Q", f.read(8))[0]
            if box_size < 8 or offset + box_size > size:       # 0 ("to the end") or cut short: not complete
                break
            offset += box_size
            if kind == b"mdat":
                length = offset
    return length


def seal_part(path: str) -> str | None:
    """Finish an open chunk its writer left (a crash): cut it after its last complete fragment and give it its final
    name; the new path, or None (the file removed) when it holds no complete fragment or no start in its name."""
    start = parse_part_name(os.path.basename(path))
    length = complete_length(path) if start is not None else 0
    end = None
    if length:
        os.truncate(path, length)
        with av.open(path) as container:
            stream = container.streams.video[0]
            times = [(p.pts, p.pts + (p.duration or 0)) for p in container.demux(stream) if p.pts is not None]
            if times:
                end = start + float((max(t[1] for t in times) - min(t[0] for t in times)) * stream.time_base)
    if end is None:
        os.unlink(path)
        return None
    final = os.path.join(os.path.dirname(path), recording_name(start, end))
    os.replace(path, final)
    return final


class Recorder:
    """Writes one source's packets into MP4 chunks under `folder`. Used from the reading thread only; status() may
    be called from any thread (it reads plain attributes)."""

    def __init__(self, folder: str | os.PathLike, chunk_seconds: float = 60.0, retry_s: float = RETRY_S):
        if not chunk_seconds > 0 or not retry_s >= 0:
            raise ValueError(f"chunk_seconds must be > 0 and retry_s >= 0, got {chunk_seconds}, {retry_s}")
        self.folder = str(folder)
        self.chunk_seconds, self.retry_s = float(chunk_seconds), float(retry_s)
        self._names = itertools.count()
        self._input = None                # the input stream of this connection (its codec parameters)
        self._out = None                  # the open output container, its stream and its .part path
        self._out_stream = None
        self._part: str | None = None
        self._tag = ""
        self._first_pts: int | None = None          # input pts of the file's first packet
        self._last_dts: int | None = None
        self._end_pts: int | None = None            # the end (pts + duration) of the latest packet
        self._start_epoch: float | None = None      # epoch time of the first packet, once the clock knows it
        self._paused_until = 0.0
        # status
        self.files = 0
        self.bytes = 0
        self.errors = 0
        self.error: str | None = None               # why recording is paused; None while it works

    # ---- the reader's calls -------------------------------------------------------------------------------------
    def begin(self, stream) -> None:
        """A new connection: what follows goes to a new file."""
        self.end()
        self._input = stream

    def end(self) -> None:
        """The connection ended: close the open file."""
        self._close()

    def write(self, packet, clock) -> None:
        """Record one demuxed packet of the begun stream; `clock` (PtsClock) maps its pts to epoch seconds."""
        if self._input is None or packet.pts is None or packet.dts is None or packet.size == 0:
            return
        try:
            self._write(packet, clock)
        except (OSError, av.error.FFmpegError) as e:     # av's OSError is both: a full disk, a read-only volume
            self._pause(e)

    def status(self) -> dict:
        return {"recording_files": self.files, "recording_bytes": self.bytes, "recording_errors": self.errors,
                "recording_error": self.error}

    # ---- files --------------------------------------------------------------------------------------------------
    def _write(self, packet, clock) -> None:
        tb = self._input.time_base
        if self._out is not None and self._must_split(packet, tb):
            self._close()
        if self._out is None:
            if not packet.is_keyframe or time.monotonic() < self._paused_until:
                return
            self._open(packet)
        pts, dts, duration = packet.pts, packet.dts, packet.duration or 0
        packet.stream = self._out_stream
        packet.pts, packet.dts = pts - self._first_pts, dts - self._first_pts
        self._out.mux(packet)
        self._last_dts = dts
        self._end_pts = max(self._end_pts or 0, pts + duration)
        if self._start_epoch is None:                   # (after a mux: the file exists once its header is written)
            self._start_epoch = clock.epoch(float(self._first_pts * tb))
            if self._start_epoch is not None:           # now clips can place it: a name with its start
                named = os.path.join(self.folder, part_name(self._start_epoch, self._tag))
                os.replace(self._part, named)
                self._part = named

    def _must_split(self, packet, tb) -> bool:
        if packet.dts <= self._last_dts or float((packet.dts - self._last_dts) * tb) > MAX_JUMP_S:
            return True                             # pts went back or jumped: a loop or a restarted sender
        return packet.is_keyframe and float((packet.pts - self._first_pts) * tb) >= self.chunk_seconds

    def _open(self, packet) -> None:
        os.makedirs(self.folder, exist_ok=True)
        self._tag = f"{os.getpid()}-{id(self)}-{next(self._names)}"
        self._part = os.path.join(self.folder, f".{self._tag}{PART_SUFFIX}")
        self._out = av.open(self._part, "w", format="mp4", options=MUXER_OPTIONS)
        try:
            self._out_stream = self._out.add_stream_from_template(self._input)
        except Exception:
            self._discard()
            raise
        self._first_pts, self._last_dts, self._end_pts, self._start_epoch = packet.pts, None, None, None

    def _close(self) -> None:
        """Finish the open file and give it its final name (or drop it when its times are unknown)."""
        if self._out is None:
            return
        try:
            self._out.close()
            self._out = None
            tb = self._input.time_base
            if self._start_epoch is None or self._end_pts is None:
                self._remove_part()
                return
            end = self._start_epoch + float((self._end_pts - self._first_pts) * tb)
            final = os.path.join(self.folder, recording_name(self._start_epoch, end))
            size = os.path.getsize(self._part)
            os.replace(self._part, final)
            self.files += 1
            self.bytes += size
            self._part = None
            if self.error is not None:
                log.info("recording in %s works again", self.folder)
            self.error = None
        except (OSError, av.error.FFmpegError) as e:
            self._pause(e)

    def _pause(self, e: Exception) -> None:
        self.errors += 1
        reason = getattr(e, "strerror", None) or str(e)
        if self.error is None:
            log.warning("recording in %s paused: %s", self.folder, reason)
        self.error = f"recording paused: {reason}"
        self._paused_until = time.monotonic() + self.retry_s
        self._discard()

    def _discard(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except Exception:                          # a full disk may fail the trailer too; the file goes anyway
                pass
            self._out = None
        self._remove_part()

    def _remove_part(self) -> None:
        if self._part is not None:
            try:
                os.unlink(self._part)
            except OSError:
                pass
            self._part = None
