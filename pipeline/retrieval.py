"""RetrievalIndex: captions and embeddings of indexed segments in LanceDB, searched by hybrid retrieval
(docs/architecture.md, "Retrieval").

Layout: one LanceDB table `segments` in `<index root>/_retrieval/` (for a URI root, the same path under the URI).
The leading underscore keeps it out of SegmentIndex's `source=` listing and out of pyarrow.dataset discovery.
The footage index stays the truth; this table is derived from it and `rebuild` recreates it from its rows.

Why this shape:
- Rows are keyed by segment_id and written by merge-insert: a re-caption replaces its row, never duplicates it.
- Search is BM25 full-text over captions plus nearest neighbours over the vectors (dot product of unit vectors),
  fused by reciprocal rank (LanceDB's hybrid query with its RRF reranker). The source and window filter is a
  prefilter in both legs: each leg ranks only the rows in scope, so other sources' rows can never crowd a
  window's matches out of the top `limit`, and nothing out of scope reaches the results or the counts.
- Each row also holds the segment's pooled visual tokens (`visual`), searched by nearest neighbours alone, with the
  same prefilter, for search by image (`nearest_visual`).
- New rows are searchable as soon as a write returns: LanceDB searches the rows its indexes do not cover yet by
  brute force. `optimize` folds them into the indexes (and compacts small files) after enough writes; it also
  builds the ANN indexes of both vector columns once the table reaches ANN_MIN_ROWS (below that brute force is
  fast enough and exact).
- Every write is a new immutable table version (MVCC): readers, in this process or others, see whole versions.
  Within a process, writes are serialised by a lock and reads need none. Across processes, readers see other
  processes' writes after `read_consistency_s`; concurrent writers are safe on local disks (commits are atomic
  renames and conflicting commits are retried), but keep one writer per table on object stores without
  conditional writes.
- Like SegmentIndex, only an instance built with create=True makes the folder, and only beside an existing footage
  index (its marker): a missing, unmounted or corrupt folder is RetrievalUnavailable (the API answers 503) until
  `rebuild`, never a fresh empty table that silently lacks everything indexed so far.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta

import numpy as np
import pyarrow.fs as pafs

# LanceDB's native log warns on every hybrid query about a column its own sub-queries add; errors still show, and an
# operator's LANCEDB_LOG wins. Set before the native library loads.
os.environ.setdefault("LANCEDB_LOG", "error")
from lancedb.index import FTS, IvfSq  # noqa: E402

from pipeline.index import check_number
from pipeline.index_files import MARKER
from pipeline.retrieval_rows import (check_limit, check_query_text, rows_table, scope_filter, table_schema,
                                     unit_vector)

FOLDER = "_retrieval"
TABLE = "segments"
COLUMNS = ["segment_id", "source_id", "t0", "t1", "caption"]      # what a hit carries (plus its score)
# From this many rows on, vectors get an IVF_SQ index: exact search over a camera-day (10,800 x 1536) took p95
# 124 ms here, IVF_SQ 17 ms at recall@32 0.99 with the source/window prefilter (bench/search.py). Below it, exact
# search is fast enough and, unlike ANN, finds every row.
ANN_MIN_ROWS = 5_000
OPTIMIZE_AFTER_WRITES = 20        # writes (upserts, deletes) before `maybe_optimize` folds them into the indexes
OPTIMIZE_AFTER_ROWS = 20_000      # or rows written, whichever comes first
KEEP_VERSIONS = timedelta(hours=1)   # old versions live this long: readers in other processes may be mid-query
RRF_K = 60                        # the usual reciprocal rank fusion constant
DISTANCE = "dot"                  # vectors are unit length: dot product ranks as cosine similarity, and is cheapest


class RetrievalUnavailable(OSError):
    """The retrieval table is missing, unreadable or corrupt (a deleted or unmounted folder, a rebuild in progress).
    Searches fail with this until `rebuild` recreates it from the footage index."""


class RetrievalIndex:
    """Captions and embedding vectors of indexed segments, one row per segment_id, searched by hybrid retrieval."""

    def __init__(self, root: str | os.PathLike, *, dim: int | None = None, create: bool = False,
                 read_consistency_s: float = 0.0, storage_options: Mapping[str, str] | None = None):
        """root: the footage index root (a local path or a URI); the table lives in `<root>/_retrieval`.

        create=True makes the folder and an empty table of `dim` dimensions when missing (the entry points do
        this; services open with create=False). read_consistency_s: how stale a read may be with respect to other
        processes' writes (0: every read checks for a newer version; on object stores that is a request per read).
        """
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ValueError(f"retrieval root must be a local path or a URI, got {root!r}")
        root = str(root)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        self._remote = "://" in root and not root.startswith("file://")
        if self._remote:
            self.root = root.rstrip("/")
        else:
            self.root = os.path.abspath(root.removeprefix("file://"))
        self.uri = f"{self.root}/{FOLDER}"
        self._storage_options = dict(storage_options or {})
        self._consistency = timedelta(seconds=float(read_consistency_s))
        self._lock = threading.Lock()                 # one writer at a time in this process
        self._table = None                            # opened lazily, dropped after any failure
        self._writes = self._rows_written = 0         # since the last optimize, in this process
        self._dim = dim
        if create:
            if dim is None:
                raise ValueError("create=True needs dim (the caption embedding's dimension)")
            with self._lock:
                if not self._exists():
                    self._check_truth()
                    self._create(dim)

    def __repr__(self) -> str:
        return f"RetrievalIndex({self.uri!r})"

    # ---- opening -----------------------------------------------------------------------------------------------
    def _connect(self):
        import lancedb
        return lancedb.connect(self.uri, read_consistency_interval=self._consistency,
                               storage_options=self._storage_options or None)

    def _exists(self) -> bool:
        if not self._remote:
            return os.path.isdir(os.path.join(self.uri, f"{TABLE}.lance"))
        try:
            return TABLE in self._connect().table_names()
        except Exception:                                          # noqa: BLE001 - any store error: not usable
            return False

    def _check_truth(self) -> None:
        """The footage index must be there before anything is derived from it (an unmounted volume is not)."""
        if self._remote:
            fs, path = pafs.FileSystem.from_uri(self.root)
            found = fs.get_file_info(f"{path.rstrip('/')}/{MARKER}").type == pafs.FileType.File
        else:
            found = os.path.isfile(os.path.join(self.root, MARKER))
        if not found:
            raise RetrievalUnavailable(f"no footage index at {self.root!r} (its {MARKER} marker is missing): the "
                                       "retrieval table is made only beside one")

    def _create(self, dim: int, data=None):
        db = self._connect()
        table = db.create_table(TABLE, data=data, schema=table_schema(dim), mode="overwrite")
        self._table, self._dim = table, dim
        return table

    def _open(self):
        table = self._table
        if table is not None:
            return table
        if not self._remote and not os.path.isdir(os.path.join(self.uri, f"{TABLE}.lance")):
            raise RetrievalUnavailable(f"the retrieval table {self.uri!r} is missing (deleted, unmounted or being "
                                       "rebuilt): rebuild it from the footage index")
        try:
            table = self._connect().open_table(TABLE)
            dim = table.schema.field("vector").type.list_size        # `visual` has the same width (table_schema)
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"the retrieval table holds {dim}-dimensional vectors, this instance expects "
                             f"{self._dim}: rebuild it for the current model")
        self._dim, self._table = dim, table
        return table

    def _unavailable(self, e: BaseException) -> RetrievalUnavailable:
        """Whatever LanceDB raised while reading (missing files, a corrupt manifest, a vanished folder): the table
        cannot answer. The handle is dropped so that the next call reopens whatever `rebuild` made."""
        self._table = None
        if isinstance(e, RetrievalUnavailable):
            return e
        return RetrievalUnavailable(f"the retrieval table {self.uri!r} cannot be read ({type(e).__name__}: "
                                    f"{str(e)[:300]}); rebuild it from the footage index")

    @property
    def dim(self) -> int | None:
        """The vector dimension of the table (None while it is missing and none was given)."""
        if self._dim is None:
            try:
                self._open()
            except RetrievalUnavailable:
                pass
        return self._dim

    def has_visual(self) -> bool:
        """Whether the table holds pooled visual vectors (a table written before they were kept does not, until
        `open_retrieval` rebuilds it). RetrievalUnavailable when it cannot be read."""
        table = self._open()
        try:
            return "visual" in table.schema.names
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e

    # ---- reading -----------------------------------------------------------------------------------------------
    def search(self, query_text: str | None = None, query_vector=None, *, sources: list[str],
               start: float | None = None, end: float | None = None, limit: int = 10) -> list[dict]:
        """Segments of `sources` overlapping [start, end) ranked for the query, best first:
        [{segment_id, source_id, t0, t1, caption, score}].

        Both parts given: hybrid (BM25 over captions and nearest vectors, fused by reciprocal rank; score is the
        fused RRF score). One given: text only (score: BM25) or vector only (score: cosine similarity).
        Only rows of `sources` in the window are ranked at all (a prefilter). ValueError for a bad query;
        RetrievalUnavailable when the table is missing or unreadable.
        """
        check_query_text(query_text)
        if query_text is None and query_vector is None:
            raise ValueError("a search needs query_text, query_vector or both")
        limit = check_limit(limit)
        where = scope_filter(sources, start, end, sources_required=True)
        vector = unit_vector("query_vector", query_vector, None) if query_vector is not None else None
        table = self._open()
        if vector is not None:
            vector = unit_vector("query_vector", vector, self._dim)
        try:
            return self._search(table, query_text, vector, where, limit)
        except ValueError:
            raise
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e

    def _search(self, table, text, vector, where, limit) -> list[dict]:
        from lancedb.query import MatchQuery
        from lancedb.rerankers import RRFReranker

        match = MatchQuery(text, "caption") if text is not None else None   # words, never query syntax
        if match is not None and vector is not None:
            q = (table.search(query_type="hybrid", vector_column_name="vector", fts_columns="caption")
                 .vector(vector).text(match).distance_type(DISTANCE).rerank(RRFReranker(K=RRF_K)))
            score, sign, offset = "_relevance_score", 1.0, 0.0
        elif match is not None:
            q = table.search(match, query_type="fts")
            score, sign, offset = "_score", 1.0, 0.0
        else:
            q = table.search(vector, query_type="vector", vector_column_name="vector").distance_type(DISTANCE)
            score, sign, offset = "_distance", -1.0, 1.0              # dot distance is 1 - cosine similarity
        # naming the score column keeps LanceDB from warning that it adds it; a hybrid query adds its own
        q = q.select(COLUMNS if score == "_relevance_score" else COLUMNS + [score]).limit(limit)
        if where is not None:
            q = q.where(where, prefilter=True)
        result = q.to_arrow()
        scores = result.column(score).to_pylist()
        hits = result.select(COLUMNS).to_pylist()
        for h, s in zip(hits, scores):
            h["score"] = offset + sign * float(s)
        return hits

    def nearest_visual(self, query_vector, *, sources: list[str], start: float | None = None,
                       end: float | None = None, limit: int = 10) -> list[dict]:
        """The `limit` rows of `sources` overlapping [start, end) whose pooled visual vectors are nearest the query
        (an uploaded image's), best first: [{segment_id, source_id, t0, t1, caption, visual}], visual as float32
        [D]. The order may be approximate (the ANN index of a large table); callers compare `visual` exactly."""
        limit = check_limit(limit)
        where = scope_filter(sources, start, end, sources_required=True)
        table = self._open()
        vector = unit_vector("query_vector", query_vector, self._dim)
        try:
            result = (table.search(vector, query_type="vector", vector_column_name="visual").distance_type(DISTANCE)
                      .select(COLUMNS + ["visual", "_distance"]).where(where, prefilter=True).limit(limit).to_arrow())
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e
        hits = result.select(COLUMNS).to_pylist()
        for h, v in zip(hits, result.column("visual").to_pylist()):
            h["visual"] = np.asarray(v, np.float32)
        return hits

    def captions(self, sources: list[str], start: float | None = None, end: float | None = None) -> dict[str, str]:
        """segment_id -> caption of the rows of `sources` overlapping [start, end) (a filtered scan, no ranking)."""
        where = scope_filter(sources, start, end, sources_required=True)
        table = self._open()
        try:
            rows = table.search().where(where).select(["segment_id", "caption"]).limit(None).to_arrow()
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e
        return dict(zip(rows.column("segment_id").to_pylist(), rows.column("caption").to_pylist()))

    def source_ids(self) -> list[str]:
        """Every source with rows in the table."""
        table = self._open()
        try:
            column = table.search().select(["source_id"]).limit(None).to_arrow().column("source_id")
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e
        return sorted(set(column.to_pylist()))

    def count(self, sources: list[str] | None = None, start: float | None = None, end: float | None = None) -> int:
        """Rows of `sources` (None: all) overlapping [start, end)."""
        where = scope_filter(sources, start, end, sources_required=False)
        table = self._open()
        try:
            return table.count_rows(where.to_sql() if where is not None else None)
        except Exception as e:                                     # noqa: BLE001 - see _unavailable
            raise self._unavailable(e) from e

    # ---- writing -----------------------------------------------------------------------------------------------
    def upsert(self, rows: Iterable[Mapping]) -> int:
        """Insert or replace rows by segment_id (keys: segment_id, source_id, t0, t1, caption, vector, model_id,
        visual). Returns the rows written. Searchable when this returns."""
        with self._lock:
            table = self._open()
            data = rows_table(rows, self._dim)
            if data.num_rows == 0:
                return 0
            try:
                (table.merge_insert("segment_id").when_matched_update_all().when_not_matched_insert_all()
                 .execute(data))
                self._ensure_fts(table)
            except Exception as e:                                 # noqa: BLE001 - see _unavailable
                raise self._unavailable(e) from e
            self._wrote(data.num_rows)
        self.maybe_optimize()
        return data.num_rows

    def _delete(self, where) -> int:
        with self._lock:
            table = self._open()
            try:
                n = table.count_rows(where.to_sql())
                if n:
                    table.delete(where)
            except Exception as e:                                 # noqa: BLE001 - see _unavailable
                raise self._unavailable(e) from e
            if n:
                self._wrote(n)
        if n:
            self.maybe_optimize()
        return n

    def delete(self, segment_ids: Iterable[str]) -> int:
        """Delete rows by segment_id (ids not present are ignored). Returns the rows deleted."""
        from lancedb.expr import col

        ids = list(dict.fromkeys(segment_ids))
        for s in ids:
            if not isinstance(s, str) or not s:
                raise ValueError(f"segment ids must be non-empty strs, got {s!r}")
        n = 0
        for i in range(0, len(ids), 1000):
            n += self._delete(col("segment_id").isin(ids[i:i + 1000]))
        return n

    def delete_source(self, source_id: str, before: float | None = None) -> int:
        """Delete a source's rows: all, or those that end at or before `before` (t1 <= before, as
        SegmentIndex.delete). Returns the rows deleted."""
        from lancedb.expr import col, lit

        if not isinstance(source_id, str) or not source_id:
            raise ValueError(f"source_id must be a non-empty str, got {source_id!r}")
        before = check_number("before", before)
        where = col("source_id") == lit(source_id)
        if before is not None:
            where = where & (col("t1") <= lit(before))
        return self._delete(where)

    def rebuild(self, rows: Iterable[Mapping], *, dim: int | None = None, batch_size: int = 8192,
                progress: Callable[[int], None] | None = None) -> int:
        """Drop the table and recreate it from `rows` (the truth: the footage index's captions), written in
        batches; progress(rows_so_far) after each. Works on a missing or corrupt folder. Returns the rows.

        Searches during a rebuild may raise RetrievalUnavailable or see the rows written so far."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        dim = dim if dim is not None else self._dim
        it = iter(rows)
        first = []
        if dim is None:
            first = [r for _, r in zip(range(1), it)]
            if not first:
                raise ValueError("rebuild from no rows needs dim")
            dim = int(np.asarray(first[0].get("vector")).size)
        with self._lock:
            self._check_truth()
            self._drop()
            table = self._create(dim)
            total = 0
            batch = list(first)
            try:
                for r in it:
                    batch.append(r)
                    if len(batch) >= batch_size:
                        total += self._append(table, batch, dim)
                        batch = []
                        if progress is not None:
                            progress(total)
                if batch:
                    total += self._append(table, batch, dim)
                    if progress is not None:
                        progress(total)
                self._optimize(table, force=True)
            except Exception:
                self._table = None
                raise
        return total

    def _append(self, table, batch, dim) -> int:
        """Plain appends during a rebuild: the rows come from the truth, one per segment_id."""
        data = rows_table(batch, dim)
        table.add(data)
        return data.num_rows

    def _drop(self) -> None:
        """Remove the table whatever state it is in (a corrupt one may not open)."""
        self._table = None
        try:
            self._connect().drop_table(TABLE, ignore_missing=True)
        except Exception:                                          # noqa: BLE001 - fall back to removing files
            pass
        if self._remote:
            fs, path = pafs.FileSystem.from_uri(self.uri)
            try:
                fs.delete_dir(f"{path.rstrip('/')}/{TABLE}.lance")
            except FileNotFoundError:
                pass
        else:
            import shutil
            shutil.rmtree(os.path.join(self.uri, f"{TABLE}.lance"), ignore_errors=True)

    # ---- indexes -----------------------------------------------------------------------------------------------
    def _ensure_fts(self, table) -> None:
        """Full-text search needs the index to exist; made at the first write (it then covers later rows through
        optimize, and LanceDB scans the rows it does not cover yet)."""
        if not any(i.index_type == "FTS" for i in table.list_indices()):
            table.create_index("caption", config=FTS(with_position=False))

    def _wrote(self, n: int) -> None:
        self._writes += 1
        self._rows_written += n

    def maybe_optimize(self) -> bool:
        """Optimize when enough has been written since the last time (called after every write)."""
        if self._writes >= OPTIMIZE_AFTER_WRITES or self._rows_written >= OPTIMIZE_AFTER_ROWS:
            self.optimize()
            return True
        return False

    def optimize(self) -> dict:
        """Compact small files, fold new rows into the indexes, build missing indexes, prune old versions."""
        with self._lock:
            table = self._open()
            try:
                return self._optimize(table, force=False)
            except Exception as e:                                 # noqa: BLE001 - see _unavailable
                raise self._unavailable(e) from e

    def _optimize(self, table, force: bool) -> dict:
        t = time.perf_counter()
        rows = table.count_rows()
        built = []
        indices = table.list_indices()
        indexed = {c for i in indices for c in i.columns}
        if rows and not any(i.index_type == "FTS" for i in indices):
            table.create_index("caption", config=FTS(with_position=False))
            built.append("fts")
        for column in ("vector", "visual"):
            if rows >= ANN_MIN_ROWS and column not in indexed and column in table.schema.names:
                table.create_index(column, config=IvfSq(distance_type=DISTANCE))
                built.append(column)
        table.optimize(cleanup_older_than=KEEP_VERSIONS)
        self._writes = self._rows_written = 0
        return {"rows": rows, "built": built, "seconds": time.perf_counter() - t}
