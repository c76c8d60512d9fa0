"""Uploaded images: their bytes checked and decoded, and their visual tokens from the vision tower, once per image.

docs/architecture.md, "Images". An image is read by Pillow (only the still-image formats of IMAGE_FORMATS),
turned upright by its EXIF orientation, converted to RGB, and resized by the checkpoint's image rules
(qwen2vl.Processor.preprocess_image: smart_resize to multiples of 28 within the preprocessor's min/max pixels, one
tube of two equal frames). Tokens of the same bytes come from a small LRU keyed by their SHA-256, so a repeated image
runs the tower once.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
CACHE_BYTES = 256 << 20          # image tokens kept for repeated images (on the model's device)
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


class ImageTooLarge(ValueError):
    """An image over a size limit (bytes: 413 at the API; pixels: 422)."""


@dataclass(frozen=True)
class ImageTokens:
    """One image as the prompt takes it: the digest of its bytes, its grid (1, h, w) in patches, its merged tokens."""
    digest: str
    grid_thw: tuple[int, int, int]
    tokens: torch.Tensor              # (h * w / 4, D) in the model's dtype, on its device

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def image_bytes(text: str, max_bytes: int, what: str = "image") -> bytes:
    """The bytes of an image given as base64 or as a data:image/...;base64, URL. ValueError when it is neither,
    ImageTooLarge when the bytes are over max_bytes (checked on the encoded length first: nothing big is decoded)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string: base64 or a data:image/...;base64, URL")
    match = DATA_URL.match(text)
    payload = text[match.end():] if match else text
    if text.startswith("data:") and not match:
        raise ValueError(f"{what}: a data URL must be data:image/<type>;base64,<data>")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageTooLarge(f"{what} is over {max_bytes} bytes (api_max_image_bytes)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64 (give base64 or a data:image/...;base64, URL)") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{what} is over {max_bytes} bytes (api_max_image_bytes)")
    if not data:
        raise ValueError(f"{what} is empty")
    return data


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an encoded image, upright. ValueError "not an image" for anything Pillow cannot read
    as one of IMAGE_FORMATS; ImageTooLarge when width x height is over max_pixels (checked before decoding pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"the image is {width}x{height} pixels, over {max_pixels} "
                                    "(api_max_image_pixels)")
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ValueError(f"not an image: {type(e).__name__}: {str(e)[:200]} "
                         f"(accepted formats: {', '.join(IMAGE_FORMATS)})") from None
    return np.array(image)          # a writable copy: torch warns on read-only arrays


class ImageEncoder:
    """Visual tokens of images through the model's vision tower, at most once per distinct image (LRU by SHA-256,
    bounded by the tokens' bytes). `lock` serialises model calls with the rest of the decoder."""

    def __init__(self, model, processor, lock: threading.Lock, max_pixels: int, cache_bytes: int = CACHE_BYTES):
        if model.visual is None:
            raise ValueError("the model was loaded without its vision tower")
        self.model, self.processor, self.lock = model, processor, lock
        self.max_pixels, self.cache_bytes = max_pixels, cache_bytes
        self._cache: OrderedDict[str, ImageTokens] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.tower_runs = 0

    def tokens_of(self, images: list[bytes], limit: int) -> list[ImageTokens]:
        """Tokens of each image, in order; ValueError past `limit` images (api_max_images)."""
        if len(images) > limit:
            raise ValueError(f"{len(images)} images; the limit is {limit} (api_max_images)")
        return [self.tokens(data) for data in images]

    def tokens(self, data: bytes) -> ImageTokens:
        digest = hashlib.sha256(data).hexdigest()
        cached = self._get(digest)
        if cached is not None:
            return cached
        pixels = decode_image(data, self.max_pixels)
        rows, grid = self.processor.preprocess_image(pixels)
        with self.lock:
            cached = self._get(digest)          # another request may have encoded it meanwhile
            if cached is not None:
                return cached
            with torch.no_grad():
                tokens = self.model.encode_visual(rows, torch.tensor([grid]))
            self.tower_runs += 1
        item = ImageTokens(digest=digest, grid_thw=tuple(int(v) for v in grid), tokens=tokens)
        self._put(item)
        return item

    def stats(self) -> dict:
        with self._cache_lock:
            return {"cached": len(self._cache), "tower_runs": self.tower_runs}

    def _get(self, digest: str) -> ImageTokens | None:
        with self._cache_lock:
            item = self._cache.get(digest)
            if item is not None:
                self._cache.move_to_end(digest)
            return item

    def _put(self, item: ImageTokens) -> None:
        size = item.tokens.numel() * item.tokens.element_size()
        if size > self.cache_bytes:
            return
        with self._cache_lock:
            self._cache[item.digest] = item
            self._cache.move_to_end(item.digest)
            used = sum(t.tokens.numel() * t.tokens.element_size() for t in self._cache.values())
            while used > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                used -= old.tokens.numel() * old.tokens.element_size()
