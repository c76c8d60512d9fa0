"""The pixel geometry every Qwen2-VL checkpoint shares, and smart_resize (docs/model.md §2, §3).

Torch-free on purpose: the ingest pipeline sizes frames and checks settings with these numbers in processes that
never load the model. Everything else (processor, pipeline, settings) imports them from here.
"""
from __future__ import annotations

import math

PATCH_SIZE = 14                                   # spatial patch side, pixels
TEMPORAL_PATCH_SIZE = 2                           # frames per tube
MERGE_SIZE = 2                                    # 2x2 patches merge into one visual token
FACTOR = PATCH_SIZE * MERGE_SIZE                  # 28: resized frame sides are multiples of this
PATCH_AREA = PATCH_SIZE * PATCH_SIZE              # 196 pixels per patch
TOKEN_AREA = FACTOR * FACTOR                      # 784 pixels per visual token (per frame pair)
PATCHES_PER_TOKEN = MERGE_SIZE * MERGE_SIZE       # 4
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_AREA  # 1176 values in one pixel row

# Checkpoint preprocessor_config.json bounds (docs/model.md §3): 4 .. 16384 tokens per image.
IMAGE_MIN_PIXELS = 4 * TOKEN_AREA                 # 3136
IMAGE_MAX_PIXELS = 16384 * TOKEN_AREA             # 12845056
MAX_ASPECT_RATIO = 200

# The video budget of Qwen's own video utilities, which tubescope uses for footage (docs/model.md §3, §4).
VIDEO_FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * TOKEN_AREA               # 100352
VIDEO_MAX_PIXELS = 768 * TOKEN_AREA               # 602112
VIDEO_TOTAL_PIXELS = 24576 * TOKEN_AREA           # 19267584


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect ratio kept.

    Python round is half-to-even on purpose (70 px -> 56), as in the reference.
    """
    if height < factor or width < factor:
        raise ValueError(f"image is {height}x{width} pixels; height and width must both be at least {factor}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} is {max(height, width) / min(height, width):.1f}; "
                         f"it must be at most {MAX_ASPECT_RATIO}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
