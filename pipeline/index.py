"""SegmentIndex: the footage index, an Arrow/Parquet dataset partitioned by source (docs/architecture.md, "Index").

Its files, their names and the raw writes and listings are in pipeline/index_files.py; this module stores, lists,
reads and deletes segments over them.

Manifests hold the metadata columns (no token bytes) of many data files, so listing a source reads one or a few
small files instead of thousands. They are only a cache: a listing trusts the directory for which data files
exist, takes their rows from manifests where covered and reads the metadata columns of the rest directly.
Manifests have unique names and are compacted by whoever writes, so concurrent writers never lose rows.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import metrics
from pipeline.index_files import (COMPACT_AFTER, COMPANION_PREFIXES, DATA_PREFIX, DATA_SCHEMA, MANIFEST_PREFIX,
                                  MANIFEST_SCHEMA, MAX_MANIFESTS, META_COLUMNS, STALE_TMP_S, SUFFIX, TMP_PREFIX,
                                  IndexFiles, _h, _segment_key, data_file_name)
from pipeline.records import IndexedSegment, source_of


def check_number(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number of seconds or None, got {value!r}")
    return float(value)


class SegmentIndex(IndexFiles):
    """Visual tokens of indexed segments, one Parquet file per (segment_id, model_id), partitioned by source."""

    def __init__(self, root: str | os.PathLike, filesystem: pafs.FileSystem | None = None, create: bool = True):
        super().__init__(root, filesystem, create)
        self._tables: dict[tuple, pa.Table] = {}           # parsed metadata by (path, size, mtime): see _read_meta

    def __repr__(self) -> str:
        return f"SegmentIndex({self.root!r}, fs={self.fs.type_name})"

    # ---- metadata --------------------------------------------------------------------------------------------------
    def _meta_table(self, source_id: str) -> tuple[pa.Table, dict[str, pafs.FileInfo], list[str]]:
        """Metadata rows (+ `file`, `bytes`) of every data file present; also the data files and manifests seen."""
        folder = self._dir(source_id)
        for _attempt in range(5):                          # a manifest may vanish under a concurrent compaction
            infos = self._ls(folder)
            data = {i.base_name: i for i in infos if i.base_name.startswith(DATA_PREFIX)
                    and i.base_name.endswith(SUFFIX)}
            manifest_infos = sorted((i for i in infos if i.base_name.startswith(MANIFEST_PREFIX)), key=lambda i: i.path)
            manifests = [i.path for i in manifest_infos]
            try:
                parts = [self._read_meta(i, None, MANIFEST_SCHEMA) for i in manifest_infos]
            except FileNotFoundError:
                continue
            break
        else:
            raise RuntimeError(f"could not read a stable set of manifests under {folder!r}")
        covered = set()
        for p in parts:
            covered.update(p.column("file").to_pylist())
        for name in sorted(set(data) - covered):
            try:
                t = self._read_meta(data[name], META_COLUMNS, DATA_SCHEMA)
            except FileNotFoundError:                     # deleted since the listing
                continue
            parts.append(t.append_column("file", pa.array([name] * t.num_rows, pa.string())))
        table = pa.concat_tables(parts) if parts else MANIFEST_SCHEMA.empty_table()
        rows_files = table.column("file").to_pylist()
        keep, seen = [], set()
        for i, name in enumerate(rows_files):             # drop rows of deleted files and repeats across manifests
            if name in data and name not in seen:
                seen.add(name)
                keep.append(i)
        table = table.take(pa.array(keep, pa.int64()))
        table = table.append_column("bytes", pa.array([data[n].size for n in table.column("file").to_pylist()],
                                                      pa.int64()))
        return table, data, manifests

    def _read_meta(self, info: pafs.FileInfo, columns, schema) -> pa.Table:
        """A metadata file's table, parsed once: files are written whole under fresh names (atomic renames), so one
        with the same path, size and mtime has the same content. Every listing still starts from a directory read,
        so deletions and new files are always seen; this only saves re-parsing (most of a listing's time)."""
        key = (info.path, info.size, info.mtime_ns, tuple(columns or ()))
        table = self._tables.get(key)
        if table is None:
            table = pq.read_table(info.path, filesystem=self.fs, columns=columns, schema=schema)
            if info.mtime_ns is None:                       # a filesystem without mtimes: nothing to key on
                return table
            if len(self._tables) >= 4096:                   # bounded: forget everything, re-parse on demand
                self._tables.clear()
            self._tables[key] = table
        return table

    def _compact(self, source_id: str) -> None:
        """Write one manifest covering every data file present, then drop the manifests it replaces."""
        table, _, manifests = self._meta_table(source_id)
        if table.num_rows:
            self._write_atomic(self._dir(source_id), f"{MANIFEST_PREFIX}{time.time_ns():020d}-"
                                                     f"{uuid.uuid4().hex[:8]}{SUFFIX}",
                               table.select(MANIFEST_SCHEMA.names))
        for m in manifests:                               # all of their live rows are in the new one
            self._remove(m)

    def _needs_compaction(self, source_id: str) -> bool:
        folder = self._dir(source_id)
        infos = self._ls(folder)
        data = {i.base_name for i in infos if i.base_name.startswith(DATA_PREFIX)}
        manifests = [i for i in infos if i.base_name.startswith(MANIFEST_PREFIX)]
        if len(manifests) > MAX_MANIFESTS:
            return True
        covered = set()
        for i in manifests:
            try:
                covered.update(pq.read_table(i.path, filesystem=self.fs, columns=["file"],
                                             schema=MANIFEST_SCHEMA).column(0).to_pylist())
            except FileNotFoundError:
                pass
        return len(data - covered) >= COMPACT_AFTER

    # ---- writing ---------------------------------------------------------------------------------------------------
    def add(self, segments: Iterable[IndexedSegment], indexed_at: float | None = None) -> int:
        """Store segments; returns how many were newly written. A (segment_id, model_id) already stored is skipped."""
        return len(self.add_new(segments, indexed_at))

    def add_new(self, segments: Iterable[IndexedSegment], indexed_at: float | None = None) -> list[IndexedSegment]:
        """Store segments; returns those newly written, in the order given (already stored ones are skipped)."""
        segments = list(segments)
        for s in segments:
            if not isinstance(s, IndexedSegment):
                raise ValueError(f"add() takes IndexedSegment records, got {type(s).__name__}")
        stamp = check_number("indexed_at", indexed_at)
        stamp = time.time() if stamp is None else stamp
        by_source: dict[str, list[tuple[int, IndexedSegment]]] = {}
        for i, s in enumerate(segments):
            by_source.setdefault(s.source_id, []).append((i, s))
        written: set[int] = set()
        for source_id, group in by_source.items():
            folder = self._dir(source_id)
            infos = self._ls(folder)
            present = {i.base_name for i in infos}
            data_bytes = {i.base_name: i.size for i in infos if i.base_name.startswith(DATA_PREFIX)}
            for i, s in group:
                name = data_file_name(s.segment_id, s.model_id)
                if name in present:
                    continue
                row = {**s.to_row(), "indexed_at": stamp}
                table = pa.Table.from_pylist([row], schema=DATA_SCHEMA)
                data_bytes[name] = self._write_atomic(folder, name, table)
                present.add(name)
                written.add(i)
            metrics.record_index_source(source_id, len(data_bytes), sum(data_bytes.values()))
            if self._needs_compaction(source_id):
                self._compact(source_id)
        return [s for i, s in enumerate(segments) if i in written]

    # ---- reading ---------------------------------------------------------------------------------------------------
    def list(self, source_id: str, start: float | None = None, end: float | None = None,
             model_id: str | None = None) -> list[dict]:
        """Metadata rows (no token bytes) of a source's segments that overlap [start, end), sorted by t0.

        A segment [t0, t1) is listed when t1 > start and t0 < end (None = unbounded); a point window
        (start == end) lists the segments with t0 <= start < t1. Rows: segment_id, source_id, t0, t1,
        grid_thw (tuple), tube_ts, model_id, n_tokens, token_dim, indexed_at, source_size ([w, h] or None), bytes.
        """
        start, end = check_number("start", start), check_number("end", end)
        if start is not None and end is not None and end < start:
            raise ValueError(f"window end ({end}) must be >= start ({start})")
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise ValueError(f"model_id must be a non-empty str or None, got {model_id!r}")
        table, _, _ = self._meta_table(source_id)
        out = []
        for r in table.to_pylist():
            if model_id is not None and r["model_id"] != model_id:
                continue
            if start is not None and end is not None and start == end:
                if not (r["t0"] <= start < r["t1"]):
                    continue
            elif (start is not None and r["t1"] <= start) or (end is not None and r["t0"] >= end):
                continue
            del r["file"]
            r["grid_thw"] = tuple(r["grid_thw"])
            out.append(r)
        out.sort(key=lambda r: (r["t0"], r["model_id"]))
        return out

    def _data_path(self, segment_id: str, model_id: str | None) -> str:
        """The file of a segment; without model_id the segment must be stored under exactly one model."""
        source_id = source_of(segment_id)
        folder = self._dir(source_id)
        if model_id is not None:
            path = f"{folder}/{data_file_name(segment_id, model_id)}"
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                self.check_root()
                raise KeyError(f"segment {segment_id!r} is not indexed under model {model_id!r}")
            return path
        prefix = f"{DATA_PREFIX}{_h(segment_id)}-"
        matches = sorted(i.path for i in self._ls(folder) if i.base_name.startswith(prefix))
        if not matches:                                    # (_ls checked the root if the folder was empty)
            raise KeyError(f"segment {segment_id!r} is not in the index")
        if len(matches) > 1:
            models = [pq.read_table(m, filesystem=self.fs, columns=["model_id"], schema=DATA_SCHEMA)
                      .column(0)[0].as_py() for m in matches]
            raise ValueError(f"segment {segment_id!r} is indexed under several models {models}; pass model_id")
        return matches[0]

    def get(self, segment_id: str, model_id: str | None = None) -> IndexedSegment:
        """The full record of one segment, tokens included. KeyError when absent."""
        path = self._data_path(segment_id, model_id)
        try:
            row = pq.read_table(path, filesystem=self.fs, schema=DATA_SCHEMA).to_pylist()[0]
        except FileNotFoundError:
            raise KeyError(f"segment {segment_id!r} was deleted while being read") from None
        return IndexedSegment.from_row(row)

    def tokens(self, segment_id: str, model_id: str | None = None, as_numpy: bool = False):
        """Visual tokens of one segment: torch fp16 tensor [n_tokens, D] (numpy with as_numpy=True)."""
        try:
            arr = self.read_tokens(self._data_path(segment_id, model_id))
        except FileNotFoundError:
            raise KeyError(f"segment {segment_id!r} was deleted while being read") from None
        if as_numpy:
            return arr
        import torch
        return torch.from_numpy(arr)

    def read_tokens(self, path: str) -> np.ndarray:
        """The fp16 tokens [n, D] of one file in the data files' schema (data and long-tier files alike)."""
        t = pq.read_table(path, filesystem=self.fs, columns=["tokens", "n_tokens", "token_dim"], schema=DATA_SCHEMA)
        n, d = t.column("n_tokens")[0].as_py(), t.column("token_dim")[0].as_py()
        raw = t.column("tokens")[0].as_py()
        return np.frombuffer(raw, dtype="<f2").astype(np.float16).reshape(n, d)   # astype copies: writable

    def sources(self) -> list[dict]:
        """Every source with its number of stored segments (per model) and data bytes, sorted by source_id."""
        out = []
        for source_id, folder in self._source_dirs():
            files = [i for i in self._ls(folder) if i.base_name.startswith(DATA_PREFIX)]
            if files:
                out.append({"source_id": source_id, "segments": len(files), "bytes": sum(i.size for i in files)})
        return out

    def sizes(self) -> dict[str, int]:
        """Data bytes per source."""
        return {r["source_id"]: r["bytes"] for r in self.sources()}

    def stats(self) -> dict:
        src = self.sources()
        return {"sources": len(src), "segments": sum(r["segments"] for r in src),
                "bytes": sum(r["bytes"] for r in src)}

    # ---- deleting and retention ------------------------------------------------------------------------------------
    def delete(self, source_id: str, before: float | None = None) -> int:
        """Delete a source's segments: all of them, or those that end at or before `before` (t1 <= before)."""
        before = check_number("before", before)
        folder = self._dir(source_id)
        if before is None:
            infos = self._ls(folder)
            n = sum(self._remove(i.path) for i in infos if i.base_name.startswith(DATA_PREFIX))
            for i in infos:
                if not i.base_name.startswith(DATA_PREFIX):
                    self._remove(i.path)
            self._remove_dir_if_empty(folder)
            self._report_source(source_id)
            return n
        table, _, _ = self._meta_table(source_id)
        doomed = [r["file"] for r in table.select(["t1", "file"]).to_pylist() if r["t1"] <= before]
        n = self._delete_files(source_id, doomed)
        self._report_source(source_id)
        return n

    def _report_source(self, source_id: str) -> None:
        """Export the source's segment count and data bytes (0 and 0 once it is gone)."""
        if not metrics.enabled():
            return                                        # no listing when nothing would be exported
        sizes = [i.size for i in self._ls(self._dir(source_id)) if i.base_name.startswith(DATA_PREFIX)]
        metrics.record_index_source(source_id, len(sizes), sum(sizes))

    def _delete_files(self, source_id: str, names: list[str]) -> int:
        folder = self._dir(source_id)
        n = sum(self._remove(f"{folder}/{name}") for name in names)
        if n:
            self._compact(source_id)                      # keep manifests free of dead rows
            self._remove_orphan_companions(folder)
        return n

    def _remove_orphan_companions(self, folder: str) -> None:
        """Captions, long-tier files and thumbnails go with the last data file of their segment (files are named by
        the segment's hash)."""
        infos = self._ls(folder)
        segments = {_segment_key(i.base_name, DATA_PREFIX) for i in infos if i.base_name.startswith(DATA_PREFIX)}
        for i in infos:
            prefix = next((p for p in COMPANION_PREFIXES if i.base_name.startswith(p)), None)
            if prefix and _segment_key(i.base_name, prefix) not in segments:
                self._remove(i.path)

    def sweep(self, max_age_s: float | Mapping[str, float] | None = None, max_bytes: int | None = None,
              now: float | None = None) -> int:
        """Retention: delete segments indexed more than max_age_s ago (one age for all sources, or a mapping
        source_id -> age; unmapped sources keep everything), then the oldest-indexed segments across all sources
        until the data bytes fit in max_bytes. Also removes crash leftovers (temp files). Returns segments deleted."""
        now = check_number("now", now)
        now = time.time() if now is None else now
        if isinstance(max_age_s, Mapping):
            ages = {str(k): check_number("max_age_s", v) for k, v in max_age_s.items()}
            default_age = None
        else:
            ages, default_age = {}, check_number("max_age_s", max_age_s)
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))
                                      or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
        deleted = 0
        live = []                                         # (indexed_at, t0, source_id, file, bytes)
        seen = []
        for sid, _ in self._source_dirs():
            seen.append(sid)
            self._clean_tmp(sid, now)
            table, _, _ = self._meta_table(sid)
            age = ages.get(sid, default_age)
            doomed = []
            for r in table.select(["indexed_at", "t0", "file", "bytes"]).to_pylist():
                if age is not None and r["indexed_at"] < now - age:
                    doomed.append(r["file"])
                else:
                    live.append((r["indexed_at"], r["t0"], sid, r["file"], r["bytes"]))
            n = self._delete_files(sid, doomed)
            metrics.record_retention_deletions(n, "age")
            deleted += n
        if max_bytes is not None:
            total = sum(x[4] for x in live)
            doomed_by_source: dict[str, list[str]] = {}
            for _, _, sid, name, size in sorted(live):
                if total <= max_bytes:
                    break
                doomed_by_source.setdefault(sid, []).append(name)
                total -= size
            for sid, names in doomed_by_source.items():
                n = self._delete_files(sid, names)
                metrics.record_retention_deletions(n, "size")
                deleted += n
        for sid in seen:
            self._report_source(sid)
        return deleted

    def _clean_tmp(self, source_id: str, now: float) -> None:
        for i in self._ls(self._dir(source_id)):
            if i.base_name.startswith(TMP_PREFIX) and i.mtime is not None \
                    and i.mtime.timestamp() < now - STALE_TMP_S:
                self._remove(i.path)
