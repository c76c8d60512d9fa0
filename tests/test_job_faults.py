"""Archive jobs under faults, with real Ray, a real redis-server the tests stop and restart, and real videos.

Each test prints a FAULT row (fault, segments indexed, events emitted, lost, duplicated, seconds to recover).
"""
from __future__ import annotations

import json
import time

import pytest
import ray

import qwen2vl
from deploy.capacity import check_reader_capacity, reader_capacity
from deploy.job_runner import MAX_RESUMES, JobRunners, job_outbox, reconcile_jobs, runner_alive
from deploy.jobs import ACTIVE_STATES, create_job, get_job, job_key, request_cancel
from pipeline.events import SEGMENTS_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.settings import load_settings
from services import start_redis
from streams import wait_for
from videos import encode_video

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def redis_kept(tmp_path):
    """A redis-server that keeps its data across stop() and start() on the same port."""
    server = start_redis(tmp_path / "redis", persist=True)
    yield server
    server.stop()


def _settings(tmp_path, model, redis, **kw):
    return load_settings(data_dir=tmp_path / "data", model_path=model, redis_url=redis.url, segment_seconds=2.0,
                         min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, encoder_token_budget=300,
                         file_roots=[tmp_path / "videos"], captions=False, **kw)


def _start(settings, redis, runners, paths, source_id):
    job = create_job(redis.url, [str(p) for p in paths], source_id)
    assert runners.start(job, settings, redis.url)
    return job["id"]


def _wait_final(redis, job_id, timeout_s):
    return wait_for(lambda: (lambda j: j if j["state"] not in ACTIVE_STATES else None)(get_job(redis.url, job_id)),
                    timeout_s, 0.25, f"job {job_id} to finish")


def _event_ids(redis, source):
    return [f[b"segment_id"].decode() for _, f in redis.client().xrange(SEGMENTS_STREAM)
            if f[b"source_id"].decode() == source]


def _fault_row(fault, index, redis, source, recover_s):
    indexed = {r["segment_id"] for r in index.list(source)}
    events = _event_ids(redis, source)
    row = dict(fault=fault, indexed=len(indexed), events=len(events), lost=len(indexed - set(events)),
               duplicated=len(events) - len(set(events)), recover_s=round(recover_s, 1))
    print("FAULT", json.dumps(row))
    return row


@ray.remote(num_cpus=0.25)
class Claim:
    """Holds a quarter CPU, as a feed reader does."""

    def ready(self) -> bool:
        return True


def _claim_until(free_cpus):
    """Quarter-CPU claims until the cluster has free_cpus left (whatever earlier tests of the session still hold)."""
    n = round((ray.available_resources().get("CPU", 0.0) - free_cpus) / 0.25)
    assert n >= 0, ray.available_resources()
    claims = [Claim.remote() for _ in range(n)]
    ray.get([c.ready.remote() for c in claims])
    assert ray.available_resources().get("CPU", 0.0) == pytest.approx(free_cpus)
    return claims


def test_reader_capacity_leaves_room_for_an_archive_task():
    s = load_settings()         # decoder 0.25 + a live encoder (0.5) per 8 feeds + one archive task 0.25
    assert reader_capacity(s, 2) == 4 and reader_capacity(s, 16) == 48 and reader_capacity(s, 0.5) == 0
    check_reader_capacity(s, 3, 2)
    with pytest.raises(ValueError, match="no capacity left for another feed reader.*4 feed"):
        check_reader_capacity(s, 4, 2)


def test_a_job_progresses_beside_feeds_and_says_when_it_waits_for_cpus(tmp_path, ray_local, redis_kept, tiny_model):
    """Two file feeds (real readers, 0.25 CPU each) and the live indexer's and decoder's claims (0.75) leave 0.75 of
    2 CPUs: a job still runs. With every CPU claimed it says it waits for resources, and goes on once freed."""
    from actors.feeds import FeedSupervisor
    from pipeline.feeds import add_feed

    videos = tmp_path / "videos"
    feed_clip = encode_video(videos / "feed.mp4", 64, 48, 10, seconds=30.0).path
    clips = [encode_video(videos / f"job{i}.mp4", 160, 90, 30, seconds=12.0).path for i in range(2)]
    s = _settings(tmp_path, tiny_model, redis_kept, segments_per_task=2, encoder_batch_segments=2)
    index = SegmentIndex(s.index_root)
    for cam in ("cam1", "cam2"):
        add_feed(redis_kept.url, str(feed_clip), feed_id=cam, file_roots=[videos], settings=s)
    supervisor = FeedSupervisor(redis_kept.url, s, events=False)
    runners, claims, starving = JobRunners(), [], []
    try:
        assert sorted(supervisor.reconcile()["started"]) == ["cam1", "cam2"]
        ray.get([h.status.remote() for h in supervisor.readers().values()])
        claims = _claim_until(0.75)                             # the live indexer (0.5) and the decoder (0.25)

        job_id = _start(s, redis_kept, runners, [clips[0]], "beside")
        done = _wait_final(redis_kept, job_id, 90)
        assert done["state"] == "succeeded" and done["segments"] == 6 and done["waiting"] is None, done
        row = _fault_row("feeds hold 1.25 of 2 CPUs", index, redis_kept, "beside", 0.0)
        assert (row["indexed"], row["events"], row["lost"], row["duplicated"]) == (6, 6, 0, 0)

        starving = _claim_until(0.0)                            # every CPU claimed: no archive task can start
        job_id = _start(s, redis_kept, runners, [clips[1]], "starved")
        waiting = wait_for(lambda: get_job(redis_kept.url, job_id)["waiting"], 30, 0.25, "the job to say it waits")
        assert waiting.startswith("waiting for resources: 0 of the cluster's 2 CPUs are free"), waiting
        assert get_job(redis_kept.url, job_id)["state"] == "running" and not index.list("starved")
        # one more job waits beside it, and is cancelled while it waits: no batch comes, yet it stops
        cancelled = _start(s, redis_kept, runners, [clips[1]], "cancelled")
        wait_for(lambda: get_job(redis_kept.url, cancelled)["waiting"], 30, 0.25, "the second job to wait")
        request_cancel(redis_kept.url, cancelled)
        stopped = _wait_final(redis_kept, cancelled, 20)
        assert (stopped["state"], stopped["error"], stopped["waiting"]) == \
            ("cancelled", "cancelled while waiting for resources", None), stopped
        freed = time.monotonic()
        for c in starving:
            ray.kill(c)
        done = _wait_final(redis_kept, job_id, 90)
        assert done["state"] == "succeeded" and done["segments"] == 6 and done["waiting"] is None, done
        row = _fault_row("every CPU claimed, then freed", index, redis_kept, "starved", time.monotonic() - freed)
        assert (row["indexed"], row["events"], row["lost"], row["duplicated"]) == (6, 6, 0, 0)
        assert not index.list("cancelled")
    finally:
        supervisor.stop_all()
        for c in claims + starving:
            ray.kill(c)
        wait_for(lambda: not runners.reap() and not runners.running(), 30, 0.25, "runners to end")


def test_a_job_rides_out_a_redis_outage(tmp_path, ray_local, redis_kept, tiny_model):
    """Redis stops mid-job for 6 s and comes back with its data: the job keeps indexing, its events wait in its
    outbox, and it ends with its final state recorded and exactly one event per indexed segment."""
    clip = encode_video(tmp_path / "videos" / "long.mp4", 96, 54, 10, seconds=240.0).path
    s = _settings(tmp_path, tiny_model, redis_kept, segments_per_task=1, encoder_batch_segments=1)
    index = SegmentIndex(s.index_root)
    runners = JobRunners()
    job_id = _start(s, redis_kept, runners, [clip], "outage")
    wait_for(lambda: len(index.list("outage")) >= 3, 90, 0.1, "the job to index its first segments")
    redis_kept.stop()
    before = len(index.list("outage"))
    time.sleep(6.0)
    during = len(index.list("outage")) - before
    redis_kept.start()
    back = time.monotonic()
    done = _wait_final(redis_kept, job_id, 120)
    recover_s = time.monotonic() - back
    assert done["state"] == "succeeded" and done["segments"] == 120, done
    assert during > 0, "the outage did not fall in the middle of the job"
    assert done["events"]["queued"] > 0 and done["events"]["pending"] == 0 and done["events"]["dropped"] == 0
    row = _fault_row("redis stopped 6 s mid-job", index, redis_kept, "outage", recover_s)
    assert (row["indexed"], row["events"], row["lost"], row["duplicated"]) == (120, 120, 0, 0)
    assert not job_outbox(s, job_id).exists()
    wait_for(lambda: not runners.reap() and not runners.running(), 30, 0.25, "the runner to end")


def test_a_job_whose_service_died_is_resumed_or_failed_with_the_reason(tmp_path, ray_local, redis_kept, tiny_model):
    """Records left "running" by a dead service, which had indexed half the clip with its events parked in the job's
    outbox (Redis away): reconcile resumes one (what is indexed is skipped, the parked events go first), fails one
    resumed too often with the reason (its parked events delivered), and never starts a second runner."""
    from actors.encoder import VisionEncoder
    from pipeline.archive import index_archive

    clip = encode_video(tmp_path / "videos" / "cam.mp4", 160, 90, 30, seconds=16.0).path
    s = _settings(tmp_path, tiny_model, redis_kept)
    index = SegmentIndex(s.index_root)
    client = redis_kept.client()

    def orphan(source, resumes):
        job = create_job(redis_kept.url, [str(clip)], source)
        client.hset(job_key(job["id"]), mapping={"state": '"running"', "started": json.dumps(time.time() - 60),
                                                 "resumes": json.dumps(resumes)})
        half = encode_video(tmp_path / "half" / f"{source}.mp4", 160, 90, 30, seconds=8.0).path  # same frames
        away = EventSink("redis://127.0.0.1:1/0", job_outbox(s, job["id"]), flush_interval_s=None)
        assert index_archive([str(half)], s, VisionEncoder, source_id=source, index=index, events=away,
                             progress=False).segments == 4
        away.close()
        assert away.pending == 4
        return job["id"]

    resumed, given_up = orphan("resumed", 0), orphan("given-up", MAX_RESUMES)
    runners = JobRunners()
    start = time.monotonic()
    out = reconcile_jobs(redis_kept.client(), s, runners)
    assert out["resumed"] == [resumed] and out["failed"] == [given_up], out
    failed = get_job(redis_kept.url, given_up)
    assert failed["state"] == "failed" and "not resumed again" in failed["error"] and failed["finished"]
    assert not job_outbox(s, given_up).exists()
    row = _fault_row("service died mid-job, resumed too often (failed)", index, redis_kept, "given-up", 0.0)
    assert (row["indexed"], row["events"], row["lost"], row["duplicated"]) == (4, 4, 0, 0)
    assert runner_alive(resumed)
    assert reconcile_jobs(redis_kept.client(), s, runners)["resumed"] == []  # its runner holds the job's name

    done = _wait_final(redis_kept, resumed, 90)
    assert done["state"] == "succeeded" and done["resumes"] == 1, done
    assert (done["segments"], done["skipped"]) == (4, 4)                  # the first 8 s were indexed before
    assert not job_outbox(s, resumed).exists()
    row = _fault_row("service died mid-job (resumed)", index, redis_kept, "resumed", time.monotonic() - start)
    assert (row["indexed"], row["events"], row["lost"], row["duplicated"]) == (8, 8, 0, 0)
    assert _event_ids(redis_kept, "resumed")[:4] == ["resumed:0", "resumed:2000", "resumed:4000", "resumed:6000"]
    wait_for(lambda: not runners.reap() and not runners.running(), 30, 0.25, "the runner to end")
