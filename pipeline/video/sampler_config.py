"""What one live reader is told: its source, sampling, pixel budget, queue, timeouts, backoff and what it may open.

Checked when built, so a bad value fails before a reader starts its thread; pipeline/feeds.py builds one from a
stored feed and the settings.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.video.hosts import HostPolicy
from pipeline.video.protocols import ALL_SCHEMES
from pipeline.video.segments import frames_per_segment
from qwen2vl.geometry import TOKEN_AREA, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS


@dataclass
class SamplerConfig:
    source_id: str
    url: str
    fps: float = 2.0
    segment_seconds: float = 8.0
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    queue_size: int = 4                 # segments held for the consumer; the oldest is dropped beyond this
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_jitter: float = 0.2
    max_pts_jump_s: float = 10.0        # a larger pts jump, or drifting this far behind the clock, re-anchors
    hls_hold_counters: int = 5          # HLS playlist reloads without a new segment before EOF
    max_gaps_kept: int = 100            # gaps listed in status(); gap_count counts them all
    schemes: tuple[str, ...] = ALL_SCHEMES   # URL schemes this reader may open (checked at every open)
    file_roots: tuple[str, ...] | None = None   # folders a local file must lie in; None: any (trusted callers)
    hosts: HostPolicy = HostPolicy()         # where a network URL may point (checked at every open)

    def __post_init__(self):
        if not isinstance(self.source_id, str) or not self.source_id or ":" in self.source_id:
            raise ValueError(f"source_id must be a non-empty str without ':', got {self.source_id!r}")
        if not isinstance(self.url, str) or not self.url.strip():
            raise ValueError(f"url must be a non-empty string, got {self.url!r}")
        self.url = self.url.strip()         # its scheme and folder are checked at every open (StreamSampler._open)
        frames_per_segment(self.fps, self.segment_seconds)
        if not TOKEN_AREA <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need {TOKEN_AREA} <= min_pixels <= max_pixels, got {self.min_pixels}, "
                             f"{self.max_pixels}")
        for name in ("open_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s", "max_pts_jump_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                             f"({self.backoff_initial_s})")
        if not 0 <= self.backoff_jitter < 1:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {self.backoff_jitter}")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {self.queue_size!r}")
        if self.hls_hold_counters < 1 or self.max_gaps_kept < 1:
            raise ValueError("hls_hold_counters and max_gaps_kept must be >= 1")

    @property
    def frames_per_segment(self) -> int:
        return frames_per_segment(self.fps, self.segment_seconds)
