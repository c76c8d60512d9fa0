"""Archive jobs: files -> (file, time window) rows -> 2 fps decode -> tubes -> [encoder] -> SegmentIndex.

The encoder stage is passed in as a callable class (actors.VisionEncoder), so pipeline never imports actors. The driver
writes the index and the Redis events as encoded segments arrive: it sees every row, so the report is exact.
"""
from __future__ import annotations

import glob
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".ts", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp",
                    ".mxf", ".h264", ".hevc"}


@dataclass
class JobReport:
    indexed: list[str] = field(default_factory=list)          # paths with every segment indexed
    failed: list[dict] = field(default_factory=list)          # {"path", "error"}
    segments: int = 0                                         # segments written by this job
    skipped: int = 0                                          # segments already in the index (idempotent re-runs)
    seconds: float = 0.0                                      # wall time
    source_seconds: float = 0.0                               # media seconds covered

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        if not self.failed:
            return 0
        return 2 if self.indexed else 1


# ---- sources ---------------------------------------------------------------------------------------------------------
def expand_sources(paths: list[str]) -> tuple[list[str], list[dict]]:
    """Files, folders (recursive, video extensions), globs, and pyarrow.fs URIs -> (files, failures)."""
    files, failed = [], []
    for p in paths:
        if "://" in p and not p.startswith("file://"):
            files.extend(_expand_uri(p, failed))
            continue
        p = p[len("file://"):] if p.startswith("file://") else p
        if any(ch in p for ch in "*?["):
            hits = sorted(h for h in glob.glob(p, recursive=True) if os.path.isfile(h))
            if not hits:
                failed.append({"path": p, "error": "glob matched no files"})
            files.extend(os.path.abspath(h) for h in hits)
        elif os.path.isdir(p):
            hits = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
            if not hits:
                failed.append({"path": p, "error": "folder holds no video files"})
            files.extend(os.path.abspath(h) for h in hits)
        elif os.path.isfile(p):
            files.append(os.path.abspath(p))
        else:
            failed.append({"path": p, "error": "no such file or directory"})
    seen, unique = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique, failed


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


# ---- stages (run as Ray tasks) ----------------------------------------------------------------------------------------
def plan_windows(row: dict, segment_seconds: float, segments_per_window: int, done_ids: frozenset = frozenset()) -> list[dict]:
    """Probe one file and cut it into windows of whole segments; a window whose segments are all indexed is dropped."""
    from pipeline.decode import DecodeError, probe
    from pipeline.records import segment_id_for

    try:
        info = probe(row["path"])
    except (DecodeError, OSError, ValueError) as e:
        return [{**row, "start": 0.0, "end": 0.0, "error": str(e), "n_skipped": 0}]
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
        r["duration"] = duration
    return out


def decode_to_tube_rows(row: dict, fps: float, segment_seconds: float, min_pixels: int, max_pixels: int) -> list[dict]:
    """One window -> one row per segment with its uint8 pixel rows; failures become a row with `error` set."""
    from pipeline.decode import DecodeError, decode_window
    from pipeline.tubes import segment_frames, tubes_from_segment

    base = {"path": row["path"], "source_id": row["source_id"], "duration": row.get("duration", 0.0),
            "n_skipped": row.get("n_skipped", 0)}
    if row["error"] or row["end"] <= row["start"]:
        return [_tube_row(base, None, row["error"])]
    try:
        frames = decode_window(row["path"], row["start"], row["end"], fps=fps, min_pixels=min_pixels,
                               max_pixels=max_pixels)
        segments = segment_frames(row["source_id"], frames, segment_seconds=segment_seconds, fps=fps)
        out = [_tube_row(base, tubes_from_segment(s, as_uint8=True), "") for s in segments]
    except (DecodeError, OSError, ValueError) as e:
        return [_tube_row(base, None, f"{type(e).__name__}: {e}")]
    if out:
        out[0]["n_skipped"] = base["n_skipped"]
        for r in out[1:]:
            r["n_skipped"] = 0
    return out or [_tube_row(base, None, "")]


def _tube_row(base: dict, tubes, error: str) -> dict:
    if tubes is None:
        return {**base, "segment_id": "", "t0": 0.0, "t1": 0.0, "grid_thw": np.zeros(3, np.int64),
                "tube_ts": np.zeros(0, np.float64), "padded": False, "pixel_rows": np.zeros((0, 1176), np.uint8),
                "error": error}
    return {**base, "segment_id": tubes.segment_id, "t0": float(tubes.t0), "t1": float(tubes.t1),
            "grid_thw": np.asarray(tubes.grid_thw, np.int64), "tube_ts": np.asarray(tubes.tube_ts, np.float64),
            "padded": bool(getattr(tubes, "padded", False)), "pixel_rows": np.asarray(tubes.pixel_rows),
            "error": ""}


# ---- the job ----------------------------------------------------------------------------------------------------------
class JobCancelled(Exception):
    """Raised inside index_archive when should_cancel() says so; what was indexed before stays indexed."""


def index_archive(paths: list[str], settings, *, encoder_cls=None, source_id: str | None = None, index=None,
                  events=None, progress: bool = True, on_progress=None, should_cancel=None) -> JobReport:
    """Index video files into the SegmentIndex. Bad files are reported (and sent to the errors stream); the rest go on.

    on_progress(report, files_total): called after every batch of encoded segments (job status for the REST API).
    should_cancel(): polled between batches; True stops the job (JobCancelled) keeping what was written.

    encoder_cls: the Ray Data encoder stage, constructed with model_path, token_budget, dtype and threads (None: keep
    the actor default); None means actors.encoder.VisionEncoder, resolved by name at call time so
    that pipeline keeps no import-time dependency on actors.
    """
    import importlib

    import ray

    if encoder_cls is None:
        encoder_cls = importlib.import_module("actors.encoder").VisionEncoder

    from pipeline import metrics
    from pipeline.checkpoints import model_id
    from pipeline.events import ERRORS_STREAM, SEGMENTS_STREAM
    from pipeline.index import SegmentIndex
    from pipeline.records import IndexedSegment

    t_start = time.perf_counter()
    report = JobReport()
    files, failures = expand_sources(list(paths))
    index = index or SegmentIndex(settings.index_root)
    model_path = str(settings.resolved_model_path())
    mid = model_id(model_path)

    def fail(path: str, error: str):
        report.failed.append({"path": path, "error": error})
        metrics.record_decode_error(metrics.decode_error_kind(error))
        if events is not None:
            events.emit(ERRORS_STREAM, {"path": path, "error": error, "stage": "index"})

    for f in failures:
        fail(f["path"], f["error"])
    if not files:
        report.seconds = time.perf_counter() - t_start
        return report

    rows = []
    for p in files:
        sid = source_id_for(p, source_id, len(files))
        rows.append({"path": p, "source_id": sid})
    done = {r["source_id"]: frozenset(s["segment_id"] for s in index.list(r["source_id"], model_id=mid)) for r in rows}
    seg_s, fps = float(settings.segment_seconds), float(settings.fps)
    window_segments = max(1, int(getattr(settings, "segments_per_task", 8)))

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.flat_map(lambda r: plan_windows(r, seg_s, window_segments, done[r["source_id"]]), num_cpus=0.25)
    ds = ds.flat_map(lambda r: decode_to_tube_rows(r, fps, seg_s, settings.min_pixels, settings.max_pixels),
                     num_cpus=1)
    n_actors = max(1, int(settings.num_encoder_actors))
    gpus = _gpus_per_encoder(settings)
    ds = ds.map_batches(encoder_cls, fn_constructor_kwargs={"model_path": model_path,
                                                            "token_budget": settings.encoder_token_budget,
                                                            "dtype": settings.encoder_dtype,
                                                            "threads": _encoder_threads(gpus, n_actors)},
                        compute=ray.data.ActorPoolStrategy(size=n_actors),
                        num_cpus=settings.encoder_cpus, num_gpus=gpus,
                        batch_size=int(settings.encoder_batch_segments), batch_format="numpy",
                        **_cpu_encoder_env(gpus))

    per_file: dict[str, dict] = {p: {"error": None, "segments": 0, "duration": 0.0} for p in files}
    bar = _progress(progress, len(files))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        new_segments = []
        for i in range(len(batch["path"])):
            path = str(batch["path"][i])
            st = per_file[path]
            st["duration"] = float(batch["duration"][i])
            report.skipped += int(batch["n_skipped"][i])
            if batch["error"][i]:
                st["error"] = str(batch["error"][i])
                continue
            if not batch["segment_id"][i]:
                continue
            dim = int(batch["token_dim"][i])
            tokens = np.frombuffer(batch["tokens"][i], dtype=np.float16).reshape(-1, dim)
            new_segments.append((path, IndexedSegment(
                segment_id=str(batch["segment_id"][i]), source_id=str(batch["source_id"][i]),
                t0=float(batch["t0"][i]), t1=float(batch["t1"][i]),
                grid_thw=tuple(int(x) for x in batch["grid_thw"][i]),
                tube_ts=[float(x) for x in batch["tube_ts"][i]], tokens=tokens, model_id=str(batch["model_id"][i]))))
        if new_segments:
            written = index.add([s for _, s in new_segments])
            report.segments += written
            metrics.record_segments_indexed(written, "archive")
            for path, s in new_segments:
                per_file[path]["segments"] += 1
                if events is not None:
                    events.emit(SEGMENTS_STREAM, {"segment_id": s.segment_id, "source_id": s.source_id,
                                                  "t0": f"{s.t0:.3f}", "t1": f"{s.t1:.3f}", "path": path,
                                                  "tokens": str(s.tokens.shape[0]), "model_id": s.model_id})
        if bar is not None:
            bar.set_postfix(segments=report.segments)
            bar.update(0)
        if on_progress is not None:
            report.seconds = time.perf_counter() - t_start
            on_progress(report, len(files))
        if should_cancel is not None and should_cancel():
            raise JobCancelled(f"cancelled after {report.segments} segments")
    for p in files:
        st = per_file[p]
        if st["error"]:
            fail(p, st["error"])
        else:
            report.indexed.append(p)
            report.source_seconds += st["duration"]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - t_start
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


def _cpu_encoder_env(gpus_per_encoder: float) -> dict:
    """Ray options of CPU encoder actors: OpenMP threads that sleep instead of spinning while they wait.

    The encoder's threads share their cores with decode tasks; a spinning thread burns the time slice its descheduled
    partner needs (measured: -20% encoder CPU per segment on a busy 2-core node, no change on idle cores).
    """
    if gpus_per_encoder > 0:
        return {}
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}}


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="files", unit="file", file=sys.stderr)
