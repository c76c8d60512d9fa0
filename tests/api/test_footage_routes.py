"""Archive footage over HTTP: jobs, the segments and thumbnails they index, clips of them, search, ask and
summaries over them, and how those routes fail (a vanished or read-only index, limits, overload)."""
from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import av
import httpx
import pytest

from deploy.client import ApiError, TubescopeClient, parse_sse
from pipeline.events import ANSWERS_STREAM, SUMMARIES_STREAM
from services import read_only
from streams import wait_for

from .http_client import ADMIN, CAM_ADMIN, CAM_READER, READER, SOURCE, err, http, raw_post, wait_for_metric, wait_job

pytestmark = pytest.mark.timeout(180)


# ---- jobs -------------------------------------------------------------------------------------------------------------
def test_job_indexes_a_clip_and_its_segments_are_listed(served):
    with http(served) as c:
        r = c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": SOURCE})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "queued" and job["paths"] == [str(served["clip"])] and len(job["id"]) == 12
        done = wait_job(c, job["id"])
        assert done["state"] == "succeeded", done
        assert (done["segments"], done["files_total"], done["failures"]) == (2, 1, [])
        assert done["indexed"] == [str(served["clip"])] and done["source_seconds"] == pytest.approx(4.0, abs=0.1)
        err(c.delete(f"/v1/jobs/{job['id']}"), 409, "already finished")

        sources = c.get("/v1/sources").json()["sources"]
        assert [(s["source_id"], s["segments"]) for s in sources] == [(SOURCE, 2)]
        segs = c.get(f"/v1/sources/{SOURCE}/segments").json()["segments"]
        assert [(s["segment_id"], s["t0"], s["t1"]) for s in segs] == [("clip:0", 0.0, 2.0), ("clip:2000", 2.0, 4.0)]
        assert all(s["n_tokens"] > 0 and len(s["grid_thw"]) == 3 for s in segs)
        assert [s["thumbnail_url"] for s in segs] == ["/v1/segments/clip%3A0/thumbnail",
                                                      "/v1/segments/clip%3A2000/thumbnail"]
        one = c.get(f"/v1/sources/{SOURCE}/segments", params={"start": 2.5, "end": 3.0}).json()["segments"]
        assert [s["segment_id"] for s in one] == ["clip:2000"]
        err(c.get(f"/v1/sources/{SOURCE}/segments", params={"start": 3, "end": 1}), 422, "must be >= start")
        err(c.get("/v1/sources/nope/segments"), 404, "no indexed source 'nope'")
        err(c.get(f"/v1/sources/{SOURCE}/segments", params={"start": "soon"}), 422, "start")
    with http(served, CAM_READER) as c:                       # a limited key does not even see the source
        assert c.get("/v1/sources").json() == {"sources": []}
    with http(served, CAM_ADMIN) as c:                        # ...nor another source's job, its counts or feeds
        err(c.get(f"/v1/jobs/{job['id']}"), 404, "no job with id")
        err(c.delete(f"/v1/jobs/{job['id']}"), 404, "no job with id")
        assert c.get("/v1/status").json() == {"index": {"sources": 0, "segments": 0, "bytes": 0}, "feeds": {}}
    with http(served) as c:
        assert c.get("/v1/status").json()["index"]["segments"] >= 2


def test_segment_thumbnails_and_metadata_follow_the_source_scope(served):
    from PIL import Image

    with http(served, READER) as c:
        r = c.get("/v1/segments/clip%3A2000/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
        assert "max-age=31536000" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
        image = Image.open(io.BytesIO(r.content))
        assert image.format == "JPEG" and 0 < image.width <= 320
        again = c.get("/v1/segments/clip%3A2000/thumbnail", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
        meta = c.get("/v1/segments/clip:2000").json()
        assert (meta["segment_id"], meta["t0"], meta["t1"], meta["start"]) == ("clip:2000", 2.0, 4.0, "0:02")
        assert meta["thumbnail_url"] == "/v1/segments/clip%3A2000/thumbnail" and meta["n_tokens"] > 0
        missing = c.get("/v1/segments/clip%3A4000/thumbnail")
        err(missing, 404, "no thumbnail for segment 'clip:4000'")
        err(c.get("/v1/segments/clip:4000"), 404, "no indexed segment 'clip:4000'")
        err(c.get("/v1/segments/clip/thumbnail"), 422, "segment_id must look like")
        err(c.get(f"/v1/segments/{'x' * 300}:0/thumbnail"), 422, "too long")
    with http(served, CAM_READER) as c:        # another source's segment is a 404 like an unknown one: no probing
        other = c.get("/v1/segments/clip%3A2000/thumbnail")
        err(other, 404, "no thumbnail for segment 'clip:2000'")
        assert other.json()["error"].replace("2000", "4000") == missing.json()["error"]
        err(c.get("/v1/segments/clip:2000"), 404, "no indexed segment 'clip:2000'")
    with http(served, None) as c:
        err(c.get("/v1/segments/clip%3A2000/thumbnail"), 401, "missing API key")


def test_clip_of_the_indexed_archive_with_range_requests(served, tmp_path):
    from click.testing import CliRunner

    from deploy.cli import cli
    with http(served, READER) as c:
        r = c.get(f"/v1/sources/{SOURCE}/clip", params={"start": "1", "end": "+0:02.5"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "video/mp4" and r.headers["accept-ranges"] == "bytes"
        assert float(r.headers["x-clip-start"]) <= 1.0 and float(r.headers["x-clip-end"]) >= 2.5
        full, size = r.content, len(r.content)
        (tmp_path / "whole.mp4").write_bytes(full)
        with av.open(str(tmp_path / "whole.mp4")) as mp4:                 # a playable MP4 of the archive's frames
            assert sum(1 for _ in mp4.decode(video=0)) >= 45
        for ask, first, last in (("bytes=0-99", 0, 99), ("bytes=100-", 100, size - 1), ("bytes=-50", size - 50,
                                                                                          size - 1)):
            part = c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1, "end": 2.5}, headers={"Range": ask})
            assert part.status_code == 206 and part.headers["content-range"] == f"bytes {first}-{last}/{size}"
            assert part.content == full[first:last + 1]
        bad = c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1, "end": 2.5}, headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 100, "end": 110}), 404, "no footage")
        err(c.get("/v1/sources/nope/clip", params={"start": 1, "end": 2}), 404, "no footage of 'nope'")
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 0, "end": 700}), 422, "clip_max_seconds")
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 2, "end": 1}), 422, "must be after")
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": "soon", "end": 1}), 422, "start")
        assert c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1}).status_code == 422
    with http(served, CAM_READER) as c:
        err(c.get(f"/v1/sources/{SOURCE}/clip", params={"start": 1, "end": 2}), 403, "'clip'")
    out = tmp_path / "cli.mp4"
    result = CliRunner().invoke(cli, ["clip", SOURCE, "--start", "1", "--end", "2.5", "-o", str(out),
                                      "--url", served["url"], "--key", READER])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == full and "covering" in result.output
    result = CliRunner().invoke(cli, ["clip", SOURCE, "--start", "100", "--end", "110", "-o", str(out),
                                      "--url", served["url"], "--key", READER])
    assert result.exit_code == 1 and "no footage" in result.output


def test_job_errors(served, tmp_path):
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"not a video")
    with http(served) as c:
        err(c.post("/v1/jobs", json={"paths": [str(outside)]}), 422, "outside the allowed roots")
        err(c.post("/v1/jobs", json={"paths": ["videos/clip.mp4"]}), 422, "must be absolute")
        err(c.post("/v1/jobs", json={"paths": [str(served["clip"].parent / ".." / "x.mp4")]}), 422, "'..'")
        err(c.post("/v1/jobs", json={"paths": ["s3://bucket/x.mp4"]}), 422, "URI scheme 's3'")
        err(c.post("/v1/jobs", json={"paths": []}), 422, "non-empty list")
        err(c.post("/v1/jobs", json={"paths": "x"}), 422, "paths")
        err(c.post("/v1/jobs", json={"paths": [str(served["clip"])], "extra": 1}), 422, "extra")
        err(c.get("/v1/jobs/nosuchjob"), 404, "no job with id 'nosuchjob'")
        err(c.delete("/v1/jobs/nosuchjob"), 404, "no job")
        # a file under the roots that is not a video: the job runs and reports the failure
        bad = served["clip"].parent / "broken.mp4"
        bad.write_bytes(b"\x00" * 1000)
        job = c.post("/v1/jobs", json={"paths": [str(bad)]}).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "failed" and done["failures"][0]["path"] == str(bad), done


def test_cancel_a_running_job_over_http(served):
    """The cancel flag is polled after every encoded batch: a job cancelled while Ray Data starts up stops at its
    first poll, keeping what it wrote."""
    with http(served) as c:
        job = c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": "cancel-me"}).json()
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] != "queued", 30, 0.05, "the job to start")
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
        done = wait_job(c, job["id"])
        assert done["state"] == "cancelled" and done["error"].startswith("cancelled after"), done
        kept = c.get("/v1/sources").json()["sources"]
        assert all(s["segments"] == done["segments"] for s in kept if s["source_id"] == "cancel-me")


def test_cancel_a_queued_job(served):
    """A cancel that arrives before the job's task starts stops it at once (state cancelled, nothing indexed)."""
    from deploy.job_runner import execute_job
    from deploy.jobs import create_job, request_cancel

    r = served["redis"].client()
    job = create_job(r, [str(served["clip"])], "cancelled-src")
    assert request_cancel(r, job["id"])["cancel_requested"] is True
    assert execute_job(job["id"], [str(served["clip"])], "cancelled-src", served["settings"], served["redis"].url) \
        == "cancelled"
    with http(served) as c:
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert "cancelled-src" not in [s["source_id"] for s in c.get("/v1/sources").json()["sources"]]


# ---- search and ask ---------------------------------------------------------------------------------------------------
def test_indexed_segments_get_captions_that_listings_and_search_show(served):
    """The caption service follows the index: the job's segments get the exclaiming model's caption ("!" per
    token), written to the index, the retrieval index and tubescope:captions, and search considers them all."""
    with http(served) as c:
        deadline = time.time() + 90
        while True:
            status = c.get("/v1/status").json()["captions"]
            if status.get("state") == "running" and status["captioned"] >= 2 and status["backlog"]["segments"] == 0:
                break
            assert time.time() < deadline, json.dumps(status)
            time.sleep(0.5)
        segs = c.get(f"/v1/sources/{SOURCE}/segments").json()["segments"]
        assert [s["caption"] for s in segs] == ["!" * 8] * 2
        r = c.post("/v1/search", json={"query": "a white box", "sources": [SOURCE]}).json()
        assert r["coverage"] == {"segments": 2, "captioned": 2, "retrieval": True, "reranked": 2}
        assert sorted(x["segment_id"] for x in r["results"]) == ["clip:0", "clip:2000"]
        assert all(x["caption"] == "!" * 8 for x in r["results"])
        wait_for_metric(c, r"tubescope_captions_total\S* [1-9]")
    entries = served["redis"].client().xrange("tubescope:captions")
    assert {e[b"segment_id"].decode() for _, e in entries} >= {"clip:0", "clip:2000"}


def test_search_ranks_segments(served):
    with http(served, READER) as c:
        r = c.post("/v1/search", json={"query": "a white box", "sources": [SOURCE], "limit": 5})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert sorted(x["segment_id"] for x in results) == ["clip:0", "clip:2000"]
        assert all(set(x) >= {"source", "segment_id", "t0", "t1", "score"} and x["source"] == SOURCE for x in results)
        assert all(x["thumbnail_url"] == f"/v1/segments/{SOURCE}%3A{x['segment_id'][5:]}/thumbnail" for x in results)
        scores = [x["score"] for x in results]
        assert scores == sorted(scores, reverse=True)
        # no sources: every source the key may see
        everything = c.post("/v1/search", json={"query": "a white box", "limit": 10}).json()["results"]
        indexed = {s["source_id"] for s in c.get("/v1/sources").json()["sources"]}
        assert {x["source"] for x in everything} == indexed and SOURCE in indexed
        assert len(c.post("/v1/search", json={"query": "a white box", "limit": 1}).json()["results"]) == 1
        err(c.post("/v1/search", json={"query": "x" * 501}), 422, "query has 501 characters; the limit is 500")
        err(c.post("/v1/search", json={"query": "q", "limit": 101}), 422, "api_max_search_results")
        err(c.post("/v1/search", json={"query": "q", "limit": 0}), 422, "limit")
        err(c.post("/v1/search", json={"query": "q", "limit": True}), 422, "limit")
        err(raw_post(c, "/v1/search", '{"query": "q", "start": NaN}'), 422, "start")
        err(raw_post(c, "/v1/search", '{"query": "q", "end": 1e400}'), 422, "end")
        err(c.post("/v1/search", json={"query": ""}), 422, "query")
        err(c.post("/v1/search", json={"query": "q", "sources": []}), 422, "non-empty list")
        err(c.post("/v1/search", json={"query": "q", "sources": ["nope"]}), 404, "nope")
        # times as people write them: "+m:ss" into an archive; hits show their times back the same way
        late = c.post("/v1/search", json={"query": "a white box", "sources": [SOURCE], "start": "+0:02"}).json()
        assert [(x["segment_id"], x["start"], x["end"]) for x in late["results"]] == [("clip:2000", "0:02", "0:04")]
        err(c.post("/v1/search", json={"query": "q", "start": "soon"}), 422, "start must be a time")
        err(c.post("/v1/search", json={"query": "q", "end": True}), 422, "end")
        segs = c.get(f"/v1/sources/{SOURCE}/segments", params={"end": "+0:01"}).json()["segments"]
        assert [(x["segment_id"], x["start"]) for x in segs] == [("clip:0", "0:00")]
        err(c.get(f"/v1/sources/{SOURCE}/segments", params={"start": "-2x"}), 422, "start must be a time")
    with http(served, CAM_READER) as c:                       # sees no source: an empty result, not an error
        assert c.post("/v1/search", json={"query": "q"}).json()["results"] == []


def test_ask_answers_with_evidence_and_writes_redis(served):
    with http(served, READER) as c:
        r = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "start": 0, "end": 4,
                                    "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        ans = r.json()
        assert set(ans) >= {"id", "answer", "boxes", "evidence", "model", "timings", "stream_entry"}
        assert ans["answer"] == "!" * 8 and ans["boxes"] == []     # the exclaiming model's only answer
        assert [(e["source"], e["segment_id"], e["t0"], e["t1"]) for e in ans["evidence"]] == \
            [(SOURCE, "clip:0", 0.0, 2.0), (SOURCE, "clip:2000", 2.0, 4.0)]
        assert ans["generation"]["temperature"] == 0.0                # the checkpoint's: greedy
        sampled = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "max_new_tokens": 8,
                                          "temperature": 1.5, "top_k": 5, "seed": 3}).json()
        assert sampled["generation"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 5, "repetition_penalty": 1.0,
                                         "seed": 3}
        err(c.post("/v1/ask", json={"question": "q", "source": SOURCE, "temperature": 9}), 422, "temperature")
        err(c.post("/v1/ask", json={"question": "q", "source": SOURCE, "top_p": 0}), 422, "top_p")
        assert [e["thumbnail_url"] for e in ans["evidence"]] == ["/v1/segments/clip%3A0/thumbnail",
                                                                 "/v1/segments/clip%3A2000/thumbnail"]
    entries = served["redis"].client(decode_responses=True).xrange(ANSWERS_STREAM, ans["stream_entry"],
                                                                   ans["stream_entry"])
    assert len(entries) == 1 and ans["id"] in json.dumps(entries[0][1]) and json.loads(entries[0][1]["boxes"]) == []


def test_ask_streams_tokens_as_server_sent_events(served):
    with http(served, READER) as c:
        with c.stream("POST", "/v1/ask", json={"question": "What moves?", "sources": [SOURCE], "max_new_tokens": 8,
                                               "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = list(parse_sse(r.iter_lines()))
    kinds = [e for e, _ in events]
    result = events[-1][1]
    assert kinds[-1] == "result" and set(kinds[:-1]) <= {"token"}, events
    assert result["answer"] == "!" * 8 and len(kinds) >= 2, events
    assert "".join(d["text"] for e, d in events[:-1]) == result["answer"]
    assert result["stream_entry"] and len(result["evidence"]) == 2 and result["boxes"] == []
    # the client gives the same through its on_token callback
    pieces: list[str] = []
    with TubescopeClient(served["url"], READER) as tc:
        out = tc.ask("What moves?", [SOURCE], max_new_tokens=4, on_token=pieces.append)
        assert "".join(pieces) == out["answer"] == "!!!!" and out["boxes"] == []
        with pytest.raises(ApiError) as info:                   # an error before the stream starts is plain HTTP
            tc.ask("What moves?", ["nope"], on_token=pieces.append)
        assert info.value.status == 404


def test_a_client_that_closes_its_stream_frees_the_decoder(served):
    """Closing a streamed answer's connection cancels it down to the decoder replica: the question leaves the batch
    at its next step, counted as cancelled, instead of decoding its remaining tokens for nobody (the tiny model takes
    seconds for 1024)."""
    def decoder() -> dict:
        with http(served, ADMIN) as c:
            return c.get("/v1/status").json()["decoder"]

    before = decoder()
    with http(served, READER) as c:
        with c.stream("POST", "/v1/ask", json={"question": "What moves?", "sources": [SOURCE], "max_new_tokens": 1024,
                                               "stream": True}) as r:
            assert next(parse_sse(r.iter_lines()))[0] == "token"
    # the connection is closed here, with most of the answer still to come
    after = wait_for(lambda: (d := decoder())["cancelled"] > before["cancelled"] and d["batch"]["rows"] == 0 and d,
                     20, what="the closed stream's question cancelled")
    assert after["asks"] == before["asks"] and after["failed"] == before["failed"]
    assert after["batch"]["steps"] - before["batch"]["steps"] < 1000


def test_summarize_streams_lines_then_the_summary_and_reuses_them(served):
    lines: list[dict] = []
    with TubescopeClient(served["url"], READER) as tc:
        out = tc.summarize([SOURCE], max_new_tokens=4, on_line=lines.append)
        assert [line["level"] for line in lines] == ["period"] and out["lines"] == lines
        assert lines[0]["text"] == "!!!!" and (lines[0]["start"], lines[0]["end"]) == ("0:00", "0:04")
        assert out["summaries"] == {SOURCE: "!!!!"} and lines[0]["cached"] is False
        again = tc.summarize([SOURCE], max_new_tokens=4)                # plain JSON; the period from the cache
        assert again["summaries"] == out["summaries"] and again["lines"][0]["cached"] is True
        with pytest.raises(ApiError) as info:
            tc.summarize([SOURCE], granularity=1)
        assert info.value.status == 422 and "granularity" in str(info.value)
    (_, fields), *_ = served["redis"].client(decode_responses=True).xrevrange(SUMMARIES_STREAM, count=1)
    assert json.loads(fields["summaries"]) == out["summaries"]
    with http(served, CAM_READER) as c:                               # a key limited to cam1 cannot read clip
        err(c.post("/v1/summarize", json={"source": SOURCE}), 403, "clip")


def test_a_vanished_index_root_is_503_not_an_empty_index(served):
    """An unmounted or deleted index volume must not read as 'nothing indexed' (404) or be recreated by a write."""
    root = Path(served["settings"].index_root)
    away = root.with_name(root.name + "-unmounted")
    root.rename(away)
    try:
        with http(served, READER) as c:
            r = c.get("/healthz")
            assert r.status_code == 503 and r.json()["index"] is False and r.json()["redis"] is True
            err(c.get("/v1/sources"), 503, "index root")
            err(c.get(f"/v1/sources/{SOURCE}/segments"), 503, "index root")
            err(c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "max_new_tokens": 2}), 503,
                "index root")
            err(c.post("/v1/search", json={"query": "a car", "sources": [SOURCE]}), 503, "index root")
        with http(served, ADMIN) as c:                     # a job could only fail (or start a new index): refused
            err(c.post("/v1/jobs", json={"paths": [str(served["clip"])], "source_id": "late"}), 503, "index root")
        assert not root.exists()
    finally:
        away.rename(root)                                  # the volume comes back: everything indexed is there
    with http(served, READER) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.post("/v1/ask", json={"question": "What moves?", "source": SOURCE, "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["answer"] == "!!" and len(r.json()["evidence"]) == 2


def test_an_unwritable_index_is_503_in_healthz(served):
    """A volume remounted read-only still reads: /healthz must say ingest cannot write, naming the cause."""
    with read_only(served["settings"].index_root) as cause:
        with http(served, None) as c:
            r = c.get("/healthz")
            assert r.status_code == 503, r.text
            assert r.json()["index"] is True and r.json()["index_writable"] is False
            assert r.json()["error"] == f"index not writable: {cause}"
    with http(served, None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
    assert not [p for p in Path(served["settings"].index_root).iterdir() if p.name.startswith(".tmp-")]


def test_ask_and_search_with_images(served, tmp_path):
    """/v1/ask over images alone and /v1/search by a segment's own thumbnail, which ranks that segment first; the
    client and CLI send image files."""
    import base64

    from click.testing import CliRunner

    from deploy.cli import cli
    with http(served, READER) as c:
        jpeg = c.get(f"/v1/segments/{SOURCE}%3A2000/thumbnail").content
        image = base64.b64encode(jpeg).decode()
        found = c.post("/v1/search", json={"image": "data:image/jpeg;base64," + image, "sources": [SOURCE]}).json()
        assert found["results"][0]["segment_id"] == f"{SOURCE}:2000"
        assert found["results"][0]["thumbnail_url"] == f"/v1/segments/{SOURCE}%3A2000/thumbnail"
        # captioned by the caption service (test above): compared through the retrieval index's pooled vectors
        assert found["coverage"] == {"segments": 2, "captioned": 2, "retrieval": True, "compared": 2,
                                     "sampled": False, "by": "image"}
        asked = c.post("/v1/ask", json={"question": "What is this?", "images": [image], "max_new_tokens": 2})
        assert asked.status_code == 200 and asked.json()["plan"]["kind"] == "none", asked.text
        err(c.post("/v1/search", json={"sources": [SOURCE]}), 422, "give a query, an image, or both")
        err(c.post("/v1/ask", json={"question": "What?", "images": [image] * 3}), 422, "the limit is 2 (api_max_images)")
        err(c.post("/v1/ask", json={"question": "What?", "images": ["A" * 21_852]}), 413, "api_max_image_bytes")
        err(c.post("/v1/ask", json={"question": "What?", "images": [base64.b64encode(b"text").decode()]}), 422,
            "not an image")
    photo = tmp_path / "thumb.jpg"
    photo.write_bytes(jpeg)
    client = TubescopeClient(served["url"], READER)
    assert client.search(image=photo, sources=[SOURCE], limit=1)[0]["segment_id"] == f"{SOURCE}:2000"
    assert client.ask("What is this?", images=[photo], max_new_tokens=2)["answer"] == asked.json()["answer"]
    result = CliRunner().invoke(cli, ["search", "--image", str(photo), "-s", SOURCE, "--limit", "1", "--json",
                                      "--url", served["url"], "--key", READER])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["segment_id"] == f"{SOURCE}:2000", result.output
    result = CliRunner().invoke(cli, ["ask", "What is this?", "--image", str(photo), "--max-new-tokens", "2",
                                      "--no-stream", "--url", served["url"], "--key", READER])
    assert result.exit_code == 0 and "plan: the images only" in result.output, result.output


def test_ask_limits_and_bad_requests(served):
    with http(served, READER) as c:
        q = {"question": "What moves?", "source": SOURCE}
        err(c.post("/v1/ask", json={**q, "question": "x" * 201}), 422, "question has 201 characters; the limit is 200")
        err(c.post("/v1/ask", json={**q, "start": 0, "end": 7200}), 422, "longer than the limit 3600 s")
        err(c.post("/v1/ask", json={**q, "start": 5, "end": 5}), 422, "must be after start")
        err(c.post("/v1/ask", json={**q, "max_new_tokens": 1025}), 422,
            "max_new_tokens 1025 is over the maximum 1024")
        err(c.post("/v1/ask", json={**q, "max_new_tokens": 0}), 422, "max_new_tokens")
        err(c.post("/v1/ask", json={**q, "sources": [SOURCE]}), 422, "either source or sources")
        err(c.post("/v1/ask", json={"question": "What?"}), 422, "source (one id) or sources")
        err(c.post("/v1/ask", json={**q, "source": "nope"}), 404, "nope")
        err(c.post("/v1/ask", json={**q, "start": 100, "end": 200}), 404, "")
        err(c.post("/v1/ask", json={"question": ""}), 422, "question")
        err(c.post("/v1/ask", content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid")
        big = {**q, "question": "x" * 50_000}                 # over 4096 plus room for two images
        err(c.post("/v1/ask", json=big), 413, "request body over 47920 bytes")

        def chunks():                                         # no Content-Length: counted as it arrives
            yield b'{"question": "'
            for _ in range(50):
                yield b"x" * 1000
            yield b'", "source": "clip"}'
        err(c.post("/v1/ask", content=chunks(), headers={"content-type": "application/json"}), 413, "47920 bytes")


def test_overload_is_503_with_retry_after(served):
    """One ask running, one queued (max_queued_requests=1): the rest are refused at once, not left hanging."""
    results: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def ask():
        with http(served, READER) as c:
            start.wait()
            r = c.post("/v1/ask", json={"question": "Describe everything in detail.", "source": SOURCE,
                                        "max_new_tokens": 64})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 8 and set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in results:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "7" and "busy" in r.json()["error"], (r.headers, r.text)
    with http(served) as c:
        wait_for_metric(c, r'tubescope_requests_total\{[^}]*endpoint="POST /v1/ask"[^}]*status="503"')
