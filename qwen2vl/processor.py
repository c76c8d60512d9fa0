"""Qwen2-VL preprocessing: resize, normalize, patch rows, frame sampling plan, placeholder expansion.

Pure functions first (docs/model.md §2-4), then `Processor`, which matches transformers' Qwen2VLProcessor
with the slow PIL image processor. Images go the unified path: a single frame padded to a tube of two identical
frames. Videos arrive as already-sampled uint8 frames (decoding lives in pipeline/, never here).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen2vl.chat import render_chat
from qwen2vl.geometry import (FPS_MAX_FRAMES, FPS_MIN_FRAMES, FRAME_FACTOR, IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS,
                              VIDEO_FPS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VIDEO_TOTAL_PIXELS, smart_resize)
from qwen2vl.tokenizer import Tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- sizes -------------------------------------------------------------------------------------------------------

def video_frame_indices(total_frames: int, video_fps: float, fps: float = VIDEO_FPS,
                        min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES) -> list[int]:
    """Which frames of a video to keep: qwen-vl-utils smart_nframes + rounded linspace (first and last kept)."""
    if total_frames < 1 or video_fps <= 0 or fps <= 0:
        raise ValueError(f"need total_frames >= 1, video_fps > 0 and fps > 0; got {total_frames}, {video_fps}, {fps}")
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    wanted = min(max(total_frames / video_fps * fps, lo), hi)
    n_frames = round(wanted / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n_frames <= total_frames:
        raise ValueError(f"a video of {total_frames} frames gives {n_frames} samples; "
                         f"need between {FRAME_FACTOR} and {total_frames}")
    # torch float32 linspace + half-to-even round, exactly as qwen-vl-utils computes it.
    return torch.linspace(0, total_frames - 1, n_frames).round().long().tolist()


def video_max_pixels(n_frames: int, total_pixels: float = VIDEO_TOTAL_PIXELS, min_pixels: int = VIDEO_MIN_PIXELS,
                     max_pixels: int = VIDEO_MAX_PIXELS) -> float:
    """Per-frame pixel budget of a video of n_frames (qwen-vl-utils): share total_pixels, floor 1.05*min_pixels."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    return max(min(max_pixels, total_pixels / n_frames * FRAME_FACTOR), int(min_pixels * 1.05))


def video_frame_size(height: int, width: int, n_frames: int, factor: int = 28,
                     total_pixels: float = VIDEO_TOTAL_PIXELS) -> tuple[int, int]:
    """Resized (h, w) of each frame of an n_frames video under the qwen-vl-utils budget."""
    budget = video_max_pixels(n_frames, total_pixels)
    return smart_resize(height, width, factor, VIDEO_MIN_PIXELS, budget)


# ---- pixels ------------------------------------------------------------------------------------------------------

def resize_frames(frames, height: int, width: int):
    """uint8 [F, H, W, 3] -> uint8 [F, height, width, 3] with PIL bicubic (what the reference image processor does).

    Returns the same kind of array it was given (numpy or torch).
    """
    is_torch = isinstance(frames, torch.Tensor)
    array = _uint8_frames(frames, "frames")
    if array.shape[1:3] == (height, width):
        return frames
    out = np.empty((array.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(array):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.BICUBIC))
    return torch.from_numpy(out) if is_torch else out


def normalize(frames, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """[F, H, W, 3] pixel values (uint8, or float on the 0..255 scale) -> float32 [F, 3, H, W], CLIP-normalized.

    Same arithmetic as the reference: rescale in float64, round to float32, then (x - mean) / std in float32.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {tuple(x.shape)}")
    mean_c = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_c = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = torch.empty((x.shape[0], 3, x.shape[1], x.shape[2]), dtype=torch.float32)
    for i, frame in enumerate(x):       # one frame at a time keeps the float64 step small
        scaled = (frame.to(torch.float64) * rescale_factor).to(torch.float32)   # (H, W, 3)
        out[i] = (scaled.permute(2, 0, 1) - mean_c) / std_c
    return out


def patchify(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[F, C, H, W] -> (pixel_rows [t*h*w, C*tp*p*p], grid_thw (t, h, w)) in docs/model.md §2 row order.

    Rows go t, merge-block row, merge-block col, row in block, col in block; each row is (c, tp, py, px).
    An odd frame count is padded by repeating the last frame.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be [F, C, H, W], got shape {tuple(frames.shape)}")
    n_frames, channels, height, width = frames.shape
    block = patch_size * merge_size
    if n_frames < 1 or height % block or width % block:
        raise ValueError(f"frames {tuple(frames.shape)}: need F >= 1 and H, W multiples of {block} "
                         "(resize with smart_resize first)")
    if n_frames % temporal_patch_size:
        pad = temporal_patch_size - n_frames % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
    gt = frames.shape[0] // temporal_patch_size
    gh, gw = height // patch_size, width // patch_size
    x = frames.reshape(gt, temporal_patch_size, channels, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)     # (t, bh, bw, mh, mw, c, tp, ph, pw)
    rows = x.reshape(gt * gh * gw, channels * temporal_patch_size * patch_size * patch_size)
    return rows, (gt, gh, gw)


def _uint8_frames(frames, what: str) -> np.ndarray:
    array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [F, H, W, 3], got {array.dtype} {tuple(array.shape)}")
    return array


# ---- preprocessor_config.json ------------------------------------------------------------------------------------

@dataclass
class ProcessorConfig:
    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    rescale_factor: float = 1 / 255
    video_min_pixels: int | None = None     # None: the image bounds (transformers 4.57 without a video config)
    video_max_pixels: int | None = None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict, video: dict | None = None) -> "ProcessorConfig":
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ValueError(f"preprocessor_config.json sets {flag}=false; only the Qwen2-VL default (true) is supported")
        # transformers 4.57 takes min/max_pixels first and ignores `size` when they are present.
        size = d.get("size") or {}
        kw = {k.name: d[k.name] for k in fields(cls) if k.name in d and not k.name.startswith("video_")}
        kw.setdefault("min_pixels", size.get("shortest_edge", 56 * 56))
        kw.setdefault("max_pixels", size.get("longest_edge", 28 * 28 * 1280))   # HF class default, not the checkpoint's
        if video:
            vsize = video.get("size") or {}
            kw["video_min_pixels"] = video.get("min_pixels", vsize.get("shortest_edge"))
            kw["video_max_pixels"] = video.get("max_pixels", vsize.get("longest_edge"))
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ProcessorConfig":
        """The checkpoint folder's preprocessor_config.json (and video_preprocessor_config.json when present)."""
        path = Path(path)
        pre_file = path / "preprocessor_config.json"
        if not pre_file.is_file():
            raise ValueError(f"no preprocessor_config.json in {path} (expected a Qwen2-VL checkpoint folder)")
        video_file = path / "video_preprocessor_config.json"
        video = json.loads(video_file.read_text()) if video_file.is_file() else None
        return cls.from_dict(json.loads(pre_file.read_text()), video)

    def __post_init__(self):
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"preprocessor_config.json needs 3 image_mean values and 3 positive image_std values, "
                             f"got {self.image_mean} and {self.image_std}")


_PREPROCESSOR_KEYS = {"min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                      "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb",
                      "resample", "size", "image_processor_type", "processor_class"}


def write_preprocessor_config(directory: str | Path, **overrides) -> Path:
    """Write preprocessor_config.json in the released checkpoints' format (docs/model.md §3)."""
    unknown = set(overrides) - _PREPROCESSOR_KEYS
    if unknown:
        raise ValueError(f"unknown preprocessor_config keys {sorted(unknown)}; expected some of {sorted(_PREPROCESSOR_KEYS)}")
    config = {
        "min_pixels": IMAGE_MIN_PIXELS,
        "max_pixels": IMAGE_MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        **overrides,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "preprocessor_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


# ---- the processor -----------------------------------------------------------------------------------------------

class Processor:
    """Text + images + videos -> model inputs, like transformers' Qwen2VLProcessor (slow PIL image processor)."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig | None = None, image_token_id: int | None = None,
                 video_token_id: int | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.config = config or ProcessorConfig()
        self.image_token_id = image_token_id if image_token_id is not None else tokenizer.image_pad_id
        self.video_token_id = video_token_id if video_token_id is not None else tokenizer.video_pad_id
        self.image_token = tokenizer.id_to_token(self.image_token_id)
        self.video_token = tokenizer.id_to_token(self.video_token_id)
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Processor":
        path = Path(path)
        config = ProcessorConfig.from_pretrained(path)
        tokenizer = Tokenizer.from_pretrained(path)
        model_file = path / "config.json"
        model = json.loads(model_file.read_text()) if model_file.is_file() else {}
        template = tokenizer.chat_template
        template_json = path / "chat_template.json"
        if template_json.is_file():
            template = json.loads(template_json.read_text()).get("chat_template", template)
        return cls(tokenizer, config, model.get("image_token_id"), model.get("video_token_id"), template)

    # ---- vision items ------------------------------------------------------------------------------------------
    def preprocess_image(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image (PIL or uint8 [H, W, 3]) -> (pixel_rows [h*w, 1176], (1, h, w))."""
        return self._frames_to_rows(_image_to_array(image)[None], self.config.min_pixels, self.config.max_pixels)

    def preprocess_video(self, frames) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Sampled frames uint8 [F, H, W, 3] -> (pixel_rows [t*h*w, 1176], (t, h, w)); odd F padded."""
        c = self.config
        lo = c.video_min_pixels if c.video_min_pixels is not None else c.min_pixels
        hi = c.video_max_pixels if c.video_max_pixels is not None else c.max_pixels
        return self._frames_to_rows(_uint8_frames(frames, "a video"), lo, hi)

    def _frames_to_rows(self, frames: np.ndarray, min_pixels: int, max_pixels: int):
        c = self.config
        if frames.shape[0] < 1:
            raise ValueError("a video needs at least one frame")
        height, width = smart_resize(frames.shape[1], frames.shape[2], c.factor, min_pixels, max_pixels)
        pixels = normalize(resize_frames(frames, height, width), c.image_mean, c.image_std, c.rescale_factor)
        return patchify(pixels, c.patch_size, c.temporal_patch_size, c.merge_size)

    # ---- text --------------------------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, videos=None, padding: bool = True, return_tensors: str | None = "pt"):
        """Like Qwen2VLProcessor: each image/video pad in the text becomes t*h*w/merge^2 copies; left padding."""
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        out: dict = {}
        image_grids: list[tuple[int, int, int]] = []
        video_grids: list[tuple[int, int, int]] = []
        image_list = _image_list(images)
        if image_list:
            rows, image_grids = zip(*(self.preprocess_image(im) for im in image_list))
            out["pixel_values"] = torch.cat(rows)
            out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
        video_list = _video_list(videos)
        if video_list:
            rows, video_grids = zip(*(self.preprocess_video(v) for v in video_list))
            out["pixel_values_videos"] = torch.cat(rows)
            out["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
        if text is not None:
            out = {**self.encode_with_grids(text, image_grids, video_grids, padding, return_tensors), **out}
        elif not (image_list or video_list):
            raise ValueError("give text, images or videos")
        return _convert(out, return_tensors)

    def encode_with_grids(self, text, image_grid_thw=(), video_grid_thw=(), padding: bool = True,
                          return_tensors: str | None = "pt") -> dict:
        """input_ids/attention_mask for prompts whose vision items are given only by their grids (t, h, w).

        Lets the decoder build prompts over cached visual tokens without any pixels.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a str or a non-empty list of str")
        merge = self.config.merge_size ** 2
        image_counts = [_token_count(g, merge) for g in _grid_list(image_grid_thw)]
        video_counts = [_token_count(g, merge) for g in _grid_list(video_grid_thw)]
        texts = _expand(texts, self.image_token, image_counts, "image")
        texts = _expand(texts, self.video_token, video_counts, "video")
        ids = self.tokenizer.encode_batch(texts)
        for token_id, counts, name in ((self.image_token_id, image_counts, "image"),
                                       (self.video_token_id, video_counts, "video")):
            found = sum(row.count(token_id) for row in ids)
            if found != sum(counts):
                raise ValueError(f"tokenized prompt has {found} {name} pad tokens, expected {sum(counts)}")
        longest = max(len(row) for row in ids)
        if not padding and any(len(row) != longest for row in ids) and return_tensors is not None:
            raise ValueError("prompts have different lengths; use padding=True to return tensors")
        input_ids, attention_mask = [], []
        for row in ids:
            pad = (longest - len(row)) if padding else 0
            fill, ones = [self.tokenizer.pad_token_id] * pad, [1] * len(row)
            if self.tokenizer.padding_side == "left":
                input_ids.append(fill + row)
                attention_mask.append([0] * pad + ones)
            else:
                input_ids.append(row + fill)
                attention_mask.append(ones + [0] * pad)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors is not None:
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return _convert(out, return_tensors)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, add_vision_id: bool = False,
                            tokenize: bool = False):
        """Chat-template prompt string (docs/model.md §9), or its ids; a list of conversations gives a list."""
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
            return [self.apply_chat_template(m, add_generation_prompt, add_vision_id, tokenize) for m in messages]
        prompt = render_chat(messages, add_generation_prompt, add_vision_id)
        return self.tokenizer.encode(prompt) if tokenize else prompt

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens)


# ---- input plumbing ----------------------------------------------------------------------------------------------

def _image_to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image must be a PIL image or uint8 [H, W, 3], got {array.dtype} {tuple(array.shape)}")
    return array


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images] if images.ndim == 3 else list(images)     # [H, W, 3] or a stack [N, H, W, 3]
    flat = []
    for item in images:                                            # flat list, or one list per prompt
        flat.extend(_image_list(item) if isinstance(item, (list, tuple)) else [item])
    return flat


def _video_list(videos) -> list:
    if videos is None:
        return []
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise ValueError(f"videos must be uint8 [F, H, W, 3] or a list of them, got shape {tuple(videos.shape)}")
    result = []
    for item in videos:
        if isinstance(item, (list, tuple)):        # one video given as a list of HWC frames
            item = np.stack([_image_to_array(f) for f in item])
        if getattr(item, "ndim", None) != 4:
            raise ValueError("each video must be uint8 [F, H, W, 3] (or a list of [H, W, 3] frames); "
                             "stack the frames of one video into one array")
        result.append(item)
    return result


def _grid_list(grids) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    if isinstance(grids, torch.Tensor):
        grids = grids.tolist()
    out = [tuple(int(v) for v in g) for g in grids]
    for g in out:
        if len(g) != 3 or min(g) < 1:
            raise ValueError(f"a grid must be (t, h, w) with positive entries, got {g}")
    return out


def _token_count(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    if (h * w) % merge:
        raise ValueError(f"grid {grid}: h*w must be divisible by merge_size^2 = {merge}")
    return t * h * w // merge


def _expand(texts: list[str], token: str, counts: list[int], name: str) -> list[str]:
    """Replace the k-th `token` (counting across all texts in order) by counts[k] copies."""
    found = sum(t.count(token) for t in texts)
    if found != len(counts):
        raise ValueError(f"the text has {found} {token} placeholder(s) but {len(counts)} {name}(s) were given; "
                         f"write one {token} per {name}")
    remaining = iter(counts)
    expanded = []
    for text in texts:
        pieces = text.split(token)
        parts = [pieces[0]]
        for piece in pieces[1:]:
            parts.append(token * next(remaining))
            parts.append(piece)
        expanded.append("".join(parts))
    return expanded


def _convert(out: dict, return_tensors: str | None) -> dict:
    if return_tensors == "np":
        return {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in out.items()}
    if return_tensors is None:
        return {k: v.tolist() if isinstance(v, torch.Tensor) and k in ("input_ids", "attention_mask") else v
                for k, v in out.items()}
    return out
