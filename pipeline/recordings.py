"""Where the footage of a source lies, for clips: the recordings of live feeds and the files of archive sources
(docs/architecture.md, "Recordings and clips").

Layout, under the index root (a local folder; recording is off on an object-store root):

    _recordings/source=<escaped source_id>/<start_ms>-<end_ms>.mp4   a live feed's recording (pipeline/video/recording.py)
    _recordings/source=<escaped source_id>/.<start_ms>.<tag>.part     its open chunk, readable to its last fragment
    _recordings/source=<escaped source_id>/_archive.json              an archive source: {path, media_start}

The leading underscore keeps the folder out of the footage listing. Retention treats recordings like the index:
the same maximum age, and their bytes count toward the same byte budget (sweep_recordings). An open chunk left by a
crash (unchanged for STALE_PART_S) is sealed: cut after its last complete fragment and given its final name.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.index_files import escape_source
from pipeline.video.recording import PART_SUFFIX, Recorder, parse_part_name, parse_recording_name, seal_part

log = logging.getLogger(__name__)

RECORDINGS_DIR = "_recordings"
ARCHIVE_POINTER = "_archive.json"
STALE_PART_S = 3600.0           # a .part unchanged this long is a crash leftover


@dataclass(frozen=True)
class RecordingFile:
    path: str
    start: float                # epoch seconds of its first frame
    end: float                  # epoch seconds of the end of its last frame; an open chunk: of its last write
    bytes: int
    open: bool = False          # the chunk being written: read it only up to complete_length


@dataclass(frozen=True)
class ArchivePointer:
    path: str                   # the archive file (a local path or a pyarrow.fs URI), as the job read it
    media_start: float          # stream time of its first frame: media time t of the source is this + t


def recordings_root(settings) -> Path | None:
    """The folder of every source's recordings and pointers; None when the index root is not a local folder."""
    root = settings.index_root
    return None if isinstance(root, str) else Path(root) / RECORDINGS_DIR


def source_folder(settings, source_id: str) -> Path | None:
    root = recordings_root(settings)
    return None if root is None else root / escape_source(source_id)


def recorder_for(feed: dict, settings) -> Recorder | None:
    """The Recorder of a registered feed, or None when recording is off (the setting, the feed's `record`, or an
    index root that is no local folder)."""
    folder = source_folder(settings, feed["id"])
    if not settings.recording or feed.get("record") is False:
        return None
    if folder is None:
        log.warning("feed %s: not recorded: the index root %s is not a local folder", feed["id"], settings.index_root)
        return None
    return Recorder(folder, settings.recording_chunk_seconds)


def list_recordings(settings, source_id: str, start: float | None = None,
                    end: float | None = None) -> list[RecordingFile]:
    """The recording files of a source that overlap [start, end), in time order, open chunks included."""
    folder = source_folder(settings, source_id)
    out = []
    for entry in _scan(folder):
        times, is_open = parse_recording_name(entry.name), False
        if times is None and (part_start := parse_part_name(entry.name)) is not None:
            try:
                st = entry.stat()
            except FileNotFoundError:               # closed and renamed since the listing
                continue
            times, is_open = (part_start, max(part_start, st.st_mtime)), True
        if times is None or (start is not None and times[1] <= start) or (end is not None and times[0] >= end):
            continue
        out.append(RecordingFile(entry.path, times[0], times[1], entry.stat().st_size, is_open))
    return sorted(out, key=lambda f: f.start)


def _scan(folder: Path | None) -> list[os.DirEntry]:
    if folder is None:
        return []
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


# ---- archive pointers ---------------------------------------------------------------------------------------------
def write_archive_pointer(settings, source_id: str, path: str, media_start: float) -> None:
    """Remember which file an archive source was indexed from (temp name, then rename)."""
    folder = source_folder(settings, source_id)
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ARCHIVE_POINTER}.{os.getpid()}{PART_SUFFIX}"
    tmp.write_text(json.dumps({"path": str(path), "media_start": float(media_start)}))
    os.replace(tmp, folder / ARCHIVE_POINTER)


def archive_pointer(settings, source_id: str) -> ArchivePointer | None:
    folder = source_folder(settings, source_id)
    if folder is None:
        return None
    try:
        data = json.loads((folder / ARCHIVE_POINTER).read_text())
        return ArchivePointer(str(data["path"]), float(data["media_start"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("source %s: unreadable archive pointer: %s", source_id, e)
        return None


def point_at_archives(settings, rows: list[dict]) -> None:
    """Write the pointer of every archive source of a job (rows of {path, source_id}); a file that cannot be probed
    gets none (its decode fails and reports it)."""
    from pipeline.video.media import probe

    for row in rows:
        try:
            write_archive_pointer(settings, row["source_id"], row["path"], probe(row["path"]).start_time)
        except (OSError, ValueError) as e:          # DecodeError is a ValueError
            log.warning("source %s: no archive pointer: %s", row["source_id"], e)


# ---- retention ----------------------------------------------------------------------------------------------------
def all_recordings(settings) -> list[RecordingFile]:
    root = recordings_root(settings)
    files = []
    for folder in _scan_dirs(root):
        for entry in _scan(folder):
            times = parse_recording_name(entry.name)
            if times is not None:
                files.append(RecordingFile(entry.path, times[0], times[1], entry.stat().st_size))
    return files


def _scan_dirs(root: Path | None) -> list[Path]:
    if root is None:
        return []
    try:
        return [Path(e.path) for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def sweep_recordings(settings, doomed: list[RecordingFile], max_age_s: float | None, now: float) -> int:
    """Delete `doomed` and every recording that ended more than max_age_s ago, seal the open chunks a crash left and
    delete other stale .part files; returns files deleted."""
    deleted = 0
    for f in all_recordings(settings):
        if f in doomed or (max_age_s is not None and f.end < now - max_age_s):
            deleted += _unlink(f.path)
    for folder in _scan_dirs(recordings_root(settings)):
        for entry in _scan(folder):
            if entry.name.endswith(PART_SUFFIX) and entry.stat().st_mtime < now - STALE_PART_S:
                _seal_or_unlink(entry.path)
    return deleted


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def _seal_or_unlink(path: str) -> None:
    try:
        if seal_part(path) is not None:
            log.info("sealed the recording %s left unfinished", path)
    except (OSError, ValueError) as e:               # unreadable (av's errors are both): nothing to keep
        log.warning("removing the unreadable recording %s: %s", path, e)
        _unlink(path)
