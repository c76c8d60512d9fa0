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
    assert found["coverage"] == {"segments": 3, "compared": 3, "sampled": False, "by": "image"}
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99

    # a long window is compared on an even sample, and the coverage says so
    decoder.image_ranker.max_segments = 2
    try:
        sampled = decoder.search_window(None, ["red", "green", "blue"], image=png(np.asarray(frame)))
    finally:
        decoder.image_ranker.max_segments = decoder.settings.search_image_segments
    assert sampled["coverage"] == {"segments": 3, "compared": 2, "sampled": True, "by": "image"}

    # with a query too: the image's candidates reranked by the query's yes/no score
    both = decoder.search_window("a green wall", ["red", "green", "blue"], image=png(np.asarray(frame)))
    assert both["coverage"]["reranked"] == 3 and len(both["results"]) == 3
