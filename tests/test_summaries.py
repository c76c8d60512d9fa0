"""Summaries built bottom up (deploy/summaries.py) over a real index through the Decoder, with a real Redis for the
cache and the tubescope:summaries stream: periods, hours, the window; cached lines reused by a second call and by an
overlapping window; times cited; bad arguments."""
from __future__ import annotations

import json

import pytest

from deploy.decoder import Decoder
from deploy.summaries import MAX_PERIODS, Summarizer, period_size, periods
from pipeline.checkpoints import model_id
from pipeline.events import SUMMARIES_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.settings import load_settings
from tests.test_footage import answering_checkpoint, clip_frames, index_frames

pytestmark = pytest.mark.timeout(240)
T0 = 1_780_000_000.0 - 1_780_000_000.0 % 3600 + 1800    # 30 minutes into a clock hour, days in the past


def test_periods_are_aligned_and_coarsen_for_long_windows():
    assert periods(90.0, 400.0, 300.0) == [(90.0, 300.0), (300.0, 400.0)]
    assert periods(600.0, 900.0, 300.0) == [(600.0, 900.0)]
    assert period_size(300.0, 0.0, 3600.0) == 300.0
    week = period_size(300.0, 0.0, 7 * 86400.0)
    assert week % 60 == 0 and len(periods(0.0, 7 * 86400.0, week)) <= MAX_PERIODS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`yard`: 2 h 10 min of 8 s segments from T0 (tokens of one real clip, repeated); `cam`: 6 s of media time."""
    import qwen2vl

    root = tmp_path_factory.mktemp("summaries")
    ckpt = answering_checkpoint(root / "tiny")
    model, mid = qwen2vl.load_pretrained(ckpt), model_id(ckpt)
    index = SegmentIndex(root / "index")
    base = index_frames(index, model, mid, "cam", clip_frames(root, "moving"))[0]
    n = (2 * 3600 + 600) // 8
    index.add([IndexedSegment(segment_id="", source_id="yard", t0=T0 + 8.0 * k, t1=T0 + 8.0 * (k + 1),
                              grid_thw=base.grid_thw, tube_ts=[T0 + 8.0 * k, T0 + 8.0 * k + 4.0], tokens=base.tokens,
                              model_id=mid) for k in range(n)])
    return {"root": root, "ckpt": ckpt, "index": index, "mid": mid}


def _summarizer(world, tmp_path, redis_server, **settings):
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"], captions=False, **settings)
    dec = Decoder(s, world["ckpt"], index=world["index"])
    sink = EventSink(redis_server.url, tmp_path / "outbox")
    return Summarizer(dec, redis_server.client(), sink), dec, sink


def test_a_long_window_is_summarized_by_periods_hours_and_the_whole(world, tmp_path, redis_server):
    summ, dec, sink = _summarizer(world, tmp_path, redis_server, ask_token_budget=64, long_max_stride_seconds=3600)
    streamed = []
    out = summ.summarize(["yard"], None, None, granularity=1200, max_new_tokens=6, on_line=streamed.append)
    lines = out["lines"]
    assert streamed == lines and out["granularity"] == 1200 and out["model"] == world["mid"]
    levels = [line["level"] for line in lines]
    # 20-minute periods aligned to the clock from T0 (xx:30) to T0 + 2h10m: 2 + 3 + 2 periods in 3 clock hours
    assert levels.count("period") == 7 and levels.count("hour") == 3 and levels[-1] == "window"
    period = [line for line in lines if line["level"] == "period"]
    assert period[0]["t0"] == T0 and period[0]["t1"] == T0 + 600 and period[-1]["t1"] == T0 + 7800
    assert all(b["t0"] == a["t1"] for a, b in zip(period, period[1:]))
    assert all(line["start"].endswith("Z") or "+" in line["start"] for line in lines)     # wall-clock times shown
    assert out["summaries"] == {"yard": lines[-1]["text"]} and not any(line["cached"] for line in lines)
    assert dec.stats()["asks"] == 7                                       # one per period; no answer recorded
    (_, fields), = redis_server.client(decode_responses=True).xrange(SUMMARIES_STREAM)
    assert json.loads(fields["lines"]) == lines and json.loads(fields["summaries"]) == out["summaries"]

    # the same window again: every line from the cache, no model call; an overlapping window reuses its periods
    again = summ.summarize(["yard"], None, None, granularity=1200, max_new_tokens=6)
    assert [line["text"] for line in again["lines"]] == [line["text"] for line in lines]
    assert all(line["cached"] for line in again["lines"]) and dec.stats()["asks"] == 7
    later = summ.summarize(["yard"], T0 + 1800, T0 + 7800, granularity=1200, max_new_tokens=6)
    reused = [line for line in later["lines"] if line["level"] == "period"]
    assert len(reused) == 5 and all(line["cached"] for line in reused) and dec.stats()["asks"] == 7
    sink.close()


def test_short_media_time_window_is_one_period_and_bad_arguments_are_refused(world, tmp_path, redis_server):
    summ, dec, sink = _summarizer(world, tmp_path, redis_server)
    out = summ.summarize(["cam"], None, None, max_new_tokens=4)
    assert [line["level"] for line in out["lines"]] == ["period"] and out["lines"][0]["start"] == "0:00"
    assert out["summaries"]["cam"] == out["lines"][0]["text"]
    for kwargs, error in ((dict(granularity=5), ValueError), (dict(granularity=True), ValueError),
                          (dict(sources=["nowhere"]), LookupError), (dict(start=50.0, end=60.0), LookupError)):
        args = {"sources": ["cam"], "start": None, "end": None, **kwargs}
        with pytest.raises(error):
            summ.summarize(args.pop("sources"), args.pop("start"), args.pop("end"), **args)
    sink.close()
