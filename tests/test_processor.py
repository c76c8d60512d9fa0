"""Processor against transformers 4.57.6 (slow PIL Qwen2VLImageProcessor) and the facts of docs/model.md §2-4."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref_smart_resize

from qwen2vl.processor import (Processor, normalize, patchify, resize_frames, smart_resize, video_frame_indices,
                               video_frame_size, video_max_pixels, write_preprocessor_config)
from qwen2vl.tokenizer import write_tiny_tokenizer

SMALL_MAX_PIXELS = 512 * 28 * 28   # a second checkpoint folder whose max_pixels forces the downscale branch


class FramesVideoProcessor(Qwen2VLImageProcessor):
    """The reference image processor's per-frame video path; stands in for the torchvision-only video processor."""

    def __call__(self, images=None, videos=None, **kwargs):
        return self.preprocess(images=None, videos=videos, return_tensors=kwargs.get("return_tensors"))


class ReferenceProcessor(Qwen2VLProcessor):
    video_processor_class = "Qwen2VLImageProcessor"


def _folders(tmp_path_factory, **overrides):
    folder = tmp_path_factory.mktemp("ckpt")
    write_tiny_tokenizer(folder)
    write_preprocessor_config(folder, **overrides)
    return folder


def _reference(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ReferenceProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
                              video_processor=FramesVideoProcessor.from_pretrained(folder),
                              chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    return _folders(tmp_path_factory)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return _folders(tmp_path_factory, max_pixels=SMALL_MAX_PIXELS)


def _image(height, width, seed=0):
    # Smooth gradient + noise so bicubic resampling has real work to do.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(yy * 7 + xx * 3) % 256, (xx * 5) % 256, (yy * 11) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


def _assert_same(ours, ref):
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    for key in ref:
        assert ours[key].dtype == ref[key].dtype, key
        assert torch.equal(ours[key], ref[key]), key


# ---- smart_resize (docs/model.md §2) ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, resized, tokens", [
    ((1080, 1920), (1092, 1932), 2691),
    ((224, 224), (224, 224), 64),
    ((448, 448), (448, 448), 256),
    ((3000, 4000), (2996, 4004), 15301),
    ((720, 1280), (728, 1288), 1196),
    ((70, 70), (56, 56), 4),          # round half-to-even: 70/28 = 2.5 -> 2
])
def test_smart_resize_spec_examples(size, resized, tokens):
    h, w = smart_resize(*size)
    assert (h, w) == resized
    assert (h // 14) * (w // 14) // 4 == tokens


def test_smart_resize_matches_reference_on_many_sizes():
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(28, 4000, size=(2000, 2))]
    sizes += [(28, 28), (28, 5600), (5600, 28), (29, 5000), (33, 57), (500, 37), (10000, 10000)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((3136, 12845056), (100352, 105369), (3136, SMALL_MAX_PIXELS)):
            assert smart_resize(h, w, 28, lo, hi) == ref_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least 28"):
        smart_resize(27, 500)
    with pytest.raises(ValueError, match="at least 28"):
        smart_resize(500, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 5601)
    assert smart_resize(28, 5600) == (28, 5600)      # exactly 200 is allowed


# ---- video sampling plan and budget (docs/model.md §3, §4) -------------------------------------------------------

def test_video_frame_indices_spec_examples():
    # 10 s at 30 fps -> 20 frames at 2 fps, first and last frame included.
    ten_s = video_frame_indices(300, 30.0)
    assert len(ten_s) == 20 and ten_s[0] == 0 and ten_s[-1] == 299
    assert ten_s == [round(i * 299 / 19) for i in range(20)]
    # 1 s at 30 fps: 2 wanted, raised to the 4-frame minimum.
    assert video_frame_indices(30, 30.0) == [0, 10, 19, 29]
    # 5 frames: the minimum is capped by what exists (floor to even -> 4); linspace 0,1.33,2.67,4.
    assert video_frame_indices(5, 30.0) == [0, 1, 3, 4]
    # One hour at 30 fps hits the 768-frame cap.
    hour = video_frame_indices(108000, 30.0)
    assert len(hour) == 768 and hour[0] == 0 and hour[-1] == 107999
    # 7 s at 25 fps: 14 frames; a different target fps scales the count.
    assert len(video_frame_indices(175, 25.0)) == 14
    assert len(video_frame_indices(175, 25.0, fps=1.0)) == 8     # 7 -> round to even (half-to-even) = 8
    # Non-integer source rate: 29.97 fps, 61 frames -> 4.07 -> 4.
    assert video_frame_indices(61, 29.97) == [0, 20, 40, 60]


def test_video_frame_indices_rejects_bad_input():
    with pytest.raises(ValueError, match="between 2 and 1"):
        video_frame_indices(1, 30.0)
    with pytest.raises(ValueError, match="video_fps > 0"):
        video_frame_indices(100, 0.0)


def test_video_pixel_budget_spec_examples():
    assert video_max_pixels(20) == 602112                 # capped by VIDEO_MAX_PIXELS
    assert video_max_pixels(768) == 105369                # floor int(1.05 * VIDEO_MIN_PIXELS)
    assert video_max_pixels(200) == 19267584 / 200 * 2
    h, w = video_frame_size(720, 1280, 20)
    assert (h, w) == (560, 1008)
    assert 10 * (h // 14) * (w // 14) // 4 == 7200       # 20 frames -> grid (10, 40, 72)
    assert video_frame_size(720, 1280, 768) == (224, 420)


# ---- pixel ops --------------------------------------------------------------------------------------------------

def test_patchify_row_order_follows_spec():
    # Every pixel value names its own (frame, channel, y, x), so each row entry is checked against docs/model.md §2.
    n_frames, height, width = 3, 56, 84
    f, c, y, x = np.meshgrid(np.arange(n_frames), np.arange(3), np.arange(height), np.arange(width), indexing="ij")
    frames = torch.from_numpy((((f * 3 + c) * height + y) * width + x).astype(np.float64))
    rows, grid = patchify(frames)
    assert grid == (2, 4, 6) and rows.shape == (2 * 4 * 6, 1176)
    gt, gh, gw = grid
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        r = ((t * (gh // 2) + bh) * (gw // 2) + bw) * 4 + mh * 2 + mw
                        row = rows[r].reshape(3, 2, 14, 14)      # (c, tp, py, px)
                        for tp in range(2):
                            frame = min(t * 2 + tp, n_frames - 1)    # odd count: last frame repeated
                            y0, x0 = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                            expected = frames[frame, :, y0:y0 + 14, x0:x0 + 14]
                            assert torch.equal(row[:, tp], expected), (t, bh, bw, mh, mw, tp)


def test_patchify_rejects_unaligned_frames():
    with pytest.raises(ValueError, match="multiples of 28"):
        patchify(torch.zeros(2, 3, 56, 70))


def test_normalize_and_resize():
    frames = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    frames[1] = 255
    out = normalize(frames)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out[1, 0], torch.full((28, 28), (1 - 0.48145466) / 0.26862954))
    assert torch.allclose(out[0, 2], torch.full((28, 28), -0.40821073 / 0.27577711))
    assert torch.equal(normalize(torch.from_numpy(frames)), out)
    resized = resize_frames(torch.from_numpy(_image(50, 60)[None]), 28, 56)
    assert isinstance(resized, torch.Tensor) and resized.shape == (1, 28, 56, 3) and resized.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"uint8 \[F, H, W, 3\]"):
        resize_frames(np.zeros((1, 28, 28, 3), dtype=np.float32), 28, 28)


# ---- the processor against the reference processor --------------------------------------------------------------

IMAGE_CASES = {
    "odd_33x57": ("default", [(33, 57)], ["<|vision_start|><|image_pad|><|vision_end|>What is this?"]),
    "tall_500x37": ("default", [(500, 37)], ["Look: <|image_pad|>"]),
    "square_224": ("default", [(224, 224)], ["<|image_pad|>"]),
    "near_ratio_limit_29x5000": ("default", [(29, 5000)], ["wide <|image_pad|> strip"]),
    "1080p_downscaled": ("small", [(1080, 1920)], ["<|vision_start|><|image_pad|><|vision_end|>Describe."]),
    "three_in_one_prompt": ("default", [(33, 57), (60, 45), (90, 200)],
                            ["A <|image_pad|> then <|image_pad|> and <|image_pad|>."]),
    "batch_left_padding": ("small", [(64, 64), (300, 500), (1080, 1920)],
                           ["short <|image_pad|>", "a longer prompt <|image_pad|> with two <|image_pad|> images"]),
}


@pytest.fixture(scope="module")
def processors(default_dir, small_dir):
    return {"default": (Processor.from_pretrained(default_dir), _reference(default_dir)),
            "small": (Processor.from_pretrained(small_dir), _reference(small_dir))}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_images_match_reference(processors, name):
    folder, sizes, text = IMAGE_CASES[name]
    ours, ref = processors[folder]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    expected = ref(text=text, images=images, padding=True, return_tensors="pt")
    got = ours(text=text, images=images)
    _assert_same(got, expected)
    if len(text) > 1:   # the batch really was left-padded
        assert (got["attention_mask"][0] == 0).any() and got["attention_mask"][0, -1] == 1
        assert (got["input_ids"][0][got["attention_mask"][0] == 0] == 151643).all()


def test_pil_images_match_reference(processors):
    ours, ref = processors["default"]
    rgba = Image.fromarray(_image(45, 70)).convert("RGBA")
    gray = Image.fromarray(_image(80, 40)[..., 0])
    text = ["<|image_pad|><|image_pad|>"]
    _assert_same(ours(text=text, images=[rgba, gray]), ref(text=text, images=[rgba, gray], return_tensors="pt"))


def test_video_with_odd_frame_count_matches_reference(processors):
    ours, ref = processors["default"]
    video = np.stack([_image(90, 160, seed=s) for s in range(5)])          # 5 frames -> padded to 6
    image = _image(40, 30, seed=9)
    text = ["<|vision_start|><|video_pad|><|vision_end|> then <|image_pad|>", "only text here"]
    expected = ref(text=text, images=[image], videos=[video], padding=True, return_tensors="pt")
    got = ours(text=text, images=[image], videos=torch.from_numpy(video))
    _assert_same(got, expected)
    assert got["video_grid_thw"].tolist() == [[3, 6, 12]]
    assert (got["input_ids"] == 151656).sum() == 3 * 6 * 12 // 4


def test_chat_template_matches_reference_processor(processors):
    ours, ref = processors["default"]
    for messages in (
        [{"role": "user", "content": "Just text."}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe this video."}]}],
    ):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == expected
        assert ours.apply_chat_template(messages, tokenize=True) == ref.tokenizer(expected)["input_ids"]
    assert ours.apply_chat_template([messages, messages]) == [expected, expected]


def test_encode_with_grids_equals_pixel_path(processors):
    ours, _ = processors["default"]
    text = ["a <|image_pad|> b <|video_pad|>", "c"]
    video = np.stack([_image(56, 84, seed=s) for s in range(4)])
    full = ours(text=text, images=[_image(70, 70)], videos=[video])
    ids_only = ours.encode_with_grids(text, full["image_grid_thw"], full["video_grid_thw"])
    assert torch.equal(ids_only["input_ids"], full["input_ids"])
    assert torch.equal(ids_only["attention_mask"], full["attention_mask"])
    assert ours.batch_decode(full["input_ids"][1:], skip_special_tokens=True) == ["c"]


def test_token_ids_come_from_checkpoint_files(tmp_path_factory):
    folder = _folders(tmp_path_factory)
    # A config.json that names another image token id must change what the processor expands.
    (folder / "config.json").write_text(json.dumps({"image_token_id": 151654, "video_token_id": 151656}))
    processor = Processor.from_pretrained(folder)
    assert processor.image_token == "<|vision_pad|>"
    out = processor(text="x <|vision_pad|>", images=[_image(56, 56)])
    assert (out["input_ids"] == 151654).sum() == 4


def test_video_budget_from_video_preprocessor_config(tmp_path_factory):
    folder = _folders(tmp_path_factory)
    budget = 128 * 28 * 28
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": budget}))
    video = np.stack([_image(360, 640, seed=s) for s in range(2)])
    rows, grid = Processor.from_pretrained(folder).preprocess_video(video)
    ref = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=budget)(images=None, videos=[video], return_tensors="pt")
    assert grid == tuple(ref["video_grid_thw"][0].tolist()) == (1, 16, 30)       # smart_resize -> 224x420
    assert torch.equal(rows, ref["pixel_values_videos"])
    # Images keep the image bounds of preprocessor_config.json.
    assert Processor.from_pretrained(folder).preprocess_image(video[0])[1] == (1, 26, 46)


def test_write_preprocessor_config_loads_in_reference(default_dir, small_dir):
    for folder, max_pixels in ((default_dir, 12845056), (small_dir, SMALL_MAX_PIXELS)):
        ref = Qwen2VLImageProcessor.from_pretrained(folder)
        assert (ref.min_pixels, ref.max_pixels) == (3136, max_pixels)
        assert (ref.patch_size, ref.temporal_patch_size, ref.merge_size) == (14, 2, 2)
        assert ref.image_mean == [0.48145466, 0.4578275, 0.40821073]
        assert ref.image_std == [0.26862954, 0.26130258, 0.27577711]
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        assert saved["image_processor_type"] == "Qwen2VLImageProcessor"
        assert saved["processor_class"] == "Qwen2VLProcessor"
    with pytest.raises(ValueError, match="unknown preprocessor_config keys"):
        write_preprocessor_config(default_dir, max_pixel=5)


def test_bad_input_raises(processors, tmp_path):
    ours, _ = processors["default"]
    with pytest.raises(ValueError, match="at least 28"):
        ours(text="<|image_pad|>", images=[_image(20, 50)])
    with pytest.raises(ValueError, match="aspect ratio"):
        ours(text="<|image_pad|>", images=[_image(28, 5657)])
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        ours(text="<|image_pad|> and <|image_pad|>", images=[_image(56, 56)])
    with pytest.raises(ValueError, match=r"0 <\|image_pad\|> placeholder\(s\) but 1 image"):
        ours(text="no placeholder", images=[_image(56, 56)])
    with pytest.raises(ValueError, match=r"1 <\|video_pad\|> placeholder\(s\) but 0 video"):
        ours(text="<|video_pad|>")
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        ours(text="<|image_pad|>", images=[np.zeros((56, 56, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="each video must be"):
        ours(text="<|video_pad|>", videos=[np.zeros((56, 56, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="padding=True"):
        ours(text=["a", "a longer one"], padding=False)
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        Processor.from_pretrained(tmp_path)
