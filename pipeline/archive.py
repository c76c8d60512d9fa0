"""Archive jobs: files -> (file, time window) rows -> 2 fps decode -> tubes -> encoder -> SegmentIndex.

The job is a small pipeline of named steps (docs/architecture.md, "Flow"):

    plan_job         files, globs, folders and URIs (pipeline.archive_sources) -> one row per file, with the
                     segments already indexed
    decoded_segments the Ray Data plan: plan_windows -> decode_to_tube_rows (one row of uint8 tubes per segment)
    encoded_segments the decoded blocks, by reference, through the encoder actors (pipeline.encoder_pool), which
                     stay loaded between jobs when they reserve no CPU or GPU
    JobWriter        the driver writes each encoded batch as it arrives (pipeline.indexing), reports progress,
                     polls for cancellation, and knows every file's fate, so the report is exact

The encoder stage is an argument (a callable class such as actors.encoder.VisionEncoder): pipeline never imports
actors. A finished job applies the retention settings once, so an archive-only deployment keeps to them too.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from pipeline import metrics
from pipeline.archive_sources import expand_sources, source_id_for
from qwen2vl.geometry import PATCH_DIM

# The CPUs Ray reserves per archive task. A fraction, so a job always fits beside what long-lived actors hold (feed
# readers 0.25 each, the live indexer, the decoder), which on 2 cores leaves less than a whole CPU free; decode tasks
# are capped at one per CPU of the cluster instead, so an idle machine still runs one per core
# (docs/architecture.md, "Archive jobs").
PLAN_TASK_CPUS = 0.25
DECODE_TASK_CPUS = 0.25

# Decoded blocks of a few segments, each handed to an encoder as it is ready. Ray Data's default 128 MiB holds ~12
# segments of 360p video: the encoder would wait for a whole block before its first call and have more of them left
# after the last decode task (docs/architecture.md, "Where the archive job's time goes").
DECODED_BLOCK_BYTES = 32 << 20


@dataclass
class JobReport:
    indexed: list[str] = field(default_factory=list)          # paths with every segment indexed
    failed: list[dict] = field(default_factory=list)          # {"path", "error"}
    segments: int = 0                                         # segments written by this job
    long_tier: int = 0                                        # long-tier files written (docs: "Plans")
    skipped: int = 0                                          # segments already in the index (idempotent re-runs)
    seconds: float = 0.0                                      # wall time
    source_seconds: float = 0.0                               # media seconds covered
    sources: list[str] = field(default_factory=list)          # source ids of the job's files

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        if not self.failed:
            return 0
        return 2 if self.indexed else 1


# ---- stages (run as Ray tasks) ----------------------------------------------------------------------------------------
def plan_windows(row: dict, segment_seconds: float, segments_per_window: int, done_ids: frozenset = frozenset()) -> list[dict]:
    """Probe one file and cut it into windows of whole segments; a window whose segments are all indexed is dropped."""
    from pipeline.video.media import DecodeError, probe
    from pipeline.records import segment_id_for

    try:
        info = probe(row["path"])
    except (DecodeError, OSError, ValueError) as e:
        return [{**row, "start": 0.0, "end": 0.0, "error": str(e), "n_skipped": 0, "width": 0, "height": 0}]
    duration = max(float(info.duration), 0.0)
    n_segments = max(1, math.ceil(duration / segment_seconds - 1e-9))
    out, skipped = [], 0
    for w0 in range(0, n_segments, segments_per_window):
        seg_range = range(w0, min(n_segments, w0 + segments_per_window))
        todo = [k for k in seg_range if segment_id_for(row["source_id"], k * segment_seconds) not in done_ids]
        skipped += len(seg_range) - len(todo)
        if todo:
            out.append({**row, "start": todo[0] * segment_seconds,
                        "end": min(duration, (todo[-1] + 1) * segment_seconds) if todo[-1] == n_segments - 1
                        else (todo[-1] + 1) * segment_seconds,
                        "error": "", "n_skipped": 0})
    if not out:  # nothing to do: keep one empty row so the driver learns about the file
        out.append({**row, "start": 0.0, "end": 0.0, "error": "", "n_skipped": skipped})
    else:
        out[0]["n_skipped"] = skipped
    for r in out:
        r.update(duration=duration, width=int(info.width), height=int(info.height))
    return out


def decode_to_tube_rows(row: dict, fps: float, segment_seconds: float, min_pixels: int, max_pixels: int,
                        indexed: frozenset = frozenset(), has_long: frozenset = frozenset()) -> list[dict]:
    """One window -> one row per segment (Tubes.to_row with uint8 pixel rows, and the thumbnail JPEG); a failure is
    one row with `error`. `need_full` is False for segments in `indexed` (their tokens exist), `need_long` for those
    in `has_long`."""
    from pipeline.thumbnails import segment_thumbnail
    from pipeline.tubes import tubes_from_segment
    from pipeline.video.files import decode_window
    from pipeline.video.media import DecodeError
    from pipeline.video.segments import segment_frames

    base = {"path": row["path"], "duration": row.get("duration", 0.0), "n_skipped": row.get("n_skipped", 0)}
    if row["error"] or row["end"] <= row["start"]:
        return [_error_row(base, row["source_id"], row["error"])]
    try:
        frames = decode_window(row["path"], row["start"], row["end"], fps=fps, min_pixels=min_pixels,
                               max_pixels=max_pixels)
        segments = segment_frames(row["source_id"], frames, segment_seconds=segment_seconds, fps=fps,
                                  source_size=upright_size(row.get("width", 0), row.get("height", 0), frames))
        out = [{**base, **tubes_from_segment(s, as_uint8=True).to_row(), "error": "",
                "need_full": s.segment_id not in indexed, "need_long": s.segment_id not in has_long,
                "thumbnail": segment_thumbnail(s)} for s in segments]
    except (DecodeError, OSError, ValueError) as e:
        return [_error_row(base, row["source_id"], f"{type(e).__name__}: {e}")]
    for r in out[1:]:
        r["n_skipped"] = 0                    # counted once per window
    return out or [_error_row(base, row["source_id"], "")]


def upright_size(width: int, height: int, frames: list) -> tuple[int, int] | None:
    """The file's frame size (as probed) the way its decoded frames stand: a file marked as rotated decodes upright
    (pipeline/video/media.py upright), so a probed landscape size whose frames come out portrait is turned. None
    when the probe had no size or nothing was decoded."""
    if not width or not height or not frames:
        return None
    h, w = frames[0][1].shape[:2]
    if (width - height) * (w - h) < 0:
        return int(height), int(width)
    return int(width), int(height)


def _error_row(base: dict, source_id: str, error: str) -> dict:
    """A row with the columns of a tube row and no segment: a failed or empty window (Ray Data blocks need one
    schema)."""
    return {**base, "segment_id": "", "source_id": source_id, "t0": 0.0, "t1": 0.0,
            "pixel_rows": np.zeros((0, PATCH_DIM), np.uint8), "grid_thw": np.zeros(3, np.int64),
            "tube_ts": np.zeros(0, np.float64), "padded": False, "source_size": np.zeros(2, np.int64), "error": error,
            "need_full": False, "need_long": False, "thumbnail": b""}


# ---- the job ----------------------------------------------------------------------------------------------------------
class JobCancelled(Exception):
    """Raised inside index_archive when should_cancel() says so; what was indexed before stays indexed."""


@dataclass
class JobPlan:
    files: list[str]                          # every file the job reads, in order
    failures: list[dict]                      # {"path", "error"} of inputs that name no readable file
    rows: list[dict]                          # {"path", "source_id"} per file
    done: dict[str, frozenset]                # source id -> segment ids with nothing left to encode
    model_path: str
    indexed: dict[str, frozenset]             # source id -> segment ids whose full-resolution tokens exist
    has_long: dict[str, frozenset] = field(default_factory=dict)  # source id -> segment ids whose long tier
                                              # exists (looked up only for passes that decode indexed footage again)


def plan_job(paths: list[str], settings, index, source_id: str | None = None,
             file_roots: list | None = None, reencode_long: bool = False, thumbnails: bool = False) -> JobPlan:
    """Expand the inputs into files (under file_roots when given), name their sources, and look up what is already
    indexed (idempotent re-runs). reencode_long: segments indexed without their long tier are decoded again and
    encoded at the long resolution only. thumbnails: segments indexed without a thumbnail are decoded again for it
    (and get whatever else they lack). A decoded segment always gets its thumbnail written."""
    from pipeline.checkpoints import model_id

    files, failures = expand_sources(list(paths), file_roots)
    rows = [{"path": p, "source_id": source_id_for(p, source_id, len(files))} for p in files]
    model_path = str(settings.resolved_model_path())
    mid = model_id(model_path) if files else ""
    listed = {r["source_id"]: index.list(r["source_id"], model_id=mid) for r in rows}
    indexed = {s: frozenset(r["segment_id"] for r in found) for s, found in listed.items()}
    done, has_long = indexed, {s: frozenset() for s in listed}
    if (reencode_long or thumbnails) and settings.long_pixels:
        from pipeline.long_tier import LongTier

        tier = LongTier(index, settings.long_pixels)
        has_long = {s: frozenset(tier.present(found, mid)) for s, found in listed.items()}
        done = has_long if reencode_long else done
    if thumbnails:
        from pipeline.thumbnails import ThumbnailStore

        have = ThumbnailStore(index).present(r["segment_id"] for found in listed.values() for r in found)
        done = {s: ids & have for s, ids in done.items()}
    return JobPlan(files, failures, rows, done, model_path, indexed, has_long)


def decoded_segments(plan: JobPlan, settings):
    """The Ray Data plan of a job: one row of uint8 tubes per segment (or per failed or empty window)."""
    import ray

    seg_s, fps, done, indexed = float(settings.segment_seconds), float(settings.fps), plan.done, plan.indexed
    has_long = {s: plan.has_long.get(s, frozenset()) for s in indexed}
    window_segments = max(1, int(settings.segments_per_task))
    ds = ray.data.from_items(plan.rows, override_num_blocks=len(plan.rows))
    ds.context.target_max_block_size = DECODED_BLOCK_BYTES          # this job's copy of the DataContext
    ds = ds.flat_map(lambda r: plan_windows(r, seg_s, window_segments, done[r["source_id"]]),
                     num_cpus=PLAN_TASK_CPUS)
    return ds.flat_map(lambda r: decode_to_tube_rows(r, fps, seg_s, settings.min_pixels, settings.max_pixels,
                                                     indexed[r["source_id"]], has_long[r["source_id"]]),
                       num_cpus=DECODE_TASK_CPUS, concurrency=max(1, int(ray.cluster_resources().get("CPU", 1))))


def encoder_pool(plan: JobPlan, settings, encoder_cls):
    """The job's encoder actors (pipeline.encoder_pool): found loaded when an earlier job left them."""
    from pipeline.encoder_pool import EncoderPool

    n_actors = max(1, int(settings.num_encoder_actors))
    gpus = _gpus_per_encoder(settings)
    return EncoderPool(encoder_cls, {"model_path": plan.model_path, "token_budget": settings.encoder_token_budget,
                                     "dtype": settings.encoder_dtype, "threads": _encoder_threads(gpus, n_actors),
                                     "long_pixels": settings.long_pixels},
                       n_actors, num_cpus=settings.encoder_cpus, num_gpus=gpus,
                       runtime_env=_cpu_encoder_env(gpus),
                       keepalive_s=settings.encoder_keepalive_seconds)


def encoded_segments(plan: JobPlan, settings, encoder_cls) -> Iterator[dict]:
    """Encoder output batches (numpy columns): one row per encoded segment (or per failed or empty window)."""
    pool = encoder_pool(plan, settings, encoder_cls)
    try:
        yield from pool.encode_bundles(decoded_segments(plan, settings).iter_internal_ref_bundles(),
                                       int(settings.encoder_batch_segments))
    finally:
        pool.release()


class JobWriter:
    """The driver's side of a job: writes encoded batches, tracks each file, and builds the report."""

    def __init__(self, plan: JobPlan, index, events=None, progress: bool = True, long_pixels: int = 0):
        self.plan, self.index, self.events = plan, index, events
        self.long_pixels = long_pixels
        self.report = JobReport(sources=sorted({r["source_id"] for r in plan.rows}))
        self.started = time.perf_counter()
        self.files: dict[str, dict] = {p: {"error": None, "duration": 0.0} for p in plan.files}
        self.bar = _progress(progress, len(plan.files))
        for f in plan.failures:
            self.fail(f["path"], f["error"])

    def fail(self, path: str, error: str) -> None:
        from pipeline.events import ERRORS_STREAM

        self.report.failed.append({"path": path, "error": error})
        metrics.record_decode_error(metrics.decode_error_kind(error))
        if self.events is not None:
            self.events.emit(ERRORS_STREAM, {"path": path, "error": error, "stage": "index"})

    def write(self, batch: dict) -> None:
        """One batch of encoder output rows (numpy columns)."""
        from pipeline.indexing import write_segments
        from pipeline.records import IndexedSegment

        segments, long, details, thumbnails = [], [], {}, {}
        for i in range(len(batch["path"])):
            row = {k: v[i] for k, v in batch.items()}
            path = str(row["path"])
            self.files[path]["duration"] = float(row["duration"])
            self.report.skipped += int(row["n_skipped"])
            if row["error"]:
                self.files[path]["error"] = str(row["error"])
                continue
            if not row["segment_id"]:
                continue
            thumbnails[str(row["segment_id"])] = bytes(row["thumbnail"])
            if int(row["n_tokens"]):
                segments.append(IndexedSegment.from_row(row))
                details[row["segment_id"]] = {"padded": bool(row["padded"]), "path": path}
            if int(row.get("long_n_tokens", 0)):
                long.append(IndexedSegment.from_row({**row, "grid_thw": row["long_grid_thw"],
                                                     "tokens": row["long_tokens"], "n_tokens": row["long_n_tokens"],
                                                     "token_dim": row["long_token_dim"]}))
        if segments or long or thumbnails:
            written, written_long = write_segments(self.index, segments, pipeline="archive", events=self.events,
                                                   details=details, long=long, long_pixels=self.long_pixels,
                                                   thumbnails=thumbnails)
            self.report.segments += len(written)
            self.report.long_tier += len(written_long)
        if self.bar is not None:
            self.bar.set_postfix(segments=self.report.segments)
            self.bar.update(0)

    def finish(self) -> JobReport:
        for path, state in self.files.items():
            if state["error"]:
                self.fail(path, state["error"])
            else:
                self.report.indexed.append(path)
                self.report.source_seconds += state["duration"]
        if self.bar is not None:
            self.bar.update(len(self.files))
            self.bar.close()
        return self.elapsed()

    def elapsed(self) -> JobReport:
        self.report.seconds = time.perf_counter() - self.started
        return self.report


def index_archive(paths: list[str], settings, encoder_cls, *, source_id: str | None = None, index=None,
                  events=None, progress: bool = True, on_progress=None, should_cancel=None,
                  file_roots: list | None = None, reencode_long: bool = False,
                  thumbnails: bool = False) -> JobReport:
    """Index video files into the SegmentIndex. Bad files are reported (and sent to the errors stream); the rest go on.

    encoder_cls: the encoder stage, a callable class constructed with model_path, token_budget, dtype and threads
    (actors.encoder.VisionEncoder). on_progress(report, files_total): called after every batch (job status for the
    REST API). should_cancel(): polled between batches; True stops the job (JobCancelled) keeping what was written.
    file_roots: when given (REST jobs), files outside them after resolving links are left out and reported.
    reencode_long, thumbnails: also fill the long tier or the thumbnails of segments indexed before they existed
    (plan_job).
    """
    from pipeline.index import SegmentIndex
    from pipeline.recordings import point_at_archives
    from pipeline.retention import sweep_retention

    metrics.configure(settings)
    index = index or SegmentIndex(settings.index_root)
    plan = plan_job(paths, settings, index, source_id, file_roots, reencode_long, thumbnails)
    point_at_archives(settings, plan.rows)          # clips read the original files (pipeline/recordings.py)
    writer = JobWriter(plan, index, events, progress, settings.long_pixels)
    if plan.files:
        batches = encoded_segments(plan, settings, encoder_cls)
        try:
            for batch in batches:
                writer.write(batch)
                if on_progress is not None:
                    on_progress(writer.elapsed(), len(plan.files))
                if should_cancel is not None and should_cancel():
                    raise JobCancelled(f"cancelled after {writer.report.segments} segments")
        finally:
            batches.close()          # a job that stops early releases its encoders now, not when collected
    report = writer.finish()
    sweep_retention(index, settings)
    return report


def _gpus_per_encoder(settings) -> float:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    return float(settings.gpus_per_encoder) if gpus >= 1 else 0.0


def _encoder_threads(gpus_per_encoder: float, n_actors: int) -> int | None:
    """Torch threads of a CPU encoder actor: the node's cores shared by the pool, not its fractional reservation.

    The reservation stays small so decode tasks keep being scheduled, but on CPU the encoder is usually the slowest
    stage: held to the 1 thread Ray gives a fractional actor, it leaves a core idle once decoding has run ahead.
    """
    import ray

    if gpus_per_encoder > 0:
        return None
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    return max(1, int(node_cpus) // n_actors)


def _cpu_encoder_env(gpus_per_encoder: float) -> dict | None:
    """runtime_env of CPU encoder actors: OpenMP threads that sleep instead of spinning while they wait.

    The encoder's threads share their cores with decode tasks; a spinning thread burns the time slice its descheduled
    partner needs (measured: -20% encoder CPU per segment on a busy 2-core node, no change on idle cores).
    """
    if gpus_per_encoder > 0:
        return None
    return {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="files", unit="file", file=sys.stderr)
