"""Archive jobs of the REST API: their input checks and their status records in Redis (deploy.job_runner runs them).

Status: hash `tubescope:jobs:<id>`, every field JSON-encoded: id, state, paths, source_id, created, started,
finished, files_total, segments, skipped, source_seconds, indexed, failures, error, cancel_requested, waiting (why
the job makes no progress, e.g. no CPU free for its tasks; null otherwise), resumes (how often the service restarted
it after its runner died), events (the job's event counts: delivered, queued in its outbox, dropped).
States: queued -> running -> succeeded | partial (some inputs failed) | failed | cancelled.
Cancel: DELETE sets cancel_requested; the job polls it between batches (index_archive's should_cancel) and stops,
keeping what it already indexed. A finished job's status expires after JOB_TTL_S.
The job's own writes go through JobStatus, which rides out a Redis outage (docs/architecture.md, "Archive jobs").
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_lib

from pipeline.settings import Settings
from pipeline.redis_server import as_client
from pipeline.video.protocols import path_kind

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
    kind = None if magic is not None else path_kind(local)
    if kind not in (None, "a regular file", "a folder"):         # a FIFO would hang the job's reader
        raise ValueError(f"path {local!r} is {kind}, not a video file or a folder")
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


def _decode(raw: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


def get_job(redis: Any, job_id: str) -> dict:
    """The job's status; KeyError for an unknown (or expired) id."""
    raw = as_client(redis).hgetall(job_key(job_id))
    if not raw:
        raise KeyError(f"no job with id {job_id!r}")
    return _decode(raw)


def list_job_ids(redis: Any) -> list[str]:
    """The ids of every job Redis still holds (finished ones until they expire)."""
    prefix = JOBS_PREFIX.encode()
    keys = as_client(redis).scan_iter(match=JOBS_PREFIX + "*", count=1000)
    return sorted((k if isinstance(k, bytes) else k.encode())[len(prefix):].decode() for k in keys)


def create_job(redis: Any, paths: list[str], source_id: str | None) -> dict:
    """Store a queued job and return its status (the caller then starts its runner)."""
    job_id = uuid.uuid4().hex[:12]
    record = {"id": job_id, "state": "queued", "paths": list(paths), "source_id": source_id,
              "created": time.time(), "started": None, "finished": None, "files_total": None, "segments": 0,
              "skipped": 0, "source_seconds": 0.0, "indexed": [], "failures": [], "error": None,
              "cancel_requested": False, "waiting": None, "resumes": 0, "events": None}
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


def finish_job(redis: Any, job_id: str, **fields: Any) -> None:
    """Write a job's final fields (state among FINAL_STATES, finished) and start its expiry, in one transaction."""
    pipe = as_client(redis).pipeline()
    pipe.hset(job_key(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})
    pipe.expire(job_key(job_id), JOB_TTL_S)
    pipe.execute()


class JobStatus:
    """A running job's writes to its status record, which never fail because Redis is away.

    update() keeps the fields it could not write (the newest value of each wins) and writes them with the next
    update() or flush(); while Redis is down (for retry_after_s after a failure) nothing is tried, so an outage
    costs the job nothing per batch. cancel_requested() answers the last value it read. finish() retries until the
    final state is written or its deadline passes.
    """

    def __init__(self, redis: Any, job_id: str, retry_after_s: float = 1.0):
        self.client, self.job_id = as_client(redis), job_id
        self.retry_after_s = float(retry_after_s)
        self._pending: dict[str, Any] = {}
        self._cancel = False
        self._down_until = 0.0
        self._lock = threading.Lock()

    def read(self, wait_s: float) -> dict:
        """The record as stored, waiting up to wait_s for Redis; KeyError for an unknown job, ConnectionError when
        Redis did not come back in time."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                job = get_job(self.client, self.job_id)
                self._cancel = bool(job.get("cancel_requested"))
                return job
            except redis_lib.RedisError as e:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"Redis did not answer for {wait_s:g} s: {e}") from e
                time.sleep(self.retry_after_s)

    def update(self, **fields: Any) -> bool:
        """Write these fields (and any left over); False when they wait for Redis."""
        with self._lock:
            self._pending.update(fields)
            return self._flush_locked()

    def flush(self) -> bool:
        with self._lock:
            return self._flush_locked()

    @property
    def pending(self) -> dict[str, Any]:
        return dict(self._pending)

    def cancel_requested(self) -> bool:
        with self._lock:
            if time.monotonic() >= self._down_until:
                try:
                    self._cancel = bool(json.loads(self.client.hget(job_key(self.job_id), "cancel_requested")
                                                   or "false"))
                except redis_lib.RedisError as e:
                    self._unavailable(e)
            return self._cancel

    def finish(self, wait_s: float, **fields: Any) -> bool:
        """Write the final fields and start the record's expiry, retrying for up to wait_s; False if Redis stayed
        away (the record keeps its last state, and the service's reconciler settles it)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            self._pending.update(fields)
            while True:
                try:
                    finish_job(self.client, self.job_id, **self._pending)
                    self._pending.clear()
                    return True
                except redis_lib.RedisError as e:
                    self._unavailable(e)
                    if time.monotonic() >= deadline:
                        log.error("job %s: could not record its final state: Redis away for %g s", self.job_id,
                                  wait_s)
                        return False
                time.sleep(self.retry_after_s)

    def close(self) -> None:
        self.client.close()

    def _flush_locked(self) -> bool:
        if not self._pending:
            return True
        if time.monotonic() < self._down_until:
            return False
        try:
            _write(self.client, self.job_id, **self._pending)
        except redis_lib.RedisError as e:
            self._unavailable(e)
            return False
        self._pending.clear()
        return True

    def _unavailable(self, e: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("job %s: Redis unavailable (%s: %s); status writes wait", self.job_id, type(e).__name__, e)
        self._down_until = time.monotonic() + self.retry_after_s


__all__ = ["JOBS_PREFIX", "ACTIVE_STATES", "FINAL_STATES", "JobStatus", "check_job_path", "check_job_request",
           "create_job", "finish_job", "get_job", "job_key", "list_job_ids", "request_cancel"]
