"""The footage index's files: their layout and names, and the raw operations every index file goes through.

Layout under `root` (a local path or any pyarrow.fs URI):

    source=<percent-escaped source_id>/seg-<h(segment_id)>-<h(model_id)>.parquet   one segment per file
    source=<...>/_manifest-<time_ns>-<uuid>.parquet                                metadata rows of many files
    source=<...>/cap-*, low-*, _thm-*                                              companions of a segment (captions,
                                                                                   long tier, thumbnail)
    source=<...>/.tmp-<uuid>.parquet                                               a write in progress (ignored)
    _tubescope_index                                                               marks the root as an index

Why this shape:
- One file per (segment_id, model_id) with a name derived from both: re-adding is a name check (idempotent),
  two writers adding different segments never touch the same file, and two writers adding the same segment
  write identical content under one name. Deletion is an unlink.
- Every file is written to a hidden temp name and renamed into place, so a crash leaves no partial visible file.
- Hive-style `source=` folders with URI escaping: `pyarrow.dataset.dataset(root, partitioning="hive")` reads it.
- The marker file tells "this index is empty" from "the volume holding it is gone": an unmounted volume leaves an
  empty mount-point folder behind, which must not read as an empty index nor quietly become a new one. Only an
  instance built with create=True (the entry points: `tubescope index`, `tubescope serve`, the demo) makes a root.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


SOURCE_PREFIX = "source="
DATA_PREFIX = "seg-"
CAPTION_PREFIX = "cap-"           # pipeline/captions.py: captions of a segment, removed with its last data file
LONG_PREFIX = "low-"              # pipeline/long_tier.py: long-tier tokens of a segment, removed the same way
THUMBNAIL_PREFIX = "_thm-"        # pipeline/thumbnails.py: a segment's JPEG, removed the same way ("_": not Parquet,
                                  # so pyarrow.dataset discovery must skip it)
COMPANION_PREFIXES = (CAPTION_PREFIX, LONG_PREFIX, THUMBNAIL_PREFIX)
MANIFEST_PREFIX = "_manifest-"
TMP_PREFIX = ".tmp-"
SUFFIX = ".parquet"
MARKER = "_tubescope_index"
MAX_ESCAPED_SOURCE = 200          # folder names must stay under common 255-byte limits
COMPACT_AFTER = 32                # data files not covered by a manifest before a writer compacts
MAX_MANIFESTS = 4                 # concurrent compactions can leave several; a writer merges them past this
STALE_TMP_S = 3600.0              # temp files older than this are crash leftovers; sweep removes them

META_SCHEMA = pa.schema([
    ("segment_id", pa.string()),
    ("source_id", pa.string()),
    ("t0", pa.float64()),
    ("t1", pa.float64()),
    ("grid_thw", pa.list_(pa.int32(), 3)),
    ("tube_ts", pa.list_(pa.float64())),
    ("model_id", pa.string()),
    ("n_tokens", pa.int64()),
    ("token_dim", pa.int64()),
    ("indexed_at", pa.float64()),   # epoch seconds when written: retention ages by this (t0 may be media time)
    ("source_size", pa.list_(pa.int32(), 2)),   # (width, height) of the source frames; null in files written before
])
META_COLUMNS = META_SCHEMA.names
DATA_SCHEMA = META_SCHEMA.append(pa.field("tokens", pa.binary()))      # little-endian fp16, n_tokens*token_dim
MANIFEST_SCHEMA = META_SCHEMA.append(pa.field("file", pa.string()))     # data file name inside the source folder


def _h(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _segment_key(name: str, prefix: str) -> str:
    """The h(segment_id) a data or companion file is named by: the 16 hex digits after its prefix."""
    return name[len(prefix):len(prefix) + 16]


def data_file_name(segment_id: str, model_id: str) -> str:
    """The one file name a (segment_id, model_id) pair is stored under."""
    return f"{DATA_PREFIX}{_h(segment_id)}-{_h(model_id)}{SUFFIX}"


def escape_source(source_id: str) -> str:
    """Folder name for a source: every byte outside [A-Za-z0-9_.-~] percent-escaped (slashes too)."""
    if not isinstance(source_id, str) or not source_id:
        raise ValueError(f"source_id must be a non-empty str, got {source_id!r}")
    escaped = quote(source_id, safe="")
    if len(escaped) > MAX_ESCAPED_SOURCE:
        raise ValueError(f"source_id is too long for a folder name ({len(escaped)} escaped chars, at most "
                         f"{MAX_ESCAPED_SOURCE}): {source_id[:60]!r}...")
    return SOURCE_PREFIX + escaped


class IndexUnavailable(OSError):
    """The index root itself is gone (an unmounted volume, a deleted folder). Without this check a missing root reads
    as an empty index and a write would quietly start a new one on whatever lies beneath the mount point."""


class IndexFiles:
    """An index root on a filesystem, and the raw file operations on it (SegmentIndex builds on these; so do the
    companions in pipeline/captions.py, pipeline/long_tier.py and pipeline/thumbnails.py)."""

    def __init__(self, root: str | os.PathLike, filesystem: pafs.FileSystem | None = None, create: bool = True):
        """create=False opens an index that must already exist: every call raises IndexUnavailable while it is
        missing, and the instance never creates it (long-running services and the workers they start use this)."""
        if filesystem is not None:
            self.fs, self.root = filesystem, str(root).rstrip("/")
        elif isinstance(root, (str, os.PathLike)) and "://" in str(root):
            try:
                self.fs, path = pafs.FileSystem.from_uri(str(root))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"index root {str(root)!r} is not a usable pyarrow.fs URI: {e}") from e
            self.root = path.rstrip("/")
        elif isinstance(root, (str, os.PathLike)) and str(root):
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(str(root))
        else:
            raise ValueError(f"index root must be a local path or a pyarrow.fs URI, got {root!r}")
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        self.marker = f"{self.root}/{MARKER}"
        if create and self.fs.get_file_info(self.marker).type != pafs.FileType.File:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(self.marker) as out:
                out.write(b"tubescope segment index\n")

    # ---- paths and raw file operations --------------------------------------------------------------------------
    def _dir(self, source_id: str) -> str:
        return f"{self.root}/{escape_source(source_id)}"

    def _ls(self, folder: str) -> list[pafs.FileInfo]:
        """Files in a source folder. An empty listing costs one more stat: a vanished root raises IndexUnavailable
        instead of reading as "nothing here" (and before anything is written into it)."""
        sel = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
        infos = [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        if not infos:
            self.check_root()
        return infos

    def _write_atomic(self, folder: str, name: str, table: pa.Table) -> int:
        """Write to a hidden temp name, then rename: readers see the whole file or nothing. Returns the bytes."""
        sink = pa.BufferOutputStream()
        # fp16 tokens barely compress and min/max statistics of them would store each value twice more;
        # the Arrow schema blob is dropped because our readers pass the schema
        small = [c for c in table.column_names if c != "tokens"]
        pq.write_table(table, sink, compression={c: ("snappy" if c in small else "none") for c in table.column_names},
                       write_statistics=small, use_dictionary=False, store_schema=False)
        return self._write_bytes(folder, name, sink.getvalue())

    def _write_bytes(self, folder: str, name: str, payload) -> int:
        """Write bytes under a hidden temp name, then rename (see _write_atomic). Returns the bytes."""
        tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}{SUFFIX}"
        final = f"{folder}/{name}"
        try:
            if self._local:
                try:
                    os.mkdir(folder)           # not makedirs: a vanished root must not be recreated under it
                except FileExistsError:
                    pass
                except FileNotFoundError:
                    self.check_root()
                    raise
                with open(tmp, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())       # the rename must never expose a file whose bytes are not on disk
                os.replace(tmp, final)
            else:
                self.fs.create_dir(folder, recursive=False)
                with self.fs.open_output_stream(tmp) as out:
                    out.write(payload)
                self.fs.move(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):  # on a read-only volume the cleanup fails too: report the write
                self._remove(tmp)
            raise
        return len(payload)

    def _remove_dir_if_empty(self, folder: str) -> None:
        """Never a recursive delete: a writer may have just added a file."""
        try:
            if self._local:
                os.rmdir(folder)
            elif not self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                self.fs.delete_dir(folder)
        except OSError:
            pass

    def check_root(self) -> None:
        """Raise IndexUnavailable unless the root's marker exists (one stat; called where a listing came back empty)."""
        if self.fs.get_file_info(self.marker).type != pafs.FileType.File:
            raise IndexUnavailable(f"the index root {self.root!r} is missing (unmounted, deleted, or never made: "
                                   "`tubescope index` or `tubescope serve` makes one); nothing indexed there can "
                                   "be read and nothing new is written")

    def _source_dirs(self) -> list[tuple[str, str]]:
        """(source_id, folder) of every source folder, empty ones included."""
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        infos = self.fs.get_file_info(sel)
        if not any(i.base_name == MARKER for i in infos):  # a bare mount point may still hold lost+found etc.
            self.check_root()
        return sorted((unquote(d.base_name[len(SOURCE_PREFIX):]), d.path) for d in infos
                      if d.type == pafs.FileType.Directory and d.base_name.startswith(SOURCE_PREFIX))

    def _remove(self, path: str) -> bool:
        try:
            self.fs.delete_file(path)
            return True
        except FileNotFoundError:
            return False
