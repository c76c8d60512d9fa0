"""Keeping captions up to date: the footage index is the captioner's queue (docs/architecture.md, "Captions").

The backlog is the set of indexed segments that the captioning model has not captioned yet (CaptionStore.missing).
Nothing else queues them: ingest never waits for a captioner and never hands it anything, a captioner that falls
behind or crashes loses nothing (a batch that failed is still missing and is taken again), and a restart resumes
where the index says. Only `queue_segments` rows of the backlog are held in memory at a time.

Each batch of captions is written in this order:
  1. the retrieval index (upsert by segment_id: a repeat replaces, never duplicates),
  2. the footage index (the truth; a segment already captioned by that model is skipped),
  3. one `tubescope:captions` event per caption newly written to the truth.
A crash between 1 and 2 leaves the segment in the backlog, so it is captioned again and replaces its row; a crash
after 2 can only lose the event. Searches see a caption once step 1 returns.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from pipeline import metrics
from pipeline.captions import Caption, CaptionStore, pooled_visual
from pipeline.events import CAPTIONS_STREAM, ERRORS_STREAM

log = logging.getLogger(__name__)


def caption_event(c: Caption) -> dict:
    """The `tubescope:captions` entry of one caption (the vector stays in the indexes)."""
    return {"segment_id": c.segment_id, "source_id": c.source_id, "t0": f"{c.t0:.3f}", "t1": f"{c.t1:.3f}",
            "caption": c.caption, "model_id": c.model_id}


def describe_rows(index, captioner, rows: list[dict]) -> list[Caption]:
    """Captions of footage rows (SegmentIndex.list rows) from their stored tokens, each with the segment's pooled
    visual tokens; rows deleted meanwhile (retention) are skipped."""
    segments = []
    for r in rows:
        try:
            segments.append(index.get(r["segment_id"], r["model_id"]))
        except KeyError:
            continue
    return [Caption(segment_id=s.segment_id, source_id=s.source_id, t0=s.t0, t1=s.t1, caption=text, vector=vector,
                    model_id=captioner.model_id, visual=pooled_visual(s.tokens))
            for s, (text, vector) in zip(segments, captioner.describe(segments))]


@dataclass
class Backlog:
    """Segments waiting for a caption: how many, and how long the oldest has waited since it was indexed."""
    segments: int
    lag_s: float
    rows: list[dict]                   # the oldest `limit` of them, oldest indexed first

    def to_dict(self) -> dict:
        return {"segments": self.segments, "lag_s": round(self.lag_s, 3)}


def find_backlog(store: CaptionStore, model_id: str, sources: Iterable[str] | None = None,
                 limit: int | None = None, now: float | None = None, token_model_id: str | None = None) -> Backlog:
    """The segments of `sources` (None: every source) that `model_id` has not captioned, among those whose tokens
    `token_model_id` made (default: the same checkpoint; a separate captioning checkpoint reads the main one's)."""
    token_model_id = token_model_id or model_id
    index = store.index
    names = [r["source_id"] for r in index.sources()] if sources is None else list(dict.fromkeys(sources))
    rows = []
    for source_id in names:
        rows += [r for r in store.missing(source_id, model_id) if r["model_id"] == token_model_id]
    rows.sort(key=lambda r: (r["indexed_at"], r["t0"], r["source_id"]))
    now = time.time() if now is None else now
    lag = max(0.0, now - rows[0]["indexed_at"]) if rows else 0.0
    return Backlog(segments=len(rows), lag_s=lag, rows=rows if limit is None else rows[:limit])


class CaptionWriter:
    """Writes captions to the retrieval index, the footage index and the captions stream (module docstring)."""

    def __init__(self, store: CaptionStore, retrieval=None, events=None):
        self.store, self.retrieval, self.events = store, retrieval, events

    def write(self, captions: list[Caption]) -> list[Caption]:
        """Returns the captions newly written to the footage index."""
        if not captions:
            return []
        if self.retrieval is not None:
            self.retrieval.upsert(c.to_row(0.0) for c in captions)
        written = self.store.add(captions)
        metrics.record_captions(len(written))
        if self.events is not None:
            for c in written:
                self.events.emit(CAPTIONS_STREAM, caption_event(c))
        return written


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class LocalCaptioning:
    """Captions in this process, one batch after another (the CLI, tests; actors.captioner has the Ray pool).

    Pools yield (rows, captions) per batch as batches finish, or (rows, the exception) for a batch that failed."""

    def __init__(self, index, captioner, token_model_id: str | None = None):
        self.index, self.captioner = index, captioner
        self.model_id, self.dim = captioner.model_id, captioner.hidden_size
        self.token_model_id = token_model_id or captioner.model_id

    def map(self, row_batches: list[list[dict]]) -> Iterator[tuple[list[dict], list[Caption] | BaseException]]:
        for rows in row_batches:
            try:
                yield rows, describe_rows(self.index, self.captioner, rows)
            except Exception as e:  # noqa: BLE001 - handed to the follower, which retries the rows one by one
                yield rows, e


class CaptionFollower:
    """Captions the backlog of an index, `queue_segments` rows at a time, through a captioning pool
    (`.map(row batches) -> caption lists` as they finish, `.model_id` of the captions, `.token_model_id` of the
    stored tokens it reads).

    `run_pass` takes the oldest rows of the backlog and captions them; `catch_up` repeats until nothing is left
    (backfill); `start` runs passes in a thread, waiting `poll_s` whenever the backlog is empty (a service).
    """

    def __init__(self, store: CaptionStore, pool, writer: CaptionWriter, *, batch_size: int = 16,
                 queue_segments: int = 256, sources: Iterable[str] | None = None, poll_s: float = 2.0,
                 on_unavailable: Callable[[BaseException], None] | None = None):
        if batch_size < 1 or queue_segments < 1:
            raise ValueError("batch_size and queue_segments must be >= 1")
        self.store, self.pool, self.writer = store, pool, writer
        self.batch_size, self.queue_segments, self.poll_s = int(batch_size), int(queue_segments), float(poll_s)
        self.sources = None if sources is None else list(sources)
        self.on_unavailable = on_unavailable
        self.captioned = 0
        self.failed: dict[str, str] = {}      # segment id -> error, of rows that failed alone
        self.queued_max = 0                   # the most rows held in memory at once (bounded by queue_segments)
        self.backlog = Backlog(0, 0.0, [])
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_pass(self, progress: Callable[[int], None] | None = None) -> int:
        """Caption the oldest `queue_segments` rows of the backlog; returns captions newly written."""
        self.backlog = find_backlog(self.store, self.pool.model_id, self.sources, limit=self.queue_segments,
                                    token_model_id=self.pool.token_model_id)
        metrics.record_caption_backlog(self.backlog.segments, self.backlog.lag_s)
        rows = [r for r in self.backlog.rows if r["segment_id"] not in self.failed]
        self.queued_max = max(self.queued_max, len(rows))
        done = 0
        for batch, result in self.pool.map(batches(rows, self.batch_size)):
            if isinstance(result, BaseException):
                result = self._one_by_one(batch, result)
            done += len(self.writer.write(result))
            if progress is not None:
                progress(len(batch))
            if self._stop.is_set():
                break
        self.captioned += done
        return done

    def _one_by_one(self, rows: list[dict], error: BaseException) -> list[Caption]:
        """A failed batch is retried row by row, so one bad segment cannot hold up the others; a row that fails
        alone is left out of this follower's passes (it stays in the backlog for `captions backfill`)."""
        log.warning("caption batch of %d failed (%s: %s); retrying one by one", len(rows), type(error).__name__, error)
        if len(rows) == 1:
            results = [(rows, error)]
        else:
            results = list(self.pool.map([[r] for r in rows]))
        out = []
        for (row,), result in results:
            if isinstance(result, BaseException):
                self.failed[row["segment_id"]] = f"{type(result).__name__}: {result}"
                self.last_error = f"segment {row['segment_id']}: {self.failed[row['segment_id']]}"
                if self.writer.events is not None:
                    self.writer.events.emit(ERRORS_STREAM, {"kind": "caption_failed", "stage": "captions",
                                                            "segment_id": row["segment_id"],
                                                            "source_id": row["source_id"],
                                                            "error": self.failed[row["segment_id"]][:500]})
            else:
                out += result
        return out

    def catch_up(self, progress: Callable[[int], None] | None = None) -> int:
        """Passes until the backlog is empty or a pass makes no progress (rows deleted meanwhile). Returns captions
        written."""
        total = 0
        while not self._stop.is_set():
            n = self.run_pass(progress)
            total += n
            if n == 0:
                break
        self.backlog = find_backlog(self.store, self.pool.model_id, self.sources, limit=0,
                                    token_model_id=self.pool.token_model_id)
        metrics.record_caption_backlog(self.backlog.segments, self.backlog.lag_s)
        return total

    # ---- as a service ------------------------------------------------------------------------------------------
    def start(self) -> "CaptionFollower":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="captions", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._stop.clear()                # passes may be run by hand again (catch_up after a job)

    def status(self) -> dict:
        return {"running": bool(self._thread and self._thread.is_alive()), "captioned": self.captioned,
                "backlog": self.backlog.to_dict(), "failed": len(self.failed),
                "failures": dict(list(self.failed.items())[-5:]), "last_error": self.last_error}

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.run_pass()
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - a bad batch or an unreachable volume must not end the service
                n = 0
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("caption pass failed")
                if self.on_unavailable is not None and isinstance(e, OSError):
                    self.on_unavailable(e)
            if n == 0 and self._stop.wait(self.poll_s):
                return


# ---- the retrieval index, derived from the truth --------------------------------------------------------------------
def with_visual(store: CaptionStore, captions: Iterable[Caption], token_model_id: str | None) -> Iterator[Caption]:
    """Captions with their pooled visual vector: as stored, else (a caption file written before they were kept) from
    the segment's stored tokens (of `token_model_id`, else of the only model that stored them). A segment whose
    tokens are gone (deleted meanwhile) is left out."""
    for c in captions:
        if c.visual is None:
            try:
                try:
                    tokens = store.index.tokens(c.segment_id, token_model_id or c.model_id)
                except KeyError:
                    tokens = store.index.tokens(c.segment_id)
            except (KeyError, ValueError) as e:
                log.warning("caption of %s left out of the retrieval index: %s", c.segment_id, e)
                continue
            c.visual = pooled_visual(tokens)
        yield c


def rebuild_retrieval(store: CaptionStore, retrieval, model_id: str, dim: int | None = None,
                      progress: Callable[[int], None] | None = None, token_model_id: str | None = None) -> int:
    """Recreate the retrieval index from the captions `model_id` wrote into the footage index (their pooled visual
    vectors filled from the stored tokens where a caption file lacks them: `with_visual`). Returns rows."""
    captions = (c for s in store.index.sources() for c in store.read(s["source_id"], model_id))
    rows = (c.to_row(0.0) for c in with_visual(store, captions, token_model_id))
    return retrieval.rebuild(rows, dim=dim, progress=progress)


def open_retrieval(store: CaptionStore, root, model_id: str, dim: int, token_model_id: str | None = None):
    """The retrieval index beside the footage index at `root`, ready for writes: opened when it is there, readable,
    of this model's width and holding pooled visual vectors; otherwise rebuilt from the footage index (never an
    empty table that silently lacks what was captioned before)."""
    from pipeline.retrieval import RetrievalIndex, RetrievalUnavailable

    retrieval = RetrievalIndex(root)
    try:
        retrieval.count()
        if retrieval.dim == dim and retrieval.has_visual():
            return retrieval
        log.warning("retrieval index holds %s-dimensional vectors (%s pooled visual vectors), the captioning model "
                    "writes %d: rebuilding", retrieval.dim, "with" if retrieval.has_visual() else "without", dim)
    except RetrievalUnavailable as e:
        log.warning("retrieval index unavailable (%s): rebuilding it from the footage index", e)
    retrieval = RetrievalIndex(root)
    rebuild_retrieval(store, retrieval, model_id, dim=dim, token_model_id=token_model_id)
    return retrieval


def caption_follower(settings, index, pool, events=None, *, sources: Iterable[str] | None = None,
                     poll_s: float | None = None, on_unavailable=None) -> CaptionFollower:
    """A CaptionFollower of `index` for `pool`, writing to the retrieval index (opened, or rebuilt from the footage
    index) and to `events`, sized by the caption settings."""
    store = CaptionStore(index)
    retrieval = open_retrieval(store, settings.index_root, pool.model_id, pool.dim, pool.token_model_id)
    return CaptionFollower(store, pool, CaptionWriter(store, retrieval, events), batch_size=settings.caption_batch_size,
                           queue_segments=settings.caption_queue_segments, sources=sources,
                           poll_s=settings.caption_poll_seconds if poll_s is None else poll_s,
                           on_unavailable=on_unavailable)


def prune_retrieval(index, retrieval) -> int:
    """Delete the retrieval rows of segments the footage index no longer holds (retention, deleted sources).
    Returns rows deleted."""
    indexed = {s["source_id"] for s in index.sources()}
    deleted = 0
    for source_id in retrieval.source_ids():
        if source_id not in indexed:
            deleted += retrieval.delete_source(source_id)
            continue
        present = {r["segment_id"] for r in index.list(source_id)}
        gone = [sid for sid in retrieval.captions([source_id]) if sid not in present]
        if gone:
            deleted += retrieval.delete(gone)
    return deleted


def with_captions(store: CaptionStore, rows: list[dict], model_id: str, root) -> list[dict]:
    """Footage rows with their `caption` (None while pending): read from the retrieval index in one scan per source
    when it can be read, else from the caption files of the footage index."""
    from pipeline.retrieval import RetrievalIndex, RetrievalUnavailable

    texts: dict[str, str] = {}
    sources = sorted({r["source_id"] for r in rows})
    if sources:
        try:
            start, end = min(r["t0"] for r in rows), max(r["t1"] for r in rows)
            texts = RetrievalIndex(root).captions(sources, start, end)
        except RetrievalUnavailable:
            texts = store.texts(rows, model_id)
    return [{**r, "caption": texts.get(r["segment_id"])} for r in rows]
