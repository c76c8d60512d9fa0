"""Archive jobs of the REST API: a Ray task runs pipeline.archive.index_archive; its status lives in Redis.

Status: hash `tubescope:jobs:<id>`, every field JSON-encoded: id, state, paths, source_id, created, started,
finished, files_total, segments, skipped, source_seconds, indexed, failures, error, cancel_requested.
States: queued -> running -> succeeded | partial (some inputs failed) | failed | cancelled.
Cancel: DELETE sets cancel_requested; the job polls it between batches (index_archive's should_cancel) and stops,
keeping what it already indexed. A finished job's status expires after JOB_TTL_S.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import redis as redis_lib

from pipeline.settings import Settings
from pipeline.redis_server import as_client

log = logging.getLogger(__name__)

JOBS_PREFIX = "tubescope:jobs:"
JOB_TTL_S = 7 * 86_400
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "partial", "failed", "cancelled")
_GLOB_CHARS = "*?["
_MAX_SOURCE_ID = 200


def job_key(job_id: str) -> str:
    return JOBS_PREFIX + job_id


# ---- input checks ----------------------------------------------------------------------------------------------------
def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def check_job_path(path: Any, settings: Settings) -> str:
    """The path as the job will read it, or ValueError: local paths (files, folders, globs) must lie under
    settings.file_roots; URIs need a scheme listed in settings.job_uri_schemes."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"each path must be a non-empty string, got {path!r}")
    path = path.strip()
    if any(ord(c) < 32 for c in path):
        raise ValueError(f"path {path!r} contains control characters")
    if "://" in path and not path.startswith("file://"):
        scheme = path.split("://", 1)[0].lower()
        if scheme not in settings.job_uri_schemes:
            allowed = ", ".join(settings.job_uri_schemes) or "none (set job_uri_schemes)"
            raise ValueError(f"URI scheme {scheme!r} of {path!r} is not allowed for jobs; allowed: {allowed}")
        return path
    local = path[len("file://"):] if path.startswith("file://") else path
    if not Path(local).is_absolute():
        raise ValueError(f"path {local!r} must be absolute (the server's working directory is not yours)")
    if ".." in Path(local).parts:
        raise ValueError(f"path {local!r} must not contain '..'")
    roots = settings.file_roots
    if not roots:
        raise ValueError("this server reads no local files: no file_roots are configured")
    magic = min((local.index(c) for c in _GLOB_CHARS if c in local), default=None)
    fixed = local if magic is None else local[:magic].rsplit("/", 1)[0] or "/"
    if not _under(Path(fixed).resolve(), roots):     # resolve(): a symlink out of the roots is refused too
        raise ValueError(f"path {local!r} is outside the allowed roots ({', '.join(map(str, roots))})")
    return local


def check_job_request(paths: Any, source_id: Any, settings: Settings) -> tuple[list[str], str | None]:
    if not isinstance(paths, list) or not paths:
        raise ValueError("paths must be a non-empty list of files, folders, globs or URIs")
    if len(paths) > settings.api_max_job_paths:
        raise ValueError(f"a job takes at most {settings.api_max_job_paths} paths (api_max_job_paths), "
                         f"got {len(paths)}")
    checked = [check_job_path(p, settings) for p in paths]
    if source_id is not None:
        if (not isinstance(source_id, str) or not source_id.strip() or len(source_id) > _MAX_SOURCE_ID
                or any(ord(c) < 32 for c in source_id) or ".." in source_id.split("/")):
            raise ValueError(f"source_id must be a non-empty string of at most {_MAX_SOURCE_ID} characters "
                             f"without control characters or '..', got {source_id!r}")
        source_id = source_id.strip()
    return checked, source_id


# ---- status records ----------------------------------------------------------------------------------------------------
def _write(client: redis_lib.Redis, job_id: str, **fields: Any) -> None:
    client.hset(job_key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})


def get_job(redis: Any, job_id: str) -> dict:
    """The job's status; KeyError for an unknown (or expired) id."""
    raw = as_client(redis).hgetall(job_key(job_id))
    if not raw:
        raise KeyError(f"no job with id {job_id!r}")
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


def create_job(redis: Any, paths: list[str], source_id: str | None) -> dict:
    """Store a queued job and return its status (the caller then starts run_job)."""
    job_id = uuid.uuid4().hex[:12]
    record = {"id": job_id, "state": "queued", "paths": list(paths), "source_id": source_id,
              "created": time.time(), "started": None, "finished": None, "files_total": None, "segments": 0,
              "skipped": 0, "source_seconds": 0.0, "indexed": [], "failures": [], "error": None,
              "cancel_requested": False}
    _write(as_client(redis), job_id, **record)
    return record


def request_cancel(redis: Any, job_id: str) -> dict:
    """Ask a job to stop; returns its status. KeyError unknown id; ValueError when it has already finished."""
    client = as_client(redis)
    job = get_job(client, job_id)
    if job["state"] in FINAL_STATES:
        raise ValueError(f"job {job_id!r} has already finished (state {job['state']!r})")
    _write(client, job_id, cancel_requested=True)
    return {**job, "cancel_requested": True}


def mark_lost(redis: Any, job_id: str, error: str) -> None:
    """Record that the job's task died without writing a final state (worker crash)."""
    client = as_client(redis)
    job = get_job(client, job_id)
    if job["state"] in ACTIVE_STATES:
        _write(client, job_id, state="failed", error=error, finished=time.time())
        client.expire(job_key(job_id), JOB_TTL_S)


# ---- the job itself --------------------------------------------------------------------------------------------------------
def _final_state(report) -> str:
    if not report.failed:
        return "succeeded"
    return "partial" if report.indexed else "failed"


def execute_job(job_id: str, paths: list[str], source_id: str | None, settings: Settings, redis_url: str) -> str:
    """Run one job to its end, keeping its status in Redis; returns the final state. Never raises for job errors."""
    from actors.encoder import VisionEncoder
    from pipeline.archive import JobCancelled, expand_sources, index_archive
    from pipeline.events import EventSink
    from pipeline.index import SegmentIndex

    _quiet_ray_data()
    client = as_client(redis_url)
    if get_job(client, job_id).get("cancel_requested"):
        _write(client, job_id, state="cancelled", finished=time.time())
        client.expire(job_key(job_id), JOB_TTL_S)
        return "cancelled"
    files, _ = expand_sources(paths, settings.file_roots)
    _write(client, job_id, state="running", started=time.time(), files_total=len(files))
    events = EventSink(redis_url, settings.outbox_dir / "jobs" / job_id, maxlen=settings.stream_maxlen,
                       outbox_max=settings.outbox_max_events)

    def on_progress(report, n_files: int) -> None:
        _write(client, job_id, segments=report.segments, skipped=report.skipped, files_total=n_files,
               seconds=report.seconds)

    def should_cancel() -> bool:
        return bool(json.loads(client.hget(job_key(job_id), "cancel_requested") or "false"))

    try:
        index = SegmentIndex(settings.index_root, create=False)     # made by the service; a vanished one fails
        report = index_archive(paths, settings, VisionEncoder, source_id=source_id, index=index, events=events,
                               progress=False, on_progress=on_progress, should_cancel=should_cancel,
                               file_roots=settings.file_roots)
        state = _final_state(report)
        _write(client, job_id, state=state, segments=report.segments, skipped=report.skipped,
               source_seconds=report.source_seconds, indexed=report.indexed, failures=report.failed,
               seconds=report.seconds, finished=time.time())
    except JobCancelled as e:
        state = "cancelled"
        _write(client, job_id, state=state, error=str(e), finished=time.time())
    except Exception as e:  # noqa: BLE001 - any crash is the job's failure, recorded where the caller looks
        log.exception("job %s failed", job_id)
        state = "failed"
        _write(client, job_id, state=state, error=f"{type(e).__name__}: {e}"[:2000], finished=time.time())
    finally:
        events.close()
    client.expire(job_key(job_id), JOB_TTL_S)
    client.close()
    return state


def _quiet_ray_data() -> None:
    """No progress bars from a job: nobody watches this worker's terminal (progress goes to the job status), and
    Ray forwards worker output to the driver, where the bars would garble `tubescope serve`'s output."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# num_cpus=0: the job only drives Ray Data; the decode tasks and encoder actors claim the CPUs.
run_job = ray.remote(num_cpus=0, max_retries=0)(execute_job)


def submit_job(redis_url: str, settings: Settings, paths: list[str], source_id: str | None) -> tuple[dict, Any]:
    """Check the request, store it, start its task: (status, ObjectRef of the final state). ValueError bad input."""
    paths, source_id = check_job_request(paths, source_id, settings)
    record = create_job(redis_url, paths, source_id)
    ref = run_job.remote(record["id"], paths, source_id, settings, redis_url)
    return record, ref


__all__ = ["JOBS_PREFIX", "ACTIVE_STATES", "FINAL_STATES", "check_job_path", "check_job_request", "create_job",
           "execute_job", "get_job", "job_key", "mark_lost", "request_cancel", "run_job", "submit_job"]
