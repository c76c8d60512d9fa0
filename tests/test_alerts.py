"""Standing alerts without Serve: the checks of an alert, its Redis store across a restart of Redis, the webhook
sender against real HTTP servers on loopback (one that answers, one that fails, one that hangs, a closed port), and
the follower scoring live segments of the segments stream with the real Decoder (tiny model). The service over
HTTP with a live feed is tests/test_alerts_api.py."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import qwen2vl
from deploy.alert_follower import CURSOR_KEY, AlertFollower, alert_follower
from deploy.alerts import AlertStore, check_webhook, hit_from_entry, new_alert
from pipeline.thumbnails import thumbnail_url
from deploy.decoder import Decoder
from deploy.webhooks import WebhookSender
from pipeline.captions import Caption, CaptionStore
from pipeline.checkpoints import model_id
from pipeline.events import ALERTS_STREAM, SEGMENTS_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.indexing import segment_event
from pipeline.settings import load_settings
from pipeline.video.hosts import HostPolicy, Service
from services import start_redis
from streams import free_tcp_port, wait_for
from tests.test_footage import clip_frames, index_frames

pytestmark = pytest.mark.timeout(120)
LOOPBACK = HostPolicy(allow=("127.0.0.1",))


# ---- HTTP servers on loopback ----------------------------------------------------------------------------------------
class Hooks:
    """A real HTTP server: POST /ok records the JSON body (204), POST /fail answers 500 (and counts)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.failed = 0
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/ok":
                    hooks.bodies.append(json.loads(body))
                    self.send_response(204)
                else:
                    hooks.failed += 1
                    self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        # a server that takes connections (the kernel's backlog) and never answers
        self.hanging = socket.socket()
        self.hanging.bind(("127.0.0.1", 0))
        self.hanging.listen(16)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    @property
    def hanging_url(self) -> str:
        return f"http://127.0.0.1:{self.hanging.getsockname()[1]}/hook"

    def close(self):
        self.server.shutdown()
        self.hanging.close()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


# ---- checks and the store --------------------------------------------------------------------------------------------
def _alert(query="a person at the door", sources=("cam1",), threshold=0.0, cooldown=60.0, webhook=None,
           policy=LOOPBACK):
    return new_alert(query, list(sources), threshold, cooldown, webhook, max_query_chars=50, policy=policy)


def test_alert_checks_and_redacted_webhook():
    # the token is no hex word: a random alert id could hold "abc"
    a = _alert(webhook="https://bot:s3cret@10.1.2.3:8443/x?token=tkn-zyx", policy=HostPolicy())
    shown = a.public()
    assert "s3cret" not in json.dumps(shown) and "tkn-zyx" not in json.dumps(shown)
    assert shown["webhook"] == "https://bot:***@10.1.2.3:8443/x?token=***" and a.webhook.endswith("tkn-zyx")
    assert set(shown) == {"alert_id", "query", "sources", "threshold", "cooldown_seconds", "webhook", "created_at"}
    for kwargs, words in (({"query": ""}, "non-empty"), ({"query": "   "}, "non-empty"),
                          ({"query": "x" * 51}, "51 characters; the limit is 50"),
                          ({"query": "a <|vision_start|> b"}, "special token"),
                          ({"sources": []}, "sources"), ({"threshold": float("nan")}, "threshold"),
                          ({"cooldown": -1.0}, "cooldown_seconds"),
                          ({"webhook": "ftp://h/x"}, "http:// or https://"),
                          ({"webhook": "http:///x"}, "with a host"),
                          ({"webhook": "http://h/a b"}, "without spaces"),
                          ({"webhook": "http://127.0.0.1:8000/x", "policy": HostPolicy()}, "loopback"),
                          ({"webhook": "http://169.254.169.254/latest"}, "link-local"),
                          ({"webhook": "http://127.0.0.1:6379/x",
                            "policy": HostPolicy(allow=("127.0.0.1",), services=(Service("Redis", "127.0.0.1", 6379),))},
                           "port 6379 of this service's own Redis")):
        with pytest.raises(ValueError, match=words):
            _alert(**kwargs)
    with pytest.raises(ValueError) as e:                  # a refused webhook never shows its credentials
        check_webhook("http://u:pw@127.0.0.1:1/x", HostPolicy())
    assert "pw" not in str(e.value) and "webhook refused" in str(e.value)
    assert thumbnail_url("cam 1/a:1500") == "/v1/segments/cam%201%2Fa%3A1500/thumbnail"


def test_alerts_survive_a_restart_of_redis(tmp_path):
    server = start_redis(tmp_path / "redis", persist=True)
    try:
        store = AlertStore(server.client())
        first = store.add(_alert(), max_count=2)
        second = store.add(_alert("a car", ["lot", "gate"], cooldown=0.0), max_count=2)
        with pytest.raises(ValueError, match="2 alerts already stand"):
            store.add(_alert("a third"), max_count=2)
        assert store.claim_hit(first, "cam1", 100.0) and not store.claim_hit(first, "cam1", 159.0)
        server.stop()
        server.start()
        again = AlertStore(server.client())                     # a new service reads them back
        assert again.all() == [first, second] and again.get(first.alert_id) == first
        assert not again.claim_hit(first, "cam1", 130.0)        # the cooldown survived too
        assert again.claim_hit(first, "cam1", 160.0) and again.claim_hit(first, "other", 130.0)
        assert again.delete(first.alert_id) == first
        assert again.all() == [second] and not server.client().exists(f"tubescope:alert:{first.alert_id}:last")
        with pytest.raises(KeyError):
            again.get(first.alert_id)
    finally:
        server.stop()


# ---- webhooks --------------------------------------------------------------------------------------------------------
def test_webhooks_deliver_retry_and_never_block(hooks):
    sender = WebhookSender(lambda: LOOPBACK, timeout_s=0.5, attempts=2, backoff_s=0.1, queue_max=8, workers=2)
    closed = f"http://127.0.0.1:{free_tcp_port()}/hook"
    t = time.perf_counter()
    sender.send(hooks.hanging_url, {"n": 0})          # holds one worker for 2 x 0.5 s
    sender.send(closed, {"n": 1})                     # refused at once, twice
    sender.send(hooks.url("/fail"), {"n": 2})         # 500, twice
    sender.send(hooks.url("/ok"), {"n": 3})
    assert time.perf_counter() - t < 0.1              # sending only queues
    wait_for(lambda: sender.stats()["delivered"] == 1 and sender.stats()["failed"] == 3, 20, 0.05, "deliveries")
    assert hooks.bodies == [{"n": 3}] and hooks.failed == 2
    assert sender.stats()["dropped"] == 0 and sender.stats()["queued"] == 0
    # one worker, two hanging POSTs ahead: the queue of three overflows and drops its oldest, counted
    stuck = WebhookSender(lambda: LOOPBACK, timeout_s=2.0, attempts=1, queue_max=3, workers=1)
    stuck.send(hooks.hanging_url, {"n": 0})
    wait_for(lambda: stuck.stats()["queued"] == 0, 5, 0.01, "the worker to take the first")
    for n in range(1, 6):
        stuck.send(hooks.hanging_url, {"n": n})
    wait_for(lambda: stuck.stats()["dropped"] == 2, 5, 0.05, "two drops")
    stuck.stop(0.1)
    sender.stop()


def test_a_webhook_refused_at_delivery_is_never_sent(hooks):
    """A name may resolve elsewhere after the alert was made: each delivery checks the host again."""
    port = hooks.server.server_port
    sender = WebhookSender(lambda: HostPolicy(allow=("127.0.0.1",), services=(Service("API", "127.0.0.1", port),)),
                           timeout_s=0.5, attempts=3, backoff_s=0.05)
    sender.send(hooks.url("/ok"), {"n": 0})
    wait_for(lambda: sender.stats()["failed"] == 1, 10, 0.05, "the refusal")
    assert hooks.bodies == [] and "refused" in sender.stats()["last_error"]
    sender.stop()


# ---- the follower ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("alerts")
    ckpt = qwen2vl.write_tiny_checkpoint(root / "tiny", seed=5)
    model = qwen2vl.load_pretrained(ckpt)
    mid = model_id(ckpt)
    index = SegmentIndex(root / "index")
    now = float(int(time.time()))                     # live segments carry epoch times
    cam = index_frames(index, model, mid, "cam1", clip_frames(root, "moving", seconds=8.0), offset=now)
    sq = index_frames(index, model, mid, "sq", clip_frames(root, "square", 96, 96, seconds=4.0), offset=now)
    return {"root": root, "ckpt": ckpt, "mid": mid, "index": index, "cam": cam, "sq": sq}


def test_follower_scores_live_segments_with_cooldown_captions_and_webhooks(world, redis_server, hooks, tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", index_dir=str(world["root"] / "index"),
                             model_path=world["ckpt"], redis_url=redis_server.url, feed_allow_hosts=["127.0.0.1"],
                             alert_webhook_timeout_seconds=0.5, alert_webhook_attempts=2)
    decoder = Decoder(settings, world["ckpt"], index=world["index"])
    r = redis_server.client()
    store = AlertStore(r)
    add = lambda *a, **k: store.add(_alert(*a, **k), 10)                                    # noqa: E731
    fires = add("a white box", ["cam1"], -1e9, 3.0, hooks.url("/ok"))
    never = add("a red car", ["cam1", "sq"], 1e9, 0.0)
    hanging = add("anything at all", ["sq"], -1e9, 0.0, hooks.hanging_url)
    cam, sq = world["cam"], world["sq"]
    CaptionStore(world["index"]).add([Caption(cam[0].segment_id, "cam1", cam[0].t0, cam[0].t1, "a box",
                                              np.ones(4, np.float32) / 2, decoder.model_id)])
    r.xadd(SEGMENTS_STREAM, segment_event(cam[0], live=True))          # before the follower: not its business
    follower = alert_follower(settings, r, decoder.score_segments, EventSink(r, tmp_path / "outbox"))
    follower.block_ms = 100
    assert follower.run_round() == []
    for seg in cam[:3] + sq:
        r.xadd(SEGMENTS_STREAM, segment_event(seg, live=True))
    r.xadd(SEGMENTS_STREAM, segment_event(sq[0], live=False))        # an archive segment: never scored
    t = time.perf_counter()
    hits = follower.run_round()
    assert time.perf_counter() - t < 5.0                               # the hanging webhook is not waited for
    got = [(h["alert_id"], h["segment_id"]) for h in hits]
    # cooldown 3 s: cam1 at +0 and +4 fire, +2 is within 3 s of +0; the never-alert never fires
    assert got == [(fires.alert_id, cam[0].segment_id), (fires.alert_id, cam[2].segment_id)] + \
        [(hanging.alert_id, s.segment_id) for s in sq]
    assert never.alert_id not in {a for a, _ in got}
    first = hits[0]
    assert first["caption"] == "a box" and hits[1]["caption"] == ""
    assert first["thumbnail_url"] == thumbnail_url(cam[0].segment_id) and first["query"] == "a white box"
    assert (first["t0"], first["t1"], first["source_id"]) == (cam[0].t0, cam[0].t1, "cam1")
    assert set(first) == {"alert_id", "query", "source_id", "segment_id", "t0", "t1", "score", "caption",
                          "thumbnail_url", "at"}
    assert [hit_from_entry(f) for _, f in r.xrange(ALERTS_STREAM)] == hits        # the stream holds them all
    assert follower.counts["segments"] == 3 + len(sq) and follower.counts["cooled"] == 1
    # webhooks: the answering one got both of its hits, the hanging one failed after its attempts
    wait_for(lambda: len(hooks.bodies) == 2 and follower.webhooks.stats()["failed"] == len(sq), 20, 0.1, "webhooks")
    key = lambda hit: hit["segment_id"]                                 # noqa: E731 - senders race each other
    assert sorted(hooks.bodies, key=key) == sorted(hits[:2], key=key)

    # a restarted follower resumes from the stored cursor, and the cooldown of the last hit holds across it
    follower.stop()
    assert r.get(CURSOR_KEY)
    again = AlertFollower(r, store, decoder.score_segments, EventSink(r, tmp_path / "outbox2"), block_ms=100)
    r.xadd(SEGMENTS_STREAM, segment_event(cam[3], live=True))          # +6: within 3 s of the hit at +4
    assert again.run_round() == [] and again.counts == {**again.counts, "segments": 1, "cooled": 1, "hits": 0}
    # a scoring failure (a query the model cannot take) is reported, and the round goes on
    r.set(f"tubescope:alert:{never.alert_id}", json.dumps({**never.public(), "query": "<|vision_start|>"}))
    r.xadd(SEGMENTS_STREAM, segment_event(cam[1], live=True))
    assert again.run_round() == [] and again.counts["failed"] == 1
    assert b"alert_scoring_failed" in r.xrevrange("tubescope:errors", count=1)[0][1][b"kind"]
