"""Boxes in answers (deploy/boxes.py, docs/architecture.md "Boxes"): a checkpoint set to answer with a box, asked
through Decoder.ask over a real index; and the placement rules on plan rows.

The boxing checkpoint: every layer's attention and MLP output projections are zero, so the last hidden state is the
normed embedding of the current token alone, and each output row is set to the normed embedding of the token
before it in a chosen answer: greedy decoding then walks that answer token by token (a bigram chain, so no token may
occur twice: the coordinate pairs are single tokens added to the tiny tokenizer).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2vl
from deploy.boxes import answer_boxes, cited_times, frame_size
from deploy.decoder import Decoder
from pipeline.checkpoints import model_id
from pipeline.events import ANSWERS_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.settings import load_settings
from pipeline.tubes import tubes_from_segment
from pipeline.video.segments import segment_frames
from qwen2vl.grounding import BOX_END, BOX_START, REF_END, REF_START, GroundedBox
from tests.test_footage import clip_frames

pytestmark = pytest.mark.timeout(120)
PIECES = ["At 0:03 ", REF_START, "a red car", REF_END, BOX_START, "(120,340)", ",(560,780)", BOX_END, " enters."]
ADDED_FIRST_ID = 1500                 # above the tiny BPE vocabulary, far below the special ids
SOURCE_W, SOURCE_H = 160, 90          # the clip's own size; the index holds it at 168x84 (multiples of 28)


def boxing_checkpoint(folder: Path, pieces: list[str]) -> Path:
    """A tiny checkpoint whose greedy answer to any prompt is "".join(pieces), then <|im_end|>."""
    path = qwen2vl.write_tiny_checkpoint(folder)
    spec = json.loads((path / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    ids = []
    for k, piece in enumerate(pieces):
        if piece not in specials:
            specials[piece] = ADDED_FIRST_ID + k
            spec["added_tokens"].append({"id": ADDED_FIRST_ID + k, "content": piece, "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": False, "special": False})
            spec["model"]["vocab"][piece] = ADDED_FIRST_ID + k
        ids.append(specials[piece])
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tokenizer = qwen2vl.Processor.from_pretrained(path).tokenizer
    last_prompt_id = tokenizer.encode("<|im_start|>assistant\n")[-1]
    chain = [last_prompt_id] + ids + [tokenizer.im_end_id]
    assert len(set(chain)) == len(chain), "a bigram chain needs every token once"

    weights = load_file(str(path / "model.safetensors"))
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    config = json.loads((path / "config.json").read_text())
    eps = config.get("rms_norm_eps", 1e-6)
    embed, norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
    head = torch.zeros_like(weights["lm_head.weight"])
    for before, after in zip(chain, chain[1:]):
        x = embed[before].double()
        h = x * torch.rsqrt(x.pow(2).mean() + eps) * norm.double()
        head[after] = (10.0 * h / h.norm()).to(head.dtype)
    weights["lm_head.weight"] = head
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    ckpt = boxing_checkpoint(root / "boxing", PIECES)
    model = qwen2vl.load_pretrained(ckpt)
    mid = model_id(ckpt)
    index = SegmentIndex(root / "index")
    frames = clip_frames(root, "street", SOURCE_W, SOURCE_H)                  # 0..6 s: segments at 0, 2, 4 s
    records = []
    for sized, source in ((True, "street"), (False, "old")):                  # "old": indexed before sizes
        for seg in segment_frames(source, frames, segment_seconds=2.0, fps=2.0,
                                  source_size=(SOURCE_W, SOURCE_H) if sized else None):
            tubes = tubes_from_segment(seg)
            with torch.no_grad():
                tokens = model.visual(torch.as_tensor(tubes.pixel_rows), torch.tensor([tubes.grid_thw])).half()
            records.append(IndexedSegment(segment_id=seg.segment_id, source_id=source, t0=seg.t0, t1=seg.t1,
                                          grid_thw=tubes.grid_thw, tube_ts=tubes.tube_ts, tokens=tokens,
                                          model_id=mid, source_size=tubes.source_size))
    index.add(records)
    return {"root": root, "ckpt": ckpt, "index": index}


def _decoder(world, tmp_path, events=None):
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"])
    return Decoder(s, world["ckpt"], index=world["index"], events=events)


def test_answer_carries_the_box_in_source_pixels_at_the_cited_tube(world, tmp_path, redis_server):
    events = EventSink(redis_server.url, outbox_dir=tmp_path / "outbox")
    dec = _decoder(world, tmp_path, events)
    pieces = []
    result = dec.ask("Where is the car?", ["street"], max_new_tokens=32, on_token=pieces.append)
    assert result["answer"] == "At 0:03 a red car enters."
    assert "".join(pieces) == result["answer"] and len(pieces) > 1 and not any("<|" in p for p in pieces)
    assert world["index"].list("street")[0]["source_size"] == [SOURCE_W, SOURCE_H]
    # 0..1000 of the 160x90 source; the cited 0:03 is the second tube of the segment starting at 2 s
    assert result["boxes"] == [{"label": "a red car", "x1": 19, "y1": 31, "x2": 90, "y2": 70, "t": 3.0,
                                "segment_id": "street:2000"}]
    [(_, entry)] = redis_server.client().xrange(ANSWERS_STREAM)
    stored = json.loads(entry[b"boxes"]) if b"boxes" in entry else json.loads(entry[b"data"])["boxes"]
    assert stored == result["boxes"]


def test_footage_indexed_without_its_source_size_scales_to_the_indexed_frame(world, tmp_path):
    result = _decoder(world, tmp_path).ask("Where is the car?", ["old"], start=4.0, end=6.0, max_new_tokens=32)
    [row] = world["index"].list("old", 4.0, 6.0)
    assert row["source_size"] is None and frame_size(row) == (168, 84)
    # 0:03 is not shown (only 4..6 s): the box belongs to the first tube of the one segment shown
    assert result["boxes"] == [{"label": "a red car", "x1": 20, "y1": 29, "x2": 94, "y2": 66, "t": 4.0,
                                "segment_id": "old:4000"}]


def _row(source, t0, tubes, size=None, grid=(2, 6, 12)):
    return {"source_id": source, "segment_id": f"{source}:{round(t0 * 1000)}", "t0": t0, "t1": t0 + len(tubes),
            "tube_ts": tubes, "grid_thw": grid, "source_size": size}


def test_cited_times_take_a_range_by_its_start():
    assert [spec for _, spec in cited_times("from 0:00:08-0:00:14 then 12:05 and 2026-11-26 12:00:08")] == [
        (None, 0, 0, 8), (None, 12, 5, None), ((2026, 11, 26), 12, 0, 8)]
    assert cited_times("no times, 3.14:15 or 1:2") == []


def test_a_box_after_a_wall_clock_time_goes_to_the_tube_of_that_moment():
    base = 1_764_158_400.0                                  # 2025-11-26 12:00:00 UTC
    rows = [_row("door", base, [base, base + 1], (1920, 1080)), _row("yard", base + 2, [base + 2, base + 3])]
    text = "The door opens at 12:00:03 and closes."
    boxes = [GroundedBox("door", 0, 0, 500, 1000, offset=len("The door")),
             GroundedBox(None, 0, 0, 1000, 1000, offset=len(text))]
    out = answer_boxes(boxes, text, rows, tube_seconds=1.0)
    assert out[0] == {"label": "door", "x1": 0, "y1": 0, "x2": 960, "y2": 1080, "t": base, "segment_id": "door:"
                      + str(round(base * 1000))}                  # nothing cited before it: the first tube
    assert out[1]["segment_id"] == "yard:" + str(round((base + 2) * 1000)) and out[1]["t"] == base + 3
    assert (out[1]["x2"], out[1]["y2"]) == (168, 84)              # no source size: the indexed frame


def test_a_cited_time_no_tube_covers_falls_back_to_the_first_tube():
    rows = [_row("cam", 0.0, [0.0, 1.0]), _row("cam", 2.0, [2.0, 3.0])]
    [box] = answer_boxes([GroundedBox("x", 0, 0, 1, 1, offset=20)], "Later, at 0:09 a cat", rows, 1.0)
    assert (box["t"], box["segment_id"]) == (0.0, "cam:0")
    assert answer_boxes([], "text", rows, 1.0) == []
