"""tubescope metrics end to end through a real Prometheus (naming and the helpers without Ray: test_metric_helpers.py).

The end-to-end test runs a real workload (an archive job and two live feeds with the tiny model, a retention
sweep, an event outbox that overflows, real asks and a search by the Decoder in a Ray actor, as in its Serve replica,
and two slow HTTP clients cut off by the proxy's protocol in a Ray worker) in a subprocess that starts its own Ray
with a known metrics export port and a 1 s report interval. A real
Prometheus scrapes that port with dashboards/prometheus.yml (targets rewritten); then every PromQL expression of
every dashboard panel must return data, and the exported values must equal what the workload did.

Run as a script (`python tests/test_metrics.py workload '<json>'`) this file is that workload.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
REPORT_INTERVAL_MS = 1000           # Ray's metrics report interval in the workload (default 10 s)

# ---------------------------------------------------------------- the workload (runs in a subprocess)

LIVE_OPTIONS = dict(segment_seconds=1.0, min_pixels=4 * 784, max_pixels=64 * 784, backoff_initial_s=0.2,
                    backoff_max_s=1.0, open_timeout_s=2.0, read_timeout_s=2.0, queue_size=1)
BAD_FILES = {"empty.mp4": "empty", "notes.mp4": "corrupt"}          # file -> expected decode error kind
QUESTIONS = ("what moves across the yard?", "what colour is the bar?")   # asked twice each: a miss, then hits


def _log(msg: str) -> None:
    print(f"[workload {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_workload(args: dict) -> None:
    sys.path[:0] = [str(ROOT), str(TESTS)]
    import tempfile

    import ray

    import qwen2vl
    from actors.feeds import FeedSupervisor
    from pipeline.feeds import FEEDS_KEY, VERSION_KEY, add_feed, list_feeds
    from actors.live import LiveIndexer
    from pipeline import metrics
    from actors.encoder import VisionEncoder
    from pipeline.archive import index_archive
    from pipeline.events import SEGMENTS_STREAM, EventSink
    from pipeline.index import SegmentIndex
    from pipeline.settings import load_settings
    from services import RAY_TEMP_PARENT, RAY_TEMP_PREFIX
    from deploy.runtime import start_closed_ray
    from streams import RtspServer, free_tcp_port, make_stream_video, wait_for
    from videos import encode_video

    work = Path(args["workdir"])
    temp_dir = tempfile.mkdtemp(prefix=RAY_TEMP_PREFIX, dir=RAY_TEMP_PARENT)
    start_closed_ray(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, _metrics_export_port=args["metrics_port"])
    _log("ray up")
    model = qwen2vl.write_tiny_checkpoint(work / "tiny")
    settings = load_settings(data_dir=work / "data", model_path=model, segment_seconds=1.0, min_pixels=4 * 784,
                             max_pixels=40 * 784, encoder_token_budget=300, redis_url=args["redis_url"],
                             feed_allow_hosts=["127.0.0.1"])           # the refused RTSP feed is on loopback
    index = SegmentIndex(settings.index_root)
    out: dict = {}

    # archive: two good files, two bad ones
    files = [str(encode_video(work / "yard.mp4", 160, 90, 30, seconds=3.0).path),
             str(encode_video(work / "gate.mp4", 96, 96, 25, seconds=2.0).path)]
    (work / "empty.mp4").write_bytes(b"")
    (work / "notes.mp4").write_text("not a video\n" * 40)
    sink = EventSink(args["redis_url"], work / "outbox-archive")
    report = index_archive(files + [str(work / f) for f in BAD_FILES], settings, VisionEncoder, index=index, events=sink,
                           progress=False)
    sink.close()
    assert report.segments > 0 and len(report.failed) == len(BAD_FILES), report
    rows = {s: index.list(s) for s in ("yard", "gate")}
    out["archive_segments"] = report.segments
    out["archive_tokens"] = sum(r["n_tokens"] for rs in rows.values() for r in rs)
    _log(f"archive done: {report.segments} segments")

    # captions: a caption actor pool catches up with the archive's segments
    from actors.captioner import CaptionPool
    from pipeline.captioning import CaptionFollower, CaptionWriter, open_retrieval
    from pipeline.captions import CaptionStore

    store = CaptionStore(index)
    pool = CaptionPool(settings, str(model))
    writer = CaptionWriter(store, open_retrieval(store, settings.index_root, pool.model_id, pool.dim))
    out["captioned"] = CaptionFollower(store, pool, writer).catch_up()
    assert out["captioned"] == report.segments
    pool.close()

    # retention: the size cap removes the oldest segment, then an age of 0 empties "gate"
    total = sum(index.sizes().values())
    out["deleted_size"] = index.sweep(max_bytes=total - 1)
    out["deleted_age"] = index.sweep(max_age_s={"gate": 0.0})
    yard = index.sources()
    out["yard"] = [r for r in yard if r["source_id"] == "yard"][0]
    out["gate_left"] = [r for r in yard if r["source_id"] == "gate"]

    # events: Redis unreachable and an outbox of one event -> 1 waiting, 2 dropped
    dead_redis = f"redis://127.0.0.1:{free_tcp_port()}/0"
    lost = EventSink(dead_redis, work / "outbox-lost", outbox_max=1, flush_interval_s=None)
    t0 = time.monotonic()
    for i in range(3):
        lost.emit("tubescope:alerts", {"n": i})
    assert (lost.pending, lost.dropped) == (1, 2)
    wait_for(lambda: b"ray_tubescope_events_dropped_total" in urllib.request.urlopen(
        f"http://127.0.0.1:{args['metrics_port']}/metrics", timeout=5).read(), 30, 0.05, "the export of a counter")
    out["export_visible_s"] = time.monotonic() - t0

    # queries: the real Decoder in a Ray actor, as in its Serve replica; requests are recorded as the API's
    # middleware records them (tests/api covers that path over HTTP)
    from deploy.decoder import Decoder

    @ray.remote(num_cpus=0)
    class DecoderReplica:
        def __init__(self):
            self.decoder = Decoder(settings, model, index=SegmentIndex(settings.index_root))

        def run(self):
            asks = []
            t = time.perf_counter()
            self.decoder.search("a moving bar", ["yard"], limit=3)
            metrics.record_query("POST /v1/search", 200, time.perf_counter() - t)
            for q in QUESTIONS + QUESTIONS:
                t = time.perf_counter()
                timings = self.decoder.ask(q, ["yard"], max_new_tokens=4)["timings"]
                metrics.record_query("POST /v1/ask", 200, time.perf_counter() - t)
                asks.append((timings["prefix_cache"] == "hit", timings["new_tokens"]))
            t = time.perf_counter()
            try:
                self.decoder.ask("anything?", ["nowhere"])
            except LookupError:
                metrics.record_query("POST /v1/ask", 404, time.perf_counter() - t)
            # an index holding a corrupt segment file: the replica fails and the API answers 500
            broken = Path(settings.data_dir) / "corrupt-index"
            (broken / "source=yard").mkdir(parents=True)
            (broken / "source=yard" / "seg-0000000000000000-0000000000000000.parquet").write_bytes(b"garbage" * 99)
            good, self.decoder.index = self.decoder.index, SegmentIndex(broken)
            t = time.perf_counter()
            try:
                self.decoder.ask("anything?", ["yard"])
            except LookupError:
                raise AssertionError("a corrupt index must fail as an error, not as 'no footage'")
            except Exception:  # noqa: BLE001 - whatever the storage raised, the API maps it to 500
                metrics.record_query("POST /v1/ask", 500, time.perf_counter() - t)
            finally:
                self.decoder.index = good
            return asks

        def alerts(self, pause_s: float) -> int:
            """Standing alerts: the yard's segments scored twice, pause_s apart (so the hits counter rises while
            Prometheus scrapes it), against an alert that always fires; its webhook refuses."""
            from redis import Redis

            from deploy.alert_follower import AlertFollower
            from deploy.alerts import AlertStore, new_alert
            from deploy.webhooks import WebhookSender
            from pipeline.video.hosts import HostPolicy

            loopback = HostPolicy(allow=("127.0.0.1",))
            store = AlertStore(Redis.from_url(args["redis_url"]))
            store.add(new_alert("a moving bar", ["yard"], -1e9, 0.0, f"http://127.0.0.1:{free_tcp_port()}/hook",
                                max_query_chars=100, policy=loopback), 10)
            sender = WebhookSender(lambda: loopback, timeout_s=1.0, attempts=1)
            follower = AlertFollower(store.redis, store, self.decoder.score_segments,
                                     EventSink(args["redis_url"], work / "outbox-alerts"), sender)
            segments = [{k: r[k] for k in ("segment_id", "source_id", "t0", "t1")}
                        for r in self.decoder.index.list("yard")]
            hits = len(follower.score_segments(segments))
            time.sleep(pause_s)
            hits += len(follower.score_segments(segments))
            wait_for(lambda: sender.stats()["failed"] == hits, 30, 0.1, "the refused webhook deliveries")
            return hits

    @ray.remote(num_cpus=0)
    def slow_http_clients() -> None:
        """The proxy's HTTP protocol (deploy/http_deadlines.py) in a Ray worker, as in Serve's proxy: one client
        sends no request head, one reads nothing of its response; both are cut off, one count each."""
        from uvicorn.importer import import_from_string

        from deploy.http_deadlines import PROTOCOLS
        from raw_http import big_download, read_until_closed, received, serving

        protocol = type("Proxy", (import_from_string(PROTOCOLS["auto"]),), {"header_timeout_s": 0.5})
        with serving(protocol, keep_alive_s=1) as port:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as silent, big_download(port) as stalled:
                read_until_closed(silent, 10)
                time.sleep(3)
                received(stalled)

    ray.get(slow_http_clients.remote())
    replica = DecoderReplica.remote()
    out["asks"] = ray.get(replica.run.remote())
    assert any(hit for hit, _ in out["asks"]) and not all(hit for hit, _ in out["asks"]), out["asks"]
    _log("queries done")

    # live: a file feed (loops at EOF in continuous time), an RTSP camera that restarts (a reconnect) and a refused
    # RTSP feed; a queue of one segment drops
    r = __import__("redis").Redis.from_url(args["redis_url"])
    add_feed(r, str(make_stream_video(work / "lobby.mp4", seconds=2.0, width=160, height=120)), feed_id="lobby",
             settings=settings)
    add_feed(r, f"rtsp://127.0.0.1:{free_tcp_port()}/cam", feed_id="dead", settings=settings)
    door = RtspServer(width=160, height=120, fps=5).start()
    add_feed(r, door.url, feed_id="door", settings=settings)
    sup = FeedSupervisor(args["redis_url"], settings, sampler_options=LIVE_OPTIONS, events=False)
    sup.reconcile()
    wait_for(lambda: sup.statuses()["lobby"].get("drops", 0) >= 1, 60, 0.2, "a dropped segment")
    indexer = LiveIndexer.remote(settings, str(model), args["redis_url"])
    ray.get(indexer.start.remote())
    wait_for(lambda: len(r.xrange(SEGMENTS_STREAM, count=100)) >= report.segments + 2, 60, 0.2,
             "two live segments indexed")
    wait_for(lambda: sup.statuses()["lobby"].get("loops", 0) >= 1, 30, 0.2, "the file feed to loop")
    wait_for(lambda: sup.statuses()["door"].get("connected"), 30, 0.2, "the RTSP camera")
    door.kill()
    wait_for(lambda: not sup.statuses()["door"].get("connected"), 30, 0.2, "the camera's disconnect")
    door.start()
    wait_for(lambda: sup.statuses()["door"].get("reconnects", 0) >= 1, 30, 0.2, "the camera's reconnect")
    # Redis loses the registry (restored from the copy beside the index), and the lobby's index folder takes no
    # writes for a while (its live segments held, then lost and counted)
    r.delete(FEEDS_KEY, VERSION_KEY)
    assert sup.reconcile()["stopped"] == [] and len(list_feeds(r)) == 3
    folder = Path(settings.index_root) / "source=lobby"
    folder.rename(folder.with_name("lobby-away"))
    folder.write_text("not a folder")
    wait_for(lambda: ray.get(indexer.status.remote())["lost"].get("lobby", 0) >= 1, 30, 0.2, "a live segment lost")
    folder.unlink()
    folder.with_name("lobby-away").rename(folder)
    wait_for(lambda: not ray.get(indexer.status.remote())["write_errors"], 30, 0.2, "live writes working again")
    out["lobby"] = {k: sup.statuses()["lobby"][k] for k in ("drops", "frames_sampled")}
    out["lobby"]["lost"] = ray.get(indexer.status.remote())["lost"]["lobby"]
    _log("live running")
    out["alert_hits"] = ray.get(replica.alerts.remote(3.0))
    _log("alerts done")

    print("READY " + json.dumps(out), flush=True)
    sys.stdin.readline()                     # the test says when it is done querying
    ray.get(indexer.stop.remote(), timeout=60)
    sup.stop_all()
    door.close()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "workload":
    run_workload(json.loads(sys.argv[2]))
    sys.exit(0)


# ---------------------------------------------------------------- tests

import pytest  # noqa: E402

from pipeline import metric_catalog  # noqa: E402
from prometheus import PROMETHEUS, query, query_scalar, query_values, start_prometheus  # noqa: E402
from test_dashboards import DASHBOARD_FILES, expressions  # noqa: E402


# ---------------------------------------------------------------- end to end through Prometheus

def _panel_expr(expr: str) -> str:
    """A dashboard expression as Grafana would send it, with the variables at their defaults."""
    return expr.replace("$__rate_interval", "1m").replace("$feed", ".*")


def _read_ready(proc: subprocess.Popen, timeout_s: float, errlog: Path) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"workload exited with {proc.returncode}:\n{errlog.read_text()[-5000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return json.loads(line[len("READY "):])
    raise AssertionError(f"workload not ready after {timeout_s} s:\n{errlog.read_text()[-5000:]}")


def _poll(check, timeout_s: float):
    """Call check() until it returns without AssertionError (values arrive within a few report intervals)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(240)
def test_dashboards_show_a_real_workload_through_prometheus(tmp_path, redis_server):
    if not os.path.exists(PROMETHEUS):
        pytest.fail(f"{PROMETHEUS} not found: install Debian's prometheus package (.ci/run does)")
    from services import RAY_TEST_ENV
    from streams import free_tcp_port

    metrics_port = free_tcp_port()
    prom, base = start_prometheus(tmp_path, metrics_port)
    errlog = tmp_path / "workload.log"
    env = {**os.environ, **RAY_TEST_ENV, "RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_MS),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("RAY_ADDRESS", None)
    args = {"workdir": str(tmp_path / "work"), "metrics_port": metrics_port, "redis_url": redis_server.url}
    (tmp_path / "work").mkdir()
    with open(errlog, "w") as err:
        work = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "workload", json.dumps(args)],
                                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True)
    try:
        done = _read_ready(work, 180, errlog)
        t_ready = time.monotonic()

        def exact_values():
            assert query_values(base, 'sum(tubescope_segments_processed_total{pipeline="archive"})') == \
                {None: done["archive_segments"]}
            assert query_values(base, 'sum(tubescope_visual_tokens_total{pipeline="archive"})') == \
                {None: done["archive_tokens"]}
            assert query_values(base, 'sum(tubescope_patches_processed_total{pipeline="archive"})') == \
                {None: 4 * done["archive_tokens"]}
            assert query_values(base, "sum by (kind) (tubescope_decode_errors_total)", "kind") == \
                {kind: 1.0 for kind in BAD_FILES.values()}
            assert query_values(base, "sum by (reason) (tubescope_index_retention_deletions_total)", "reason") == \
                {"size": done["deleted_size"], "age": done["deleted_age"]}
            yard = done["yard"]
            assert query_values(base, 'max(tubescope_index_segments{source="yard"})') == {None: yard["segments"]}
            assert query_values(base, 'max(tubescope_index_bytes{source="yard"})') == {None: yard["bytes"]}
            assert query_values(base, 'max(tubescope_index_segments{source="gate"})') == {None: 0.0}
            assert query_values(base, "sum(tubescope_events_dropped_total)") == {None: 2.0}
            assert query_values(base, "sum(tubescope_events_outbox_events)") == {None: 1.0}
            asks = done["asks"]
            cache_hits = float(sum(h for h, _ in asks))
            assert query_values(base, "sum(tubescope_prefix_cache_hits_total)") == {None: cache_hits}
            assert query_values(base, "sum(tubescope_prefix_cache_misses_total)") == \
                {None: float(sum(not h for h, _ in asks))}
            assert query_values(base, "sum(tubescope_generated_tokens_total)") == {None: float(sum(n for _, n in asks))}
            assert query_values(base, "sum(tubescope_ask_duration_seconds_count)") == {None: float(len(asks))}
            assert query_values(base, "sum by (status) (tubescope_requests_total)", "status") == \
                {"200": float(len(asks) + 1), "404": 1.0, "500": 1.0}
            assert query_values(base, "sum by (phase) (tubescope_http_timeouts_total)", "phase") == \
                {"head": 1.0, "send": 1.0}
            assert query_values(base, "max by (feed) (tubescope_feed_up)", "feed") == \
                {"lobby": 1.0, "dead": 0.0, "door": 1.0}
            lobby = done["lobby"]
            assert query_scalar(base, 'sum(tubescope_feed_dropped_segments_total{feed="lobby"})') >= lobby["drops"]
            assert query_scalar(base, 'sum(tubescope_feed_reconnects_total{feed="door"})') >= 1
            # loops are no faults
            assert query_values(base, 'sum(tubescope_feed_reconnects_total{feed="lobby"})') == {}
            assert query_scalar(base, 'sum(tubescope_live_lost_segments_total{feed="lobby"})') == lobby["lost"]
            assert query_scalar(base, "sum(tubescope_feed_registry_restores_total)") == 1
            assert query_scalar(base, 'sum(tubescope_feed_frames_sampled_total{feed="lobby"})') >= \
                lobby["frames_sampled"]
            assert 0 <= query_scalar(base, 'max(tubescope_feed_lag_seconds{feed="lobby"})') < 10
            hits = float(done["alert_hits"])
            assert query_values(base, "sum(tubescope_alert_hits_total)") == {None: hits}
            assert query_values(base, "sum by (result) (tubescope_alert_webhook_total)", "result") == {"failed": hits}
            assert query_values(base, "sum(tubescope_alert_scoring_seconds_count)") == {None: 2.0}
            live = query_scalar(base, 'sum(tubescope_segments_processed_total{pipeline="live"})')
            assert live >= 2 and query_scalar(base, 'sum(tubescope_live_segment_latency_seconds_count)') >= live

        _poll(exact_values, 30)
        visible_s = time.monotonic() - t_ready

        def every_metric_exported():
            missing = [s.name for s in metric_catalog.METRICS.values()
                       if not query(base, f'count({{__name__="{s.series_names()[-1]}"}})')]
            assert not missing, f"defined but never exported by the workload: {missing}"
            assert query(base, 'count({__name__=~"ray_.+", job="ray"})'), "Ray's own metrics are not scraped"
            assert {"lobby", "dead"} <= set(_label_values(base, "feed", "tubescope_feed_up"))

        _poll(every_metric_exported, 20)

        def every_panel_returns_data():
            empty = []
            for path in DASHBOARD_FILES:
                for expr in expressions(json.loads(path.read_text())):
                    if not query(base, _panel_expr(expr)):
                        empty.append(f"{path.name}: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)

        _poll(every_panel_returns_data, 20)
        print(f"export visible after {done['export_visible_s']:.2f} s; workload values in Prometheus "
              f"{visible_s:.2f} s after READY")
    finally:
        if work.poll() is None:
            try:
                work.stdin.write("stop\n")
                work.stdin.flush()
                work.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                work.kill()
                work.wait()
        prom.terminate()
        prom.wait(timeout=30)


def _label_values(base: str, label: str, metric: str) -> list[str]:
    url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)["data"]
