"""Time on live sources: mapping presentation times to the wall clock, taking frames at a fixed rate, and the
reconnect backoff. Pure Python, no PyAV: the stream reader (pipeline/video/stream.py) drives them frame by frame.
"""
from __future__ import annotations

import math
import random

_EPS = 1e-6                         # seconds; absorbs float error in pts * time_base
_MIN_STEP_S = 1e-3                  # re-anchored times stay at least this far after the previous frame


class PtsClock:
    """Maps a source's presentation times (seconds) to wall-clock epoch seconds.

    The first frame of a connection is anchored at time.time(); later frames follow their pts from that anchor,
    so the source's own spacing is kept even when frames arrive in bursts (the RTSP probe, HLS segments). Then:
    - pts go backwards (sender restarted) or jump forward more than `max_jump_s`: re-anchor keeping the real
      time elapsed since the previous frame arrived;
    - the mapped time runs more than `max_ahead_s` ahead of the wall clock, or `max_jump_s` behind it (the
      camera's clock drifts, or the source stalled while its pts ran on): re-anchor at the wall clock.
    Times never decrease, across re-anchors and reconnects alike. A burst at the start of a connection makes
    times run ahead of arrival by up to its length (about 0.1-0.2 s for RTSP with the fast probe).
    """

    def __init__(self, max_jump_s: float = 10.0, max_ahead_s: float = 2.0):
        if not max_jump_s > 0 or not max_ahead_s > 0:
            raise ValueError(f"max_jump_s and max_ahead_s must be > 0, got {max_jump_s}, {max_ahead_s}")
        self.max_jump_s, self.max_ahead_s = max_jump_s, max_ahead_s
        self.reanchors = 0
        self.last_t: float | None = None             # epoch time given to the previous frame
        self._offset: float | None = None            # epoch seconds - pts seconds
        self._last_pts: float | None = None
        self._last_arrival: float | None = None      # wall clock when the previous frame arrived

    def reset(self) -> None:
        """Forget the anchor (a new connection); times still never go below the last one given."""
        self._offset = None
        self._last_pts = None

    def _not_before_last(self, t: float) -> float:
        return t if self.last_t is None else max(t, self.last_t + _MIN_STEP_S)

    def to_epoch(self, pts_s: float | None, now: float) -> float:
        if pts_s is None:
            if self._offset is None:                 # no pts before any anchor (first RTSP frame): the clock
                t = self._not_before_last(now)
                self.last_t, self._last_arrival = t, now
                return t
            pts_s = self._last_pts + _MIN_STEP_S     # otherwise just after the previous frame
        if self._offset is None:
            self._offset = self._not_before_last(now) - pts_s
        else:
            follow = pts_s + self._offset
            if pts_s < self._last_pts - _EPS or pts_s - self._last_pts > self.max_jump_s:
                elapsed = max(_MIN_STEP_S, now - self._last_arrival)
                self._offset = self.last_t + elapsed - pts_s
                self.reanchors += 1
            elif follow - now > self.max_ahead_s or now - follow > self.max_jump_s:
                self._offset = self._not_before_last(now) - pts_s
                self.reanchors += 1
        t = max(pts_s + self._offset, self.last_t if self.last_t is not None else -math.inf)
        self._last_pts, self._last_arrival, self.last_t = pts_s, now, t
        return t


class RateSampler:
    """Takes one frame per 1/fps seconds by timestamp: the first frame, then the first at or after each due time.

    Due times step by exactly 1/fps, so the rate does not drift (a 25 fps source gives frames 0.52 and 0.48 s
    apart, 2 per second); a frame more than half a period late (after a gap) is taken and restarts the phase.
    """

    def __init__(self, fps: float):
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps
        self._due: float | None = None

    def take(self, t: float) -> bool:
        if self._due is not None and t < self._due - 1e-3:     # 1 ms: float error in pts * time_base
            return False
        late = self._due is None or t - self._due > self.period / 2
        self._due = (t if late else self._due) + self.period
        return True

    def restart(self) -> None:
        """Take the next frame whatever its time (a new connection starts a new phase)."""
        self._due = None


class Backoff:
    """Exponential reconnect delays: initial * 2**n, capped at max_s, each shortened by up to `jitter` (random)."""

    def __init__(self, initial_s: float, max_s: float, jitter: float = 0.2, rng: random.Random | None = None):
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.failures = 0
