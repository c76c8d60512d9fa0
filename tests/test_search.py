"""Segment search: yes/no log-likelihood scores equal a direct single-prompt forward; cached and batched scoring
changes nothing; the work over long windows is bounded as documented in deploy/search.py."""
from __future__ import annotations

import pytest
import torch

import qwen2vl
from deploy.decoder import Decoder
from deploy.search import SEARCH_PROMPT, evenly_spaced, neighbours, yes_no_ids
from pipeline.checkpoints import model_id
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.settings import load_settings
from tests.test_footage import clip_frames, index_frames

pytestmark = pytest.mark.timeout(120)
QUERY = "a white box moving right"


class CountingIndex(SegmentIndex):
    """A real SegmentIndex that counts token reads."""
    reads = 0

    def tokens(self, segment_id, model_id=None, as_numpy=False):
        self.reads += 1
        return super().tokens(segment_id, model_id, as_numpy)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    ckpt = qwen2vl.write_tiny_checkpoint(root / "tiny", seed=5)
    model = qwen2vl.load_pretrained(ckpt)
    mid = model_id(ckpt)
    index = CountingIndex(root / "index")
    index_frames(index, model, mid, "cam1", clip_frames(root, "moving"))                       # 3 x 36 tokens
    index_frames(index, model, mid, "sq", clip_frames(root, "square", 96, 96, seconds=4.0))    # 2 x 18 tokens
    return {"ckpt": ckpt, "model": model, "mid": mid, "index": index,
            "processor": qwen2vl.Processor.from_pretrained(ckpt)}


def _decoder(world, tmp_path, index=None, **settings):
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"], **settings)
    return Decoder(s, world["ckpt"], index=index if index is not None else world["index"])


@torch.no_grad()
def _direct_score(world, label: str, segment_id: str, query: str) -> float:
    """log p(' yes') - log p(' no') from one plain forward over a prompt written out by hand."""
    proc = world["processor"]
    record = world["index"].get(segment_id)
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": label}, {"type": "video"},
        {"type": "text", "text": "\n" + SEARCH_PROMPT.format(query=query)}]}])
    grid = torch.tensor([record.grid_thw])
    ids = proc.encode_with_grids(text, video_grid_thw=grid)["input_ids"]
    embeds = torch.from_numpy(record.tokens.copy()).float()
    logits = world["model"](ids, video_embeds=embeds, video_grid_thw=grid).logits
    logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
    yes, no = proc.tokenizer.encode(" yes")[0], proc.tokenizer.encode(" no")[0]
    return float(logp[yes] - logp[no])


def test_helpers():
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    assert evenly_spaced(100, 5) == [0, 25, 50, 74, 99]
    assert evenly_spaced(7, 1) == [0]
    assert neighbours([5], 10, {0, 5, 9}, 3) == [4, 6, 3]
    assert neighbours([0, 9], 10, {0, 9}, 10) == [1, 8, 2, 7, 3, 6, 4, 5]
    assert neighbours([1], 3, {0, 1, 2}, 5) == []


def test_yes_no_ids_come_from_the_tokenizer(world):
    tok = world["processor"].tokenizer
    yes, no = yes_no_ids(tok)
    assert (yes, no) == (tok.encode(" yes")[0], tok.encode(" no")[0]) and yes != no


def test_scores_equal_direct_forward_and_cached_rerun_reads_nothing(world, tmp_path):
    dec = _decoder(world, tmp_path)
    world["index"].reads = 0
    results = dec.search(QUERY, ["cam1", "sq"], limit=10)
    assert world["index"].reads == 5                                   # every segment's tokens read once
    labels = {"cam1:0": "0:00:00-0:00:02", "cam1:2000": "0:00:02-0:00:04", "cam1:4000": "0:00:04-0:00:06",
              "sq:0": "0:00:00-0:00:02", "sq:2000": "0:00:02-0:00:04"}
    assert {r["segment_id"] for r in results} == set(labels)
    for r in results:                                                  # one batch mixing two prefix lengths
        direct = _direct_score(world, f"[source {r['source']}, {labels[r['segment_id']]}]", r["segment_id"], QUERY)
        assert r["score"] == pytest.approx(direct, abs=1e-4), r
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert len({round(r["score"], 6) for r in results}) == 5          # distinct: the order means something
    assert results[0].keys() == {"source", "segment_id", "t0", "t1", "score", "caption", "start", "end"}
    assert all(r["caption"] is None for r in results)                  # nothing captioned here: all sampled

    again = dec.search(QUERY, ["cam1", "sq"], limit=10)                # cached prefixes: only the question runs
    assert world["index"].reads == 5
    assert [r["segment_id"] for r in again] == [r["segment_id"] for r in results]
    for a, b in zip(again, results):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    other = dec.search("a red car", ["cam1", "sq"], limit=2)           # a new query reuses them too
    assert len(other) == 2 and world["index"].reads == 5
    assert other[0]["score"] == pytest.approx(
        _direct_score(world, f"[source {other[0]['source']}, {labels[other[0]['segment_id']]}]",
                      other[0]["segment_id"], "a red car"), abs=1e-4)
    assert dec.stats()["prefix_cache"]["hits"] == 10 and dec.stats()["searches"] == 3


def test_ask_over_one_segment_shares_the_search_prefix(world, tmp_path):
    dec = _decoder(world, tmp_path)
    dec.search(QUERY, ["cam1"], start=0.0, end=2.0)
    result = dec.ask("What is it?", ["cam1"], start=0.0, end=2.0, max_new_tokens=2)
    assert result["timings"]["prefix_cache"] == "hit"


def test_long_windows_score_a_bounded_sample_then_refine(world, tmp_path):
    index = SegmentIndex(tmp_path / "long")
    base = world["index"].get("cam1:0")
    tokens = [world["index"].get(s).tokens for s in ("cam1:0", "cam1:2000", "cam1:4000")]
    index.add([IndexedSegment(segment_id="", source_id="yard", t0=2.0 * k, t1=2.0 * (k + 1), grid_thw=base.grid_thw,
                              tube_ts=[2.0 * k, 2.0 * k + 1.0], tokens=tokens[k % 3], model_id=world["mid"])
               for k in range(20)])
    dec = _decoder(world, tmp_path, index=index)
    dec.ranker.sample_cap, dec.ranker.refine_cap, dec.ranker.refine_top = 5, 3, 1
    results = dec.search(QUERY, ["yard"], limit=20)
    scored = {int(r["t0"] // 2) for r in results}
    first = evenly_spaced(20, 5)
    assert first == [0, 5, 10, 14, 19] and len(results) == 8 == dec.ranker.segments_scored
    best = max(first, key=lambda i: next(r["score"] for r in results if int(r["t0"] // 2) == i))
    assert scored == set(first) | set(neighbours([best], 20, set(first), 3))


def test_errors(world, tmp_path):
    dec = _decoder(world, tmp_path)
    with pytest.raises(ValueError, match="limit"):
        dec.search(QUERY, ["cam1"], limit=0)
    with pytest.raises(ValueError, match="question"):
        dec.search("", ["cam1"])
    with pytest.raises(LookupError, match="unknown source"):
        dec.search(QUERY, ["nope"])
    with pytest.raises(LookupError, match="no footage"):
        dec.search(QUERY, ["cam1"], start=100.0, end=200.0)


def test_alert_scores_batched_over_segments_and_questions_equal_one_search_each(world, tmp_path):
    """Standing alerts score several segments (two prefix lengths) each against its own questions (different
    lengths, left-padded) in shared batches: every score equals a one-query search of that segment, and each
    prefix is read once."""
    queries = [QUERY, "a red car", "somebody in a long grey coat walking the dog past the door"]
    dec = _decoder(world, tmp_path)
    dec.ranker.batch_size = 4                                        # 7 pairs: a full batch and a partial one
    world["index"].reads = 0
    segments = [{"segment_id": s, "source_id": s.split(":")[0], "t0": float(s.split(":")[1]) / 1000,
                 "t1": float(s.split(":")[1]) / 1000 + 2} for s in ("cam1:0", "sq:2000", "cam1:4000")]
    asked = [queries, queries[1:], [queries[2], queries[0]]]
    scores = dec.score_segments(segments + [{**segments[0], "segment_id": "cam1:999"}], asked + [[QUERY]])
    assert world["index"].reads == 3 and scores[3] is None           # a segment not in the index: no scores
    alone = _decoder(world, tmp_path)
    for seg, qs, got in zip(segments, asked, scores):
        for q, score in zip(qs, got):
            (hit,) = [r for r in alone.search(q, [seg["source_id"]], limit=10) if r["segment_id"] == seg["segment_id"]]
            assert score == pytest.approx(hit["score"], abs=1e-4), (seg, q)
    with pytest.raises(ValueError, match="question"):
        dec.score_segments(segments[:1], [[""]])
