"""EventSink against a real redis-server: stream entries, MAXLEN trimming, the on-disk outbox across outages."""
import json
import logging
import os
import socket
import time

import pytest
import redis

from pipeline.events import ERRORS_STREAM, SEGMENTS_STREAM, STREAMS, EventSink, flatten_fields


def _client(server):
    return redis.Redis.from_url(server.url, decode_responses=True)   # str replies whatever the fixture's default


def _entries(client, stream):
    return client.xrange(stream)                       # [(id, {field: value})], decode_responses=True


def _seqs(client, stream=SEGMENTS_STREAM):
    return [int(f["seq"]) for _, f in _entries(client, stream)]


def test_stream_names_are_namespaced_constants():
    assert len(set(STREAMS)) == len(STREAMS)
    assert all(s.startswith("tubescope:") for s in STREAMS)
    assert SEGMENTS_STREAM in STREAMS and ERRORS_STREAM in STREAMS


def test_one_entry_per_emit_with_flat_fields(redis_server, tmp_path):
    sink = EventSink(redis_server.url, tmp_path / "outbox", flush_interval_s=None)
    client = _client(redis_server)
    ids = [sink.emit(SEGMENTS_STREAM, {"segment_id": f"cam:{i}", "seq": i, "grid": [2, 4, 6], "meta": {"a": None}})
           for i in range(3)]
    entries = _entries(client, SEGMENTS_STREAM)
    assert [e[0] for e in entries] == ids              # emit returns the real entry ids, in order
    assert entries[1][1] == {"segment_id": "cam:1", "seq": "1", "grid": "[2, 4, 6]", "meta": '{"a": null}'}
    assert json.loads(entries[2][1]["grid"]) == [2, 4, 6]
    assert sink.stats() == {"delivered": 3, "queued": 0, "pending": 0, "dropped": 0}
    assert os.listdir(tmp_path / "outbox") == []
    sink.close()


def test_maxlen_trims_the_stream(redis_server, tmp_path):
    sink = EventSink(redis_server.url, tmp_path / "outbox", maxlen=20, flush_interval_s=None)
    client = _client(redis_server)
    for i in range(600):
        sink.emit(SEGMENTS_STREAM, {"seq": i})
    n = client.xlen(SEGMENTS_STREAM)
    # "MAXLEN ~" trims whole radix-tree nodes (stream-node-max-entries, 100 by default): between 20 and 20 + 100
    node = int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    assert 20 <= n <= 20 + node < 600
    seqs = _seqs(client)
    assert seqs == list(range(600 - n, 600))           # the newest survive, in order
    sink.close()


def test_outage_goes_to_outbox_and_is_delivered_in_order(redis_server, tmp_path):
    outbox = tmp_path / "outbox"
    sink = EventSink(redis_server.url, outbox, flush_interval_s=None, retry_after_s=0.0)
    for i in range(3):
        assert sink.emit(SEGMENTS_STREAM, {"seq": i}) is not None
    redis_server.stop()
    t = time.perf_counter()
    for i in range(3, 8):
        assert sink.emit(SEGMENTS_STREAM, {"seq": i}) is None        # no exception, parked on disk
    assert time.perf_counter() - t < 5.0                              # a dead server costs little per event
    assert sink.pending == 5 and len(os.listdir(outbox)) == 5
    assert sink.flush() == 0                                          # still down: nothing delivered, nothing lost
    assert sink.pending == 5
    redis_server.start()
    entry = sink.emit(SEGMENTS_STREAM, {"seq": 8})                    # the next emit delivers the outbox first
    assert entry is not None
    client = _client(redis_server)
    assert _seqs(client) == list(range(3, 9))                         # new server (no persistence): outage + new
    assert sink.pending == 0 and os.listdir(outbox) == []
    assert sink.stats() == {"delivered": 9, "queued": 5, "pending": 0, "dropped": 0}
    sink.close()


def test_outbox_survives_a_new_sink_instance(redis_server, tmp_path):
    outbox = tmp_path / "outbox"
    redis_server.stop()
    first = EventSink(redis_server.url, outbox, flush_interval_s=None)
    for i in range(4):
        assert first.emit(ERRORS_STREAM, {"seq": i, "error": f"boom {i}"}) is None
    first.close()
    del first                                                         # the process "restarts"
    redis_server.start()
    second = EventSink(redis_server.url, outbox, flush_interval_s=None)
    assert second.pending == 4
    assert second.flush() == 4
    entries = _entries(_client(redis_server), ERRORS_STREAM)
    assert [f for _, f in entries] == [{"seq": str(i), "error": f"boom {i}"} for i in range(4)]
    assert second.pending == 0
    second.emit(ERRORS_STREAM, {"seq": 4, "error": "boom 4"})
    assert _seqs(_client(redis_server), ERRORS_STREAM) == [0, 1, 2, 3, 4]
    second.close()


def test_an_event_whose_reply_was_lost_is_not_repeated(redis_server, tmp_path):
    """An XADD that failed on the way may have been applied (the reply was lost with the connection): the sink parks
    it as uncertain, and delivers it later only if the stream does not already hold it."""
    import json
    import time

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    client = _client(redis_server)
    applied = {"segment_id": "cam:0", "tokens": "36"}
    client.xadd(SEGMENTS_STREAM, applied)                              # Redis executed it; the sink never heard
    lost = {"segment_id": "cam:2000", "tokens": "36"}                  # this one never reached Redis
    for seq, fields in enumerate((applied, lost)):
        (outbox / f"{seq:020d}.json").write_text(json.dumps({"stream": SEGMENTS_STREAM, "fields": fields,
                                                             "queued_at": time.time(), "uncertain": True}))
    sink = EventSink(redis_server.url, outbox, flush_interval_s=None)
    assert sink.flush() == 2 and sink.pending == 0
    assert [f for _, f in _entries(client, SEGMENTS_STREAM)] == [applied, lost]          # once each
    sink.close()


def test_full_outbox_drops_oldest_and_counts_it(redis_server, tmp_path, caplog):
    sink = EventSink(redis_server.url, tmp_path / "outbox", outbox_max=3, flush_interval_s=None, retry_after_s=0.0)
    redis_server.stop()
    with caplog.at_level(logging.ERROR, logger="tubescope.events"):
        for i in range(5):
            assert sink.emit(SEGMENTS_STREAM, {"seq": i}) is None
    assert sink.pending == 3 and sink.dropped == 2
    drops = [r for r in caplog.records if r.levelno == logging.ERROR and "outbox full" in r.getMessage()]
    assert len(drops) == 2
    redis_server.start()
    assert sink.flush() == 3
    client = _client(redis_server)
    assert _seqs(client) == [2, 3, 4]                                 # the oldest two were dropped, the rest in order
    (_, report), = _entries(client, ERRORS_STREAM)                    # and the loss is reported once Redis is back
    assert report["kind"] == "events_dropped" and report["count"] == "2"
    sink.close()


def test_background_flush_delivers_without_new_emits(redis_server, tmp_path):
    sink = EventSink(redis_server.url, tmp_path / "outbox", flush_interval_s=0.2, retry_after_s=0.1)
    redis_server.stop()
    for i in range(2):
        assert sink.emit(SEGMENTS_STREAM, {"seq": i}) is None
    redis_server.start()
    client = _client(redis_server)
    deadline = time.monotonic() + 10
    while client.xlen(SEGMENTS_STREAM) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _seqs(client) == [0, 1]
    assert sink.pending == 0
    sink.close()


def test_redis_rejection_is_counted_not_raised(redis_server, tmp_path, caplog):
    client = _client(redis_server)
    client.set(SEGMENTS_STREAM, "not a stream")                       # WRONGTYPE for XADD: retrying cannot help
    sink = EventSink(redis_server.url, tmp_path / "outbox", flush_interval_s=None)
    with caplog.at_level(logging.ERROR, logger="tubescope.events"):
        assert sink.emit(SEGMENTS_STREAM, {"seq": 0}) is None
    assert sink.dropped == 1 and sink.pending == 0
    assert any("WRONGTYPE" in r.getMessage() for r in caplog.records)
    assert sink.emit(ERRORS_STREAM, {"seq": 1}) is not None          # other streams still work
    sink.close()


def test_unreachable_from_the_start(tmp_path):
    with socket.socket() as s:                                        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = EventSink(f"redis://127.0.0.1:{port}/0", tmp_path / "outbox", flush_interval_s=None)
    t = time.perf_counter()
    assert [sink.emit(SEGMENTS_STREAM, {"seq": i}) for i in range(10)] == [None] * 10
    assert time.perf_counter() - t < 5.0
    assert sink.pending == 10 and sink.dropped == 0
    sink.close()


def test_bad_input_is_rejected_clearly(tmp_path, redis_server):
    with pytest.raises(ValueError, match="Redis URL"):
        EventSink("localhost:6379", tmp_path / "o")
    with pytest.raises(ValueError, match="maxlen"):
        EventSink(redis_server.url, tmp_path / "o", maxlen=0)
    with pytest.raises(ValueError, match="outbox_max"):
        EventSink(redis_server.url, tmp_path / "o", outbox_max=-1)
    sink = EventSink(redis_server.url, tmp_path / "o", flush_interval_s=None)
    with pytest.raises(ValueError, match="tubescope:"):
        sink.emit("segments", {"a": "b"})
    with pytest.raises(ValueError, match="non-empty mapping"):
        sink.emit(SEGMENTS_STREAM, {})
    with pytest.raises(ValueError, match="non-empty mapping"):
        sink.emit(SEGMENTS_STREAM, [("a", "b")])
    with pytest.raises(ValueError, match="field names"):
        sink.emit(SEGMENTS_STREAM, {1: "b"})
    with pytest.raises(ValueError, match="bytes"):
        sink.emit(SEGMENTS_STREAM, {"a": b"\x00"})
    with pytest.raises(ValueError, match="JSON"):
        flatten_fields({"a": object()})
    assert _client(redis_server).exists(SEGMENTS_STREAM) == 0        # nothing half-sent
    sink.close()
