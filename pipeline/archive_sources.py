"""Which files an archive job reads: paths, folders, globs and pyarrow.fs URIs expanded into files, and their
source ids.

Only regular files are kept, and with file_roots (REST jobs) only those under the roots once links are resolved
(docs/architecture.md, "Streams and protocols"); every path left out is reported, never silently dropped.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from pipeline.video.protocols import path_kind, under_roots

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".ts", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp",
                    ".mxf", ".h264", ".hevc"}


def expand_sources(paths: list[str], file_roots: list | None = None) -> tuple[list[str], list[dict]]:
    """Files, folders (recursive, video extensions), globs, and pyarrow.fs URIs -> (files, failures).

    file_roots: when given, every local file a path expands to must lie under one of them once links and ".." are
    resolved; the others are left out, and the failure names only the path as given (never what lies outside).
    Only regular files are kept: a FIFO blocks whoever opens it and a device never ends (docs/architecture.md,
    "Streams and protocols")."""
    files, failed = [], []
    for p in paths:
        if "://" in p and not p.startswith("file://"):
            files.extend(_expand_uri(p, failed))
            continue
        p = p[len("file://"):] if p.startswith("file://") else p
        failures_before = len(failed)
        if any(ch in p for ch in "*?["):
            hits = _regular_files(p, glob.glob(p, recursive=True), file_roots, failed)
            empty = "glob matched no files"
        elif os.path.isdir(p):
            named = [str(f) for f in Path(p).rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS]
            hits = _regular_files(p, named, file_roots, failed)
            empty = "folder holds no video files"
        else:
            hits = _regular_files(p, [p], file_roots, failed)
            kind = path_kind(p) if len(failed) == failures_before else None
            empty = f"{kind}, not a regular file" if kind else "no such file or directory"
        if not hits and len(failed) == failures_before:
            failed.append({"path": p, "error": empty})
        files.extend(os.path.abspath(h) for h in hits)
    seen, unique = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique, failed


def _regular_files(given: str, named: list[str], file_roots: list | None, failed: list[dict]) -> list[str]:
    """The regular files among the paths `given` names (sorted), folders left out quietly. Those outside
    `file_roots` are left out first, unexamined; then FIFOs, devices and sockets, each kind of exclusion with one
    failure under the path as given."""
    if file_roots is not None:
        outside = [h for h in named if not under_roots(h, file_roots)]
        if outside:
            failed.append({"path": given, "error": f"{len(outside)} file(s) it names lie outside the allowed roots "
                                                   "(links resolved)"})
        named = [h for h in named if h not in outside]
    kinds = {h: path_kind(h) for h in named}
    special = [h for h, kind in kinds.items() if kind not in (None, "a regular file", "a folder")]
    if special and named != [given]:        # a path naming one such file says what it is instead
        failed.append({"path": given, "error": f"{len(special)} of the entries it names are not regular files "
                                               "(FIFOs, devices or sockets)"})
    return sorted(h for h, kind in kinds.items() if kind == "a regular file")


def _expand_uri(uri: str, failed: list[dict]) -> list[str]:
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type == pafs.FileType.Directory:
            scheme = uri.split("://", 1)[0]
            sel = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            hits = sorted(f"{scheme}://{i.path}" for i in sel
                          if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in VIDEO_EXTENSIONS)
            if not hits:
                failed.append({"path": uri, "error": "folder holds no video files"})
            return hits
        failed.append({"path": uri, "error": "no such file or directory"})
    except Exception as e:  # noqa: BLE001 - any filesystem error is this path's failure, not the job's
        failed.append({"path": uri, "error": f"cannot open: {e}"})
    return []


def source_id_for(path: str, given: str | None, n_files: int) -> str:
    stem = Path(path.split("://", 1)[-1]).stem
    if given is None:
        return stem
    return given if n_files == 1 else f"{given}/{stem}"
