"""Uploaded images (deploy/images.py, deploy/image_search.py): the tower's image path against transformers 4.57.6,
asks with images against direct qwen2vl generate calls, the tower once per repeated image, search by image, and the
checks on bytes and pixels."""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import qwen2vl
from deploy.decoder import Decoder
from deploy.images import ImageEncoder, ImageTooLarge, decode_image, image_bytes
from pipeline.checkpoints import model_id
from pipeline.index import SegmentIndex
from pipeline.settings import load_settings
from tests.reference import answer_text, answering_checkpoint, build_reference_model, load_reference, save_reference
from tests.test_footage import clip_frames, index_frames

pytestmark = pytest.mark.timeout(120)
QUESTION = "What colour is this?"
N_NEW = 10


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A gradient with noise: resizing has real work to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(yy * 7 + xx * 3) % 256, (xx * 5) % 256, (yy * 11) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


@torch.no_grad()
def test_image_tokens_equal_the_reference_image_path(tmp_path):
    """Bytes -> Pillow -> smart_resize/normalise/patches -> tower -> merger equals the reference processor and
    get_image_features, at the checkpoint's image bounds (max_pixels set low to force a downscale)."""
    from transformers import Qwen2VLImageProcessor

    save_reference(build_reference_model(seed=3), tmp_path)
    qwen2vl.processor.write_preprocessor_config(tmp_path, max_pixels=40 * 28 * 28)
    qwen2vl.tokenizer.write_tiny_tokenizer(tmp_path)
    pixels = picture(150, 97)
    encoder = ImageEncoder(qwen2vl.load_pretrained(tmp_path), qwen2vl.Processor.from_pretrained(tmp_path),
                           threading.Lock(), max_pixels=10**6)
    ours = encoder.tokens(png(pixels))

    inputs = Qwen2VLImageProcessor.from_pretrained(tmp_path)(images=[pixels], return_tensors="pt")
    want = torch.cat(list(load_reference(tmp_path).get_image_features(inputs["pixel_values"],
                                                                      inputs["image_grid_thw"])))
    assert ours.grid_thw == tuple(inputs["image_grid_thw"][0].tolist())
    assert ours.grid_thw[1] * ours.grid_thw[2] * 14 * 14 <= 40 * 28 * 28 * 4 and ours.grid_thw[1] % 2 == 0
    assert ours.tokens.shape == want.shape
    assert float((ours.tokens - want).abs().max()) <= 1e-5


def test_bytes_and_pixels_are_checked():
    data = png(picture(30, 40))
    encoded = base64.b64encode(data).decode()
    assert image_bytes(encoded, 10_000) == data == image_bytes("data:image/png;base64," + encoded, 10_000)
    with pytest.raises(ImageTooLarge, match="api_max_image_bytes"):
        image_bytes(encoded, 1024)
    with pytest.raises(ValueError, match="not base64"):
        image_bytes("%%%", 10_000)
    with pytest.raises(ValueError, match="data:image/<type>;base64"):
        image_bytes("data:text/plain;base64," + encoded, 10_000)
    with pytest.raises(ValueError, match="not an image"):
        decode_image(b"GIF89a but not really" * 4, 10**6)
    with pytest.raises(ImageTooLarge, match="40x30 pixels, over 1000"):
        decode_image(data, 1000)


# ---- the decoder -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    ckpt = answering_checkpoint(root / "tiny")
    model = qwen2vl.load_pretrained(ckpt)
    mid = model_id(ckpt)
    index = SegmentIndex(root / "index")
    colours = {}
    for n, source in enumerate(("red", "green", "blue")):
        frames = clip_frames(root, source, 96, 64, seconds=2.0, pattern="solid", seed=n)
        index_frames(index, model, mid, source, frames)
        colours[source] = frames
    decoder = Decoder(load_settings(data_dir=root / "data", model_path=ckpt), ckpt, index=index)
    return {"ckpt": ckpt, "model": model, "index": index, "colours": colours, "decoder": decoder,
            "processor": qwen2vl.Processor.from_pretrained(ckpt)}


@torch.no_grad()
def _direct(world, pixels: np.ndarray, segment_ids: list[str] = (), label: str | None = None) -> str:
    """The answer of qwen2vl.generate over a prompt written out here: the image, then the footage, then the
    question."""
    proc, model, index = world["processor"], world["model"], world["index"]
    content = [{"type": "image"}]
    if segment_ids:
        content += [{"type": "text", "text": label}, {"type": "video"}]
    content.append({"type": "text", "text": "\n" + QUESTION})
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    rows, image_grid = proc.preprocess_image(pixels)
    inputs = {"pixel_values": rows, "image_grid_thw": torch.tensor([image_grid])}
    video_grid = None
    if segment_ids:
        stored = [index.get(s) for s in segment_ids]
        video_grid = torch.tensor([(sum(r.grid_thw[0] for r in stored), *stored[0].grid_thw[1:])])
        inputs.update(video_grid_thw=video_grid,
                      video_embeds=torch.cat([index.tokens(s) for s in segment_ids]).float())
    inputs["input_ids"] = proc.encode_with_grids(text, image_grid_thw=inputs["image_grid_thw"],
                                                 video_grid_thw=video_grid)["input_ids"]
    return answer_text(model, proc, model.generate(**inputs, max_new_tokens=N_NEW)[0])


def test_ask_about_an_image_answers_like_generate_and_runs_the_tower_once(world):
    decoder = world["decoder"]
    pixels = picture(70, 110, seed=4)
    runs = decoder.images.tower_runs
    first = decoder.ask(QUESTION, [], images=[png(pixels)], max_new_tokens=N_NEW)
    assert first["answer"] == _direct(world, pixels)
    assert first["plan"]["kind"] == "none" and first["evidence"] == []
    _, (_, h, w) = world["processor"].preprocess_image(pixels)
    assert first["timings"]["visual_tokens"] == h * w // 4
    again = decoder.ask(QUESTION, [], images=[png(pixels)], max_new_tokens=N_NEW)
    assert again["answer"] == first["answer"] and again["timings"]["prefix_cache"] == "hit"
    assert decoder.images.tower_runs == runs + 1                     # the second ask read the cached tokens

    # an image and footage: the image first, then the footage's block, then the question
    segment = world["index"].list("green")[0]
    both = decoder.ask(QUESTION, ["green"], images=[png(pixels)], max_new_tokens=N_NEW)
    label = "[source green, 0:00:00-0:00:02]"
    assert both["answer"] == _direct(world, pixels, [segment["segment_id"]], label)
    assert [e["segment_id"] for e in both["evidence"]] == [segment["segment_id"]]
    assert decoder.images.tower_runs == runs + 1

    with pytest.raises(ValueError, match="not an image"):
        decoder.ask(QUESTION, [], images=[b"\x89PNG\r\n\x1a\n broken"])
    with pytest.raises(ValueError, match="api_max_images"):
        decoder.ask(QUESTION, [], images=[png(pixels)] * 5)


def test_search_by_image_ranks_the_footage_it_shows_first(world):
    decoder = world["decoder"]
    _, frame = world["colours"]["green"][1]                 # a frame of the green scene, as a PNG upload
    found = decoder.search_window(None, ["red", "green", "blue"], image=png(np.asarray(frame)), limit=3)
    assert [r["source"] for r in found["results"]][0] == "green"
    assert found["coverage"] == {"segments": 3, "captioned": 0, "retrieval": False, "compared": 3, "sampled": False,
                                 "by": "image"}
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99

    # a long window is compared on an even sample, and the coverage says so
    decoder.image_ranker.max_segments = 2
    try:
        sampled = decoder.search_window(None, ["red", "green", "blue"], image=png(np.asarray(frame)))
    finally:
        decoder.image_ranker.max_segments = decoder.settings.search_image_segments
    assert sampled["coverage"] == {"segments": 3, "captioned": 0, "retrieval": False, "compared": 2, "sampled": True,
                                   "by": "image"}

    # with a query too: the image's candidates reranked by the query's yes/no score
    both = decoder.search_window("a green wall", ["red", "green", "blue"], image=png(np.asarray(frame)))
    assert both["coverage"]["reranked"] == 3 and len(both["results"]) == 3


# ---- search by image through the retrieval index -------------------------------------------------------------------
YARD, GREEN_AT = 12, 9             # 12 segments of red and blue, green at 9: not in an even sample of 4 (0, 4, 7, 11)


@pytest.fixture(scope="module")
def yard(world, tmp_path_factory):
    """A source of 12 segments (tokens of the solid scenes, copied), the first 11 captioned by the caption path
    (each row with its pooled visual vector), searched by a decoder that compares at most 4 segments a window."""
    from pipeline.captioner import Captioner
    from pipeline.captioning import CaptionWriter, describe_rows, open_retrieval
    from pipeline.captions import CaptionStore
    from pipeline.records import IndexedSegment

    root = tmp_path_factory.mktemp("yard")
    index = SegmentIndex(root / "index")
    scenes = {c: world["index"].get(world["index"].list(c)[0]["segment_id"]) for c in ("red", "green", "blue")}
    for k in range(YARD):
        scene = scenes["green" if k == GREEN_AT else ("red", "blue")[k % 2]]
        index.add([IndexedSegment(segment_id="", source_id="yard", t0=2.0 * k, t1=2.0 * k + 2.0,
                                  grid_thw=scene.grid_thw, tube_ts=[2.0 * k + ts for ts in scene.tube_ts],
                                  tokens=scene.tokens, model_id=scene.model_id)])
    captioner = Captioner(world["ckpt"], device="cpu", max_new_tokens=2)
    store = CaptionStore(index)
    retrieval = open_retrieval(store, root / "index", captioner.model_id, captioner.hidden_size)
    CaptionWriter(store, retrieval).write(describe_rows(index, captioner, index.list("yard")[:YARD - 1]))
    settings = load_settings(data_dir=root / "data", index_dir=str(root / "index"), model_path=world["ckpt"],
                             search_image_segments=4, search_candidates=4)
    return {"root": root, "index": index, "store": store, "captioner": captioner,
            "decoder": Decoder(settings, world["ckpt"], index=index),
            "green": png(np.asarray(world["colours"]["green"][1][1])),
            "green_id": index.list("yard")[GREEN_AT]["segment_id"]}


def test_search_by_image_considers_every_captioned_segment_through_retrieval(yard):
    decoder = yard["decoder"]
    found = decoder.search_window(None, ["yard"], image=yard["green"], limit=YARD)
    assert found["coverage"] == {"segments": YARD, "captioned": YARD - 1, "retrieval": True,
                                 "compared": 4 + 1, "sampled": False, "by": "image"}   # 4 nearest + 1 pending
    assert found["results"][0]["segment_id"] == yard["green_id"] and found["results"][0]["score"] > 0.99
    assert found["results"][0]["caption"] is not None

    # the exact path compares the same pooled vectors: over every segment the same order and scores; over an even
    # sample of 4 the green segment is never seen
    ranker = decoder.image_ranker
    ranker.retrieval, ranker.max_segments = None, YARD
    try:
        exact = decoder.search_window(None, ["yard"], image=yard["green"], limit=YARD)
        ranker.max_segments = 4
        sampled = decoder.search_window(None, ["yard"], image=yard["green"], limit=YARD)
    finally:
        ranker.retrieval, ranker.max_segments = decoder.retrieval, decoder.settings.search_image_segments
    assert exact["coverage"] == {"segments": YARD, "captioned": YARD - 1, "retrieval": False, "compared": YARD,
                                 "sampled": False, "by": "image"}
    assert exact["results"][0]["segment_id"] == yard["green_id"]
    scores = {r["segment_id"]: r["score"] for r in exact["results"]}
    for r in found["results"]:
        assert r["score"] == pytest.approx(scores[r["segment_id"]], abs=1e-5)
    assert sampled["coverage"]["sampled"] is True
    assert yard["green_id"] not in {r["segment_id"] for r in sampled["results"]}


def test_a_retrieval_table_without_pooled_vectors_still_answers_and_is_rebuilt_with_them(yard, tmp_path):
    """A table and caption files written before pooled vectors were kept: search by image takes the exact path
    until the caption service opens the table, which rebuilds it with vectors filled from the stored tokens."""
    import os
    import shutil

    import lancedb
    import pyarrow as pa

    from pipeline.captioning import open_retrieval
    from pipeline.captions import CaptionStore, pooled_visual
    from pipeline.retrieval import RetrievalIndex
    from pipeline.retrieval_rows import table_schema

    shutil.copytree(yard["root"] / "index", tmp_path / "index")
    index, dim = SegmentIndex(tmp_path / "index"), yard["captioner"].hidden_size
    store = CaptionStore(index)
    old = []
    for c in store.read("yard"):                      # caption files without the visual column's values
        c.visual = None
        old.append(c)
    for f in (tmp_path / "index").rglob("cap-*.parquet"):
        os.remove(f)
    store.add(old)
    shutil.rmtree(tmp_path / "index" / "_retrieval")
    schema = pa.schema([f for f in table_schema(dim) if f.name != "visual"])
    lancedb.connect(str(tmp_path / "index" / "_retrieval")).create_table(
        "segments", data=pa.Table.from_pylist([c.to_row(0.0) for c in old], schema=schema), schema=schema)
    assert not RetrievalIndex(tmp_path / "index").has_visual()

    settings = load_settings(data_dir=tmp_path / "data", index_dir=str(tmp_path / "index"),
                             model_path=yard["decoder"].model_path, search_image_segments=4, search_candidates=4)
    decoder = Decoder(settings, yard["decoder"].model_path, index=index)
    before = decoder.search_window(None, ["yard"], image=yard["green"])
    assert before["coverage"] == {"segments": YARD, "captioned": YARD - 1, "retrieval": False, "compared": 4,
                                  "sampled": True, "by": "image"}
    assert decoder.search_window("a green wall", ["yard"], limit=3)["coverage"]["retrieval"] is True   # text too

    migrated = open_retrieval(store, tmp_path / "index", yard["captioner"].model_id, dim)
    assert migrated.has_visual() and migrated.count() == YARD - 1
    hit = migrated.nearest_visual(pooled_visual(index.tokens(yard["green_id"])), sources=["yard"], limit=1)[0]
    assert hit["segment_id"] == yard["green_id"]
    assert np.allclose(hit["visual"], pooled_visual(index.tokens(yard["green_id"])), atol=1e-6)
    after = decoder.search_window(None, ["yard"], image=yard["green"])
    assert after["coverage"]["retrieval"] is True and after["results"][0]["segment_id"] == yard["green_id"]
