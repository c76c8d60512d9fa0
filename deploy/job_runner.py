"""Running archive jobs: one named Ray actor per job, and the reconciler that settles jobs whose runner is gone.

execute_job runs pipeline.archive.index_archive and keeps the job's status in Redis through deploy.jobs.JobStatus,
so a Redis outage costs the job nothing: progress waits in memory, cancel checks answer the last value read, events
wait in the job's outbox (<outbox_dir>/jobs/<id>), and at the end the job delivers its outbox and records its final
state once Redis is back (it waits up to REDIS_WAIT_S). While no batch arrives and the cluster has less free CPU than
one archive task claims, the status says so in `waiting`.

A job runs in a JobRunner actor named after it: the name is the job's lock (a second runner of the same job cannot
be created) and its liveness (a runner dies with the process that started it, e.g. the service). The JobReconciler
runs in the service: at start and every job_reconcile_seconds it resumes every unfinished job without a runner
(jobs are idempotent: what is indexed is skipped, the outbox is delivered first), fails one that has been resumed
MAX_RESUMES times with the reason, and delivers the outboxes of finished jobs that still hold events
(docs/architecture.md, "Archive jobs").
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from typing import Any

import ray

from deploy.jobs import (ACTIVE_STATES, JobStatus, check_job_request, create_job, finish_job, get_job, job_key,
                         list_job_ids)
from pipeline.redis_server import as_client
from pipeline.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "tubescope"
RUNNER_NAME_PREFIX = "tubescope-job-"
REDIS_WAIT_S = 600.0             # how long a job waits for Redis to record its start, events and final state
WAIT_NOTICE_S = 5.0              # a job without a batch for this long, and no CPU free for its tasks, is waiting
WATCH_INTERVAL_S = 1.0
MAX_RESUMES = 2                  # a job whose runner died this many times after being resumed is failed
QUEUED_GRACE_S = 30.0            # a queued job is its submitter's to start for this long
RECONCILER_LOCK = "tubescope:job-reconciler"


def runner_name(job_id: str) -> str:
    return RUNNER_NAME_PREFIX + job_id


def job_outbox(settings: Settings, job_id: str):
    return settings.outbox_dir / "jobs" / job_id


# ---- one job ---------------------------------------------------------------------------------------------------------
class JobWatch:
    """The job's side thread: retries status writes that waited for Redis, says when the job waits for CPUs, and
    calls on_cancel_while_waiting when a job in that state is cancelled (it polls between batches, and none come)."""

    def __init__(self, status: JobStatus, on_cancel_while_waiting=None):
        self.status = status
        self.on_cancel_while_waiting = on_cancel_while_waiting
        self.last_batch = time.monotonic()
        self.waiting: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-watch", daemon=True)

    def start(self) -> "JobWatch":
        self._thread.start()
        return self

    def progress(self, report, files_total: int) -> None:
        self.last_batch = time.monotonic()
        fields: dict[str, Any] = {"segments": report.segments, "skipped": report.skipped,
                                  "files_total": files_total, "seconds": report.seconds}
        if self.waiting is not None:
            self.waiting = fields["waiting"] = None
        self.status.update(**fields)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self.status.flush()
                waiting = self._why_waiting()
                if waiting != self.waiting and (waiting is None or self.waiting is None):
                    self.waiting = waiting
                    self.status.update(waiting=waiting)
                if self.waiting and self.on_cancel_while_waiting and self.status.cancel_requested():
                    self.on_cancel_while_waiting()
                    return
            except Exception:  # noqa: BLE001 - the watch must never end the job
                log.exception("job %s: status watch failed", self.status.job_id)

    def _why_waiting(self) -> str | None:
        from pipeline.archive import DECODE_TASK_CPUS

        stalled = time.monotonic() - self.last_batch
        if stalled < WAIT_NOTICE_S:
            return None
        free = ray.available_resources().get("CPU", 0.0)
        if free >= DECODE_TASK_CPUS:
            return None
        total = ray.cluster_resources().get("CPU", 0.0)
        return (f"waiting for resources: {free:g} of the cluster's {total:g} CPUs are free and each archive task "
                f"needs {DECODE_TASK_CPUS:g}; feed readers, the live indexer and the decoder hold theirs for as long "
                f"as they run (remove a feed or add CPUs)")


def execute_job(job_id: str, paths: list[str], source_id: str | None, settings: Settings, redis_url: str) -> str:
    """Run one job to its end, keeping its status in Redis; returns the final state ("unrecorded" when Redis stayed
    away longer than REDIS_WAIT_S). Never raises for job errors."""
    from actors.encoder import VisionEncoder
    from pipeline.archive import JobCancelled, index_archive
    from pipeline.archive_sources import expand_sources
    from pipeline.events import EventSink
    from pipeline.index import SegmentIndex

    _quiet_ray_data()
    status = JobStatus(redis_url, job_id)
    try:
        job = status.read(REDIS_WAIT_S)
    except ConnectionError:
        log.error("job %s: Redis did not answer for %g s; the service's reconciler resumes it", job_id, REDIS_WAIT_S)
        return "unrecorded"
    if job.get("cancel_requested"):
        return _finish(status, None, state="cancelled", finished=time.time())
    files, _ = expand_sources(paths, settings.file_roots)
    status.update(state="running", started=job.get("started") or time.time(), files_total=len(files), waiting=None)
    events = EventSink(redis_url, job_outbox(settings, job_id), maxlen=settings.stream_maxlen,
                       outbox_max=settings.outbox_max_events)

    def cancel_while_waiting() -> None:
        # the driver thread is parked in Ray Data's iterator until a task starts: record the end here, then end the
        # runner (its tasks go with it); outside a runner, the job stops at its next batch as usual
        if ray.get_runtime_context().get_actor_id() is None:
            return
        _finish(status, events, state="cancelled", error="cancelled while waiting for resources", waiting=None,
                finished=time.time())
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    watch = JobWatch(status, cancel_while_waiting).start()
    try:
        index = SegmentIndex(settings.index_root, create=False)     # made by the service; a vanished one fails
        report = index_archive(paths, settings, VisionEncoder, source_id=source_id, index=index, events=events,
                               progress=False, on_progress=watch.progress, should_cancel=status.cancel_requested,
                               file_roots=settings.file_roots)
        final = dict(state=_final_state(report), segments=report.segments, skipped=report.skipped,
                     source_seconds=report.source_seconds, indexed=report.indexed, failures=report.failed,
                     seconds=report.seconds)
    except JobCancelled as e:
        final = dict(state="cancelled", error=str(e))
    except Exception as e:  # noqa: BLE001 - any crash is the job's failure, recorded where the caller looks
        log.exception("job %s failed", job_id)
        final = dict(state="failed", error=f"{type(e).__name__}: {e}"[:2000])
    finally:
        watch.stop()
    return _finish(status, events, **final, waiting=None, finished=time.time())


def _finish(status: JobStatus, events, **final: Any) -> str:
    """Deliver the job's events, then record its final state: whoever sees the state sees every event."""
    deadline = time.monotonic() + REDIS_WAIT_S
    if events is not None:
        while True:
            events.flush()
            if not events.pending or time.monotonic() >= deadline:
                break
            time.sleep(status.retry_after_s)
        events.close()
        final["events"] = events.stats()
        if not events.pending:
            shutil.rmtree(events.outbox_dir, ignore_errors=True)
    recorded = status.finish(max(0.0, deadline - time.monotonic()), **final)
    status.close()
    return final["state"] if recorded else "unrecorded"


def _final_state(report) -> str:
    if not report.failed:
        return "succeeded"
    return "partial" if report.indexed else "failed"


def _quiet_ray_data() -> None:
    """No progress bars from a job: nobody watches this worker's terminal (progress goes to the job status), and
    Ray forwards worker output to the driver, where the bars would garble `tubescope serve`'s output."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# num_cpus=0: the runner only drives Ray Data; the decode tasks and encoder actors claim the CPUs.
@ray.remote(num_cpus=0, max_restarts=0)
class JobRunner:
    def run(self, job_id: str, paths: list[str], source_id: str | None, settings: Settings, redis_url: str) -> str:
        return execute_job(job_id, paths, source_id, settings, redis_url)


def runner_alive(job_id: str) -> bool:
    try:
        ray.get_actor(runner_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


class JobRunners:
    """The runners this process started. start() creates a job's runner unless one exists; reap() ends those whose
    job returned (an idle runner would keep a worker process)."""

    def __init__(self):
        self._running: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def start(self, job: dict, settings: Settings, redis_url: str) -> bool:
        """Start the job's runner; False when another one already runs it (or its name is not free yet)."""
        try:
            runner = JobRunner.options(name=runner_name(job["id"]), namespace=NAMESPACE).remote()
        except ValueError:
            return False
        ref = runner.run.remote(job["id"], job["paths"], job.get("source_id"), settings, redis_url)
        with self._lock:
            self._running[job["id"]] = (runner, ref)
        return True

    def reap(self) -> list[str]:
        with self._lock:
            running = dict(self._running)
        done = []
        for job_id, (runner, ref) in running.items():
            if not ray.wait([ref], timeout=0)[0]:
                continue
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the reconciler resumes the job
                log.warning("job %s: its runner died (%s: %s)", job_id, type(e).__name__, e)
            ray.kill(runner, no_restart=True)
            with self._lock:
                self._running.pop(job_id, None)
            done.append(job_id)
        return done

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)


def submit_job(redis_url: str, settings: Settings, paths: list[str], source_id: str | None,
               runners: JobRunners) -> dict:
    """Check the request, store it, start its runner; returns its status. ValueError for bad input."""
    paths, source_id = check_job_request(paths, source_id, settings)
    record = create_job(redis_url, paths, source_id)
    runners.start(record, settings, redis_url)
    return record


# ---- jobs whose runner is gone ---------------------------------------------------------------------------------------
def reconcile_jobs(redis: Any, settings: Settings, runners: JobRunners,
                   queued_grace_s: float = QUEUED_GRACE_S) -> dict[str, list[str]]:
    """Settle every unfinished job without a runner: resume it, or fail it with the reason once it has been resumed
    MAX_RESUMES times; then deliver the outboxes that finished jobs left. Returns the job ids per action.
    redis: the service's client or URL; settings.redis_url is what runners and outboxes use."""
    client, redis_url = as_client(redis), settings.redis_url
    done: dict[str, list[str]] = {"resumed": [], "failed": [], "delivered": []}
    runners.reap()
    for job_id in list_job_ids(client):
        try:
            job = get_job(client, job_id)
        except KeyError:                               # expired meanwhile
            continue
        if job["state"] not in ACTIVE_STATES or runner_alive(job_id):
            continue
        if job["state"] == "queued" and time.time() - job["created"] < queued_grace_s:
            continue
        resumes = int(job.get("resumes") or 0)
        if resumes >= MAX_RESUMES or job.get("cancel_requested"):
            if job.get("cancel_requested"):
                final = dict(state="cancelled", error="cancelled while its runner was gone")
            else:
                final = dict(state="failed", error=f"its runner stopped before the job finished {resumes + 1} "
                                                   f"times (the service restarted or the worker died); not resumed "
                                                   f"again: run it as a new job")
            _deliver_outbox(settings, redis_url, job_id)
            finish_job(client, job_id, **final, waiting=None, finished=time.time())
            done["failed"].append(job_id)
            log.warning("job %s: %s", job_id, final["error"])
        elif runners.start(job, settings, redis_url):
            client.hset(job_key(job_id), "resumes", json.dumps(resumes + 1))
            done["resumed"].append(job_id)
            log.warning("job %s was %s without a runner: resumed (time %d)", job_id, job["state"], resumes + 1)
    done["delivered"] = sweep_job_outboxes(settings, client)
    return done


def sweep_job_outboxes(settings: Settings, redis: Any) -> list[str]:
    """Deliver the events left in the outboxes of jobs that are finished or forgotten (no runner, no active
    record), and remove the emptied folders; the outbox of an active job is its runner's. Returns those emptied."""
    root = settings.outbox_dir / "jobs"
    if not root.is_dir():
        return []
    client, emptied = as_client(redis), []
    for job_id in sorted(os.listdir(root)):
        try:
            active = get_job(client, job_id)["state"] in ACTIVE_STATES
        except KeyError:
            active = False
        if active or runner_alive(job_id):
            continue
        if _deliver_outbox(settings, settings.redis_url, job_id):
            emptied.append(job_id)
    return emptied


def _deliver_outbox(settings: Settings, redis_url: str, job_id: str) -> bool:
    """Deliver one job's outbox; True (and the folder removed) when it is empty afterwards."""
    from pipeline.events import EventSink

    folder = job_outbox(settings, job_id)
    if not folder.is_dir():
        return False
    sink = EventSink(redis_url, folder, maxlen=settings.stream_maxlen, outbox_max=settings.outbox_max_events,
                     flush_interval_s=None)
    try:
        sink.flush()
        empty = sink.pending == 0
    finally:
        sink.close()
    if empty:
        shutil.rmtree(folder, ignore_errors=True)
    return empty


class JobReconciler:
    """reconcile_jobs at start and every job_reconcile_seconds, in a thread of the service. Rounds of several
    services (API replicas) take turns through a short Redis lock; a failed round (Redis away) is retried."""

    def __init__(self, settings: Settings, runners: JobRunners):
        self.settings, self.runners = settings, runners
        self.client = as_client(settings.redis_url)
        self.rounds, self.last_error = 0, ""
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-reconciler", daemon=True)

    def start(self) -> "JobReconciler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def round(self) -> dict[str, list[str]] | None:
        client = self.client
        lease_ms = int(max(10.0, 3 * self.settings.job_reconcile_seconds) * 1000)
        if not client.set(RECONCILER_LOCK, self._token, nx=True, px=lease_ms) \
                and (client.get(RECONCILER_LOCK) or b"").decode() != self._token:
            return None
        client.pexpire(RECONCILER_LOCK, lease_ms)
        return reconcile_jobs(client, self.settings, self.runners)

    def _loop(self) -> None:
        while True:
            try:
                self.round()
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - Redis away, Ray busy: the next round retries
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("job reconcile round failed: %s", self.last_error)
            self.rounds += 1
            if self._stop.wait(self.settings.job_reconcile_seconds):
                return


__all__ = ["JobReconciler", "JobRunner", "JobRunners", "execute_job", "reconcile_jobs", "runner_alive",
           "runner_name", "submit_job", "sweep_job_outboxes"]
