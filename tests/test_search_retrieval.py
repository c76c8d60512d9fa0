"""Search over every captioned segment: retrieval candidates reranked by the yes/no scorer (deploy/decoder.py).

Captions are planted (the retrieval path must not depend on the tiny model's random text): a needle caption at one
position among hundreds of segments is always among the reranked candidates, sources outside the request never
appear, segments not captioned yet are still sampled, and an unreadable retrieval index is an error, not a silent
fallback.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import qwen2vl
from deploy.decoder import Decoder
from pipeline.captions import Caption, CaptionStore, pooled_visual
from pipeline.checkpoints import model_id
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.retrieval import RetrievalIndex, RetrievalUnavailable
from pipeline.settings import load_settings

pytestmark = pytest.mark.timeout(180)
NEEDLE = "a red forklift tips over near the loading dock"
WORDS = ["person", "walks", "car", "parks", "door", "opens", "empty", "hallway", "light", "rain", "truck", "gate"]
N_CAM, N_DOOR, NEEDLE_AT = 240, 40, 173


def _segments(source, n, mid, seed):
    gen = torch.Generator().manual_seed(seed)
    return [IndexedSegment(segment_id="", source_id=source, t0=8.0 * k, t1=8.0 * k + 8.0, grid_thw=(2, 4, 4),
                           tube_ts=[8.0 * k, 8.0 * k + 1.0],
                           tokens=(torch.randn(8, 64, generator=gen) * 2).half().numpy(), model_id=mid)
            for k in range(n)]


def _captions(segs, mid, needle_at=None, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k, s in enumerate(segs):
        text = NEEDLE if k == needle_at else " ".join(rng.choice(WORDS, 5))
        v = rng.standard_normal(64).astype(np.float32)
        out.append(Caption(s.segment_id, s.source_id, s.t0, s.t1, text, v / np.linalg.norm(v), mid,
                           pooled_visual(s.tokens)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-retrieval")
    ckpt = qwen2vl.write_tiny_checkpoint(root / "tiny")
    mid = model_id(ckpt)
    index = SegmentIndex(root / "index")
    cam, door = _segments("cam", N_CAM, mid, 1), _segments("door", N_DOOR, mid, 2)
    index.add(cam + door)
    captions = _captions(cam, mid, NEEDLE_AT) + _captions(door, mid, 7, seed=1)
    pending = {c.segment_id for c in captions[N_CAM - 10:N_CAM]}          # the last 10 of cam are not captioned yet
    captions = [c for c in captions if c.segment_id not in pending]
    CaptionStore(index).add(captions)
    retrieval = RetrievalIndex(root / "index", dim=64, create=True)
    retrieval.upsert(c.to_row(0.0) for c in captions)
    settings = load_settings(data_dir=root / "data", index_dir=str(root / "index"), model_path=ckpt,
                             search_candidates=16, ask_token_budget=64, long_pixels=0)   # over budget: retrieval
    return {"root": root, "ckpt": ckpt, "index": index, "decoder": Decoder(settings, ckpt, index=index), "cam": cam, "pending": pending,
            "retrieval": retrieval, "captions": {c.segment_id: c.caption for c in captions}}


def test_the_needle_is_a_candidate_and_other_sources_never_appear(world):
    dec = world["decoder"]
    out = dec.search_window(NEEDLE, ["cam"], limit=100)
    results, coverage = out["results"], out["coverage"]
    assert coverage == {"segments": N_CAM, "captioned": N_CAM - 10, "retrieval": True, "reranked": 16 + 10}
    needle_id = world["cam"][NEEDLE_AT].segment_id
    by_id = {r["segment_id"]: r for r in results}
    assert by_id[needle_id]["caption"] == NEEDLE
    assert {r["source"] for r in results} == {"cam"}                     # door's needle never leaks in
    assert world["pending"] <= set(by_id)                                # not captioned yet: still looked at
    for r in results:
        assert r["caption"] == world["captions"].get(r["segment_id"])    # None while pending
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # the window filter applies to retrieval too: a window without the needle does not return it
    early = dec.search_window(NEEDLE, ["cam"], start=0.0, end=8.0 * 100, limit=100)["results"]
    assert needle_id not in {r["segment_id"] for r in early} and max(r["t0"] for r in early) < 800.0


def test_an_over_budget_ask_narrows_through_retrieval(world):
    dec = world["decoder"]
    out = dec.ask(NEEDLE, ["cam"], max_new_tokens=2)
    assert out["narrowed"] and 0 < len(out["evidence"]) <= 64 // 8              # the budget holds 8 segments
    seen = {e["segment_id"] for e in out["evidence"]}
    assert seen <= {r["segment_id"] for r in dec.search_window(NEEDLE, ["cam"], limit=100)["results"]}


def test_an_unreadable_retrieval_index_is_an_error_not_a_silent_sample(world):
    dec = world["decoder"]
    saved = world["root"] / "saved"
    shutil.copytree(world["retrieval"].uri, saved)
    shutil.rmtree(world["retrieval"].uri)
    try:
        with pytest.raises(RetrievalUnavailable):
            dec.search_window(NEEDLE, ["cam"], limit=5)
        # a window with nothing captioned needs no retrieval: the sampled scan answers
        out = dec.search_window(NEEDLE, ["cam"], start=8.0 * (N_CAM - 10), limit=5)
        assert out["coverage"]["retrieval"] is False and len(out["results"]) == 5
    finally:
        shutil.copytree(saved, world["retrieval"].uri)
    assert dec.search_window(NEEDLE, ["cam"], limit=3)["coverage"]["retrieval"] is True


def test_with_captions_off_search_samples_the_window(world, tmp_path):
    settings = load_settings(data_dir=tmp_path, index_dir=str(world["root"] / "index"), model_path=world["ckpt"],
                             captions=False)
    dec = Decoder(settings, world["ckpt"], index=world["index"])
    assert dec.retrieval is None
    out = dec.search_window(NEEDLE, ["cam"], limit=200)
    assert out["coverage"] == {"segments": N_CAM, "captioned": 0, "retrieval": False}
    assert len(out["results"]) == 64 + 32 and all(r["caption"] is None for r in out["results"])   # sample + refine
