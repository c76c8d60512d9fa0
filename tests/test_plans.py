"""Plans for long windows (deploy/plans.py) and the long-video tier they read (pipeline/long_tier.py).

Plans over generated metadata for 30 s, 20 min, 6 h and 3 days of footage; then a real index written by the live
path with the tier (tiny model), asked through the Decoder: the long plan's answer equals a direct generate over the
same long-tier tokens and positions, concurrent asks over different plans equal sequential ones, and a retrieval
plan carries the captions of what it did not show.
"""
from __future__ import annotations

import threading

import pytest
import torch

import qwen2vl
from actors.encoder import VisionEncoder
from deploy.decoder import Decoder
from deploy.footage import block_label, format_span, group_blocks
from deploy.plans import MAX_PLAN_TUBES, caption_lines, plan_window, sample_tubes
from pipeline.checkpoints import model_id
from pipeline.index import SegmentIndex
from pipeline.live import LiveIndexing
from pipeline.long_tier import LongTier, long_file_name
from pipeline.settings import load_settings
from pipeline.tubes import long_grid, resize_rows, tubes_from_segment
from pipeline.video.segments import segment_frames
from tests.reference import answer_text
from tests.test_footage import SEGMENT_S, answering_checkpoint, clip_frames

pytestmark = pytest.mark.timeout(180)
QUESTION = "What moves in this footage?"
N_NEW = 8
LONG_PIXELS = 4 * 28 * 28                 # 2x2 tokens per frame: (2, 6, 12) tubes of the test clips become (2, 2, 4)


# ---- plans over metadata ---------------------------------------------------------------------------------------------

def _rows(seconds: float, grid=(8, 26, 46), segment_s: float = 8.0, source: str = "lobby", t0: float = 1.7e9):
    """Metadata rows of `seconds` of contiguous 360p footage (8 s segments of 8 tubes, 299 tokens per tube)."""
    n = int(seconds // segment_s)
    t, h, w = grid
    tube_s = segment_s / t
    return [{"segment_id": f"{source}:{round((t0 + k * segment_s) * 1000)}", "source_id": source,
             "t0": t0 + k * segment_s, "t1": t0 + (k + 1) * segment_s, "grid_thw": grid,
             "tube_ts": [t0 + k * segment_s + i * tube_s for i in range(t)], "n_tokens": t * h * w // 4}
            for k in range(n)]


def _plan(rows, present=None, budget=16384, long_pixels=100352):
    present = {r["segment_id"] for r in rows} if present is None else present
    return plan_window(rows, budget=budget, long_pixels=long_pixels, long_present=present, max_stride_s=300.0,
                       tube_seconds=1.0)


def test_plans_for_30s_20min_6h_and_3_days():
    short = _plan(_rows(32))
    assert short.kind == "full" and short.tubes == 32 and short.visual_tokens == 4 * 8 * 299
    assert {r["tier"] for r in short.rows} == {"full"}

    per_tube = 16 * 30 // 4                                            # the long tier of 364x644 frames: 224x420
    assert long_grid((8, 26, 46), 100352) == (8, 16, 30)
    cap = 16384 // per_tube
    for seconds in (20 * 60, 6 * 3600):
        rows = _rows(seconds)
        plan = _plan(rows)
        assert plan.kind == "long" and plan.tubes == cap <= MAX_PLAN_TUBES and plan.visual_tokens <= 16384
        assert plan.summary()["resolutions"] == ["420x224"] and plan.summary()["tier"] == "long"
        times = [ts for r in plan.rows for ts in r["tube_ts"]]
        assert times == sorted(times) and times[0] == rows[0]["t0"] and times[-1] == rows[-1]["tube_ts"][-1]
        assert plan.stride_s == pytest.approx(seconds / cap)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) - min(gaps) <= 1.0 + 1e-6                     # evenly spread, to the tube
        blocks = group_blocks(plan.rows, 1.0, 60.0)
        ids = [i for b in blocks for i in b.temporal_ids]
        assert len(blocks) == 1 and all(b > a for a, b in zip(ids, ids[1:]))        # strictly increasing
        assert "moments about every" in block_label(blocks[0])

    days = _plan(_rows(3 * 86400))
    assert days.kind == "retrieval" and days.rows == [] and days.stride_s > 300.0

    # the tier off, or not written yet: the window goes to retrieval; partly written: only what has it is sampled
    assert _plan(_rows(20 * 60), long_pixels=0).kind == "retrieval"
    assert _plan(_rows(20 * 60), present=set()).kind == "retrieval"
    rows = _rows(20 * 60)
    half = _plan(rows, present={r["segment_id"] for r in rows[::2]})
    assert half.kind == "long" and half.long_missing == len(rows) // 2
    assert {r["segment_id"] for r in half.rows} <= {r["segment_id"] for r in rows[::2]}


def test_a_window_of_few_long_tubes_takes_them_all_and_caps_at_the_frame_limit():
    rows = _rows(64)                                                   # 64 tubes: 19136 tokens, over 16384
    plan = _plan(rows)
    assert plan.kind == "long" and plan.tubes == 64 and all("tubes" not in r for r in plan.rows)
    small = _rows(3600, grid=(8, 4, 4))                                # 4 tokens per tube: the frame cap binds
    assert _plan(small, budget=14400, long_pixels=100352).kind == "full"          # 450 x 8 x 4 tokens
    capped = _plan(small, budget=3000, long_pixels=3136)
    assert capped.kind == "long" and capped.tubes == MAX_PLAN_TUBES


def test_sample_tubes_spreads_over_sources_in_time_order():
    rows = _rows(80, source="a") + _rows(80, source="b", t0=1.7e9 + 4.0)
    picked = sample_tubes(rows, 10)
    assert sum(len(r["tubes"]) for r in picked) == 10
    for r in picked:
        assert r["grid_thw"][0] == len(r["tubes"]) and r["n_tokens"] == len(r["tubes"]) * 299


def test_caption_lines_merge_runs_and_skip_what_was_seen():
    rows = _rows(48, source="lobby", t0=0.0)                           # 6 segments of 8 s
    captions = {r["segment_id"]: "an empty hall" for r in rows[:3]}
    captions[rows[3]["segment_id"]] = "a person walks in"
    captions[rows[5]["segment_id"]] = "the hall is empty again"
    lines = caption_lines(rows, captions, {rows[5]["segment_id"]}, 10, format_span)
    assert lines == ["[lobby 0:00:00-0:00:24] an empty hall", "[lobby 0:00:24-0:00:32] a person walks in"]
    assert len(caption_lines(rows, {r["segment_id"]: f"c{i}" for i, r in enumerate(rows)}, set(), 3,
                             format_span)) == 3
    assert caption_lines(rows, captions, set(), 0, format_span) == []


# ---- the tier, written and read ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """cam1: 0-6 s and 100-106 s, cam2: 0-6 s, indexed by the live path with the long tier."""
    root = tmp_path_factory.mktemp("plans")
    ckpt = answering_checkpoint(root / "tiny")
    index = SegmentIndex(root / "index")
    encoder = VisionEncoder(str(ckpt), token_budget=4096, long_pixels=LONG_PIXELS, pipeline="live")
    live = LiveIndexing(encoder, index)
    moving = clip_frames(root, "moving")
    noise = clip_frames(root, "noise", pattern="noise", seed=3)
    for source, frames, offset in (("cam1", moving, 0.0), ("cam1", moving, 100.0), ("cam2", noise, 0.0)):
        live.process(segment_frames(source, [(ts + offset, f) for ts, f in frames], segment_seconds=SEGMENT_S,
                                    fps=2.0))
    return {"root": root, "ckpt": ckpt, "mid": model_id(ckpt), "index": index, "encoder": encoder,
            "model": qwen2vl.load_pretrained(ckpt), "processor": qwen2vl.Processor.from_pretrained(ckpt),
            "moving": moving}


def _decoder(world, tmp_path, **settings):
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"], long_pixels=LONG_PIXELS,
                      captions=False, **settings)
    return Decoder(s, world["ckpt"], index=world["index"])


def test_the_tier_is_the_same_frames_resized_and_encoded_in_one_batch(world):
    index, mid = world["index"], world["mid"]
    rows = index.list("cam1")
    assert len(rows) == 6 and all(r["grid_thw"] == (2, 6, 12) for r in rows)
    tier = LongTier(index, LONG_PIXELS)
    assert tier.present(rows, mid) == {r["segment_id"] for r in rows}
    seg = segment_frames("cam1", world["moving"], segment_seconds=SEGMENT_S, fps=2.0)[0]
    tubes = tubes_from_segment(seg, as_uint8=True)
    small_rows = resize_rows(torch.from_numpy(tubes.pixel_rows), tubes.grid_thw, (2, 2, 4))
    alone = world["encoder"].encode([small_rows], [(2, 2, 4)])[0]
    # packed with other segments (fp32 sums in another order), stored as fp16: equal to fp16 rounding
    torch.testing.assert_close(tier.tokens(rows[0], mid).float(), alone.float(), atol=2e-3, rtol=0)
    assert alone.shape[0] == 2 * 2
    # a tier that needs no file of its own (frames already small) reads the segment's tokens
    roomy = LongTier(index, 100352)
    assert roomy.present(rows, mid) == {r["segment_id"] for r in rows}
    assert torch.equal(roomy.tokens(rows[0], mid), index.tokens(rows[0]["segment_id"], mid))
    # deleting a segment takes its long tier along
    folder = index._dir("cam2")
    victim = index.list("cam2")[0]
    name = long_file_name(victim["segment_id"], mid, LONG_PIXELS)
    assert name in {i.base_name for i in index._ls(folder)}
    assert index.delete("cam2", before=victim["t1"]) == 1
    assert name not in {i.base_name for i in index._ls(folder)}
    assert len(index.list("cam2")) == 2


@torch.no_grad()
def _direct_answer(world, dec, rows, tubes, question):
    """A generate over a prompt written here: one video of the given long-tier tubes at their positions."""
    plan_rows = []
    for r in rows:
        keep = tubes[r["segment_id"]]
        grid = long_grid(r["grid_thw"], LONG_PIXELS)
        plan_rows.append({**r, "tier": "long", "tubes": keep, "grid_thw": (len(keep), *grid[1:]),
                          "tube_ts": [r["tube_ts"][k] for k in keep], "n_tokens": len(keep) * 2})
    block, = group_blocks(plan_rows, dec.tube_seconds, dec.settings.max_gap_seconds)
    content = [{"type": "text", "text": block_label(block)}, {"type": "video"}, {"type": "text", "text": "\n" + question}]
    proc = world["processor"]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    grid = torch.tensor([block.grid_thw])
    ids = proc.encode_with_grids(text, video_grid_thw=grid)["input_ids"]
    tier = LongTier(world["index"], LONG_PIXELS)
    parts = [tier.tokens(r, world["mid"]) for r in rows]
    embeds = torch.cat([t.view(2, -1, t.shape[-1])[tubes[r["segment_id"]]].reshape(-1, t.shape[-1])
                        for r, t in zip(rows, parts)]).float()
    positions, deltas = qwen2vl.get_rope_index(ids, None, grid, video_temporal_ids=[torch.tensor(block.temporal_ids)])
    new = world["model"].generate(input_ids=ids, video_embeds=embeds, video_grid_thw=grid, position_ids=positions,
                                  rope_deltas=deltas, max_new_tokens=N_NEW)[0]
    return answer_text(world["model"], proc, new)


def test_a_long_plan_answers_like_a_direct_generate_over_its_tubes(world, tmp_path):
    assert world["index"].list("cam1")[0]["n_tokens"] == 36
    dec = _decoder(world, tmp_path, ask_token_budget=8, max_gap_seconds=30.0)   # 4 long tubes of 2 tokens
    result = dec.ask(QUESTION, ["cam1"], max_new_tokens=N_NEW)
    plan = result["plan"]
    assert plan["kind"] == "long" and plan["tubes"] == 4 and plan["resolutions"] == ["56x28"]
    assert plan["visual_tokens"] == 8 == result["timings"]["visual_tokens"] and result["narrowed"] is True
    rows = {r["segment_id"]: r for r in world["index"].list("cam1")}
    seen = {e["segment_id"]: e for e in result["evidence"]}
    assert all(e["tier"] == "long" for e in seen.values())
    tube_times = [ts for e in result["evidence"] for ts in e["tubes"]]
    assert tube_times[0] == 0.0 and tube_times[-1] == 105.0 and tube_times == sorted(tube_times)
    tubes = {sid: [rows[sid]["tube_ts"].index(ts) for ts in e["tubes"]] for sid, e in seen.items()}
    expected = _direct_answer(world, dec, [rows[sid] for sid in seen], tubes, QUESTION)
    assert result["answer"] == expected and len(expected) > 0
    # every tube fits: the whole window at the long resolution, positions 0, 1, 2, ... per run
    whole = _decoder(world, tmp_path, ask_token_budget=40).ask(QUESTION, ["cam1"], max_new_tokens=2)
    assert whole["plan"]["kind"] == "long" and whole["plan"]["tubes"] == 12 and whole["narrowed"] is False


def test_concurrent_asks_over_different_plans_equal_sequential(world, tmp_path):
    dec = _decoder(world, tmp_path, ask_token_budget=8, long_max_stride_seconds=1000.0)
    asks = [(["cam1"], None, None), (["cam1"], 0.0, 6.0), (["cam2"], None, None), (["cam1", "cam2"], None, None)]
    sequential = [dec.ask(QUESTION, s, start=a, end=b, max_new_tokens=N_NEW) for s, a, b in asks]
    assert {r["plan"]["kind"] for r in sequential} == {"long"}
    fresh = _decoder(world, tmp_path, ask_token_budget=8, long_max_stride_seconds=1000.0)
    out = [None] * len(asks)

    def run(i):
        s, a, b = asks[i]
        out[i] = fresh.ask(QUESTION, s, start=a, end=b, max_new_tokens=N_NEW)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["answer"] for r in out] == [r["answer"] for r in sequential]
    assert [r["evidence"] for r in out] == [r["evidence"] for r in sequential]
    # the same segments at the full resolution are another prefix: the tier is part of the cache key
    full = fresh.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=N_NEW)
    assert full["plan"]["kind"] == "full" or full["plan"]["tier"] == "long"
    roomy = _decoder(world, tmp_path, ask_token_budget=200)
    assert roomy.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=2)["plan"]["kind"] == "full"


def test_a_window_too_long_to_sample_is_answered_from_retrieval_with_captions_of_the_rest(world, tmp_path):
    import numpy as np

    from pipeline.captions import Caption, CaptionStore
    from pipeline.retrieval import RetrievalIndex

    index_root = world["index"].root
    rows = world["index"].list("cam1")
    dim = world["model"].model.embed_tokens.weight.shape[1]            # query vectors are hidden states
    captions = [Caption(segment_id=r["segment_id"], source_id="cam1", t0=r["t0"], t1=r["t1"],
                        caption="a square moves right" if r["t0"] < 50 else "the square is gone",
                        vector=np.ones(dim, np.float32) / np.sqrt(dim), model_id=world["mid"],
                        visual=np.ones(dim, np.float32) / np.sqrt(dim)) for r in rows]
    CaptionStore(world["index"]).add(captions)                   # the truth, and the retrieval table built from it
    retrieval = RetrievalIndex(index_root, dim=dim, create=True)
    retrieval.upsert(c.to_row(0.0) for c in captions)
    # a long tier at 9408 px (8 tokens per tube) was never written: nothing to sample, so retrieval plans
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"], long_pixels=3 * LONG_PIXELS,
                      index_dir=index_root, ask_token_budget=72)
    dec = Decoder(s, world["ckpt"], index=world["index"])
    result = dec.ask(QUESTION, ["cam1"], max_new_tokens=2)
    plan = result["plan"]
    assert plan["kind"] == "retrieval" and plan["tier"] == "full" and plan["segments"] == 2
    assert len(result["evidence"]) == 2 and all(e["tier"] == "full" and "tubes" not in e for e in result["evidence"])
    assert result["narrowed"] is True and 1 <= plan["caption_lines"] <= 2
    # the prompt holds the captions of the four segments it did not show, as timestamped lines
    seen = {e["segment_id"] for e in result["evidence"]}
    captions = retrieval.captions(["cam1"])
    notes = caption_lines(rows, captions, seen, 256, format_span)
    assert len(notes) == plan["caption_lines"] and all(n.startswith("[cam1 0:0") for n in notes)
    prompts = [key[0] for key in dec.prompt_memo._entries if "Captions of footage not shown" in key[0]]
    assert len(prompts) == 1 and all(n in prompts[0] for n in notes)
    # a summary's period shows its footage and reads its captions too: every caption of the window, as lines
    period = dec.ask(QUESTION, ["cam1"], start=0.0, end=4.0, max_new_tokens=2, with_captions=True, record=False)
    assert period["plan"]["kind"] == "full" and period["plan"]["caption_lines"] == 1
    own = [key[0] for key in dec.prompt_memo._entries if "Captions of this footage" in key[0]]
    assert len(own) == 1 and "[cam1 0:00:00-0:00:04] a square moves right" in own[0]
