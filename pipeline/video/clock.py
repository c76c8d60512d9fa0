"""Time on live sources: mapping presentation times to the wall clock, taking frames at a fixed rate, and the
reconnect backoff. Pure Python, no PyAV: the stream reader (pipeline/video/stream.py) drives them frame by frame.
"""
from __future__ import annotations

import math
import random

_EPS = 1e-6                         # seconds; absorbs float error in pts * time_base
_MIN_STEP_S = 1e-3                  # re-anchored times stay at least this far after the previous frame


class PtsClock:
    """Maps a source's presentation times (seconds) to wall-clock epoch seconds: pts + an offset, so the source's
    own spacing is kept even when frames arrive in bursts (the RTSP probe, a reader that fell behind, HLS segments).

    A frame was captured before it arrived, so on a live source (`paced=False`) no frame gets a time after the
    wall clock at which it came out of the decoder: the offset is the lowest that arrival times allow. The reader
    lowers it before decoding anything with `bound(pts, arrival)` for what the source had buffered when the
    connection opened (docs/architecture.md, "Streams and protocols"), and `to_epoch` lowers it again whenever a
    frame would land ahead of the clock (the camera's clock runs fast, its pts jumped forward a little). With no
    bound yet, the first frame is anchored at its arrival. Then:
    - pts go backwards (sender restarted, a file looped) or jump forward more than `max_jump_s`: re-anchor keeping
      the real time elapsed since the previous frame arrived;
    - the mapped time falls more than `max_jump_s` behind the wall clock (the camera's clock runs slow, or the
      source stalled while its pts ran on): re-anchor at the wall clock.
    Times never decrease, across re-anchors and reconnects alike. A local file played at real time is `paced`: its
    reader waits until each frame's time, so those times are ahead of the clock when mapped and are not lowered.
    """

    def __init__(self, max_jump_s: float = 10.0, paced: bool = False):
        if not max_jump_s > 0:
            raise ValueError(f"max_jump_s must be > 0, got {max_jump_s}")
        self.max_jump_s, self.paced = max_jump_s, paced
        self.reanchors = 0
        self.last_t: float | None = None             # epoch time given to the previous frame
        self._offset: float | None = None            # epoch seconds - pts seconds
        self._first_pts: float | None = None         # the lowest pts bound() saw on this connection
        self._last_pts: float | None = None
        self._last_arrival: float | None = None      # wall clock when the previous frame arrived

    def reset(self) -> None:
        """Forget the anchor (a new connection); times still never go below the last one given."""
        self._offset = None
        self._first_pts = None
        self._last_pts = None

    def _not_before_last(self, t: float) -> float:
        return t if self.last_t is None else max(t, self.last_t + _MIN_STEP_S)

    def bound(self, pts_s: float, arrival: float) -> None:
        """Data of presentation time `pts_s` arrived at `arrival` (wall clock): its frame gets no later time."""
        if self._offset is None or arrival - pts_s < self._offset:
            self._offset = arrival - pts_s
        if self._first_pts is None or pts_s < self._first_pts:
            self._first_pts = pts_s

    def epoch(self, pts_s: float) -> float | None:
        """The epoch time pts `pts_s` maps to now, changing nothing (the recorder's file times); None before the
        first frame of a connection."""
        return None if self._offset is None else pts_s + self._offset

    def to_epoch(self, pts_s: float | None, now: float) -> float:
        if pts_s is None:
            if self._last_pts is not None:           # just after the previous frame
                pts_s = self._last_pts + _MIN_STEP_S
            elif self._first_pts is not None:        # the first frame (RTSP's has none): just before the next
                pts_s = self._first_pts - _MIN_STEP_S
            else:                                    # nothing to follow yet: the clock
                t = self._not_before_last(now)
                self.last_t, self._last_arrival = t, now
                return t
        if self._offset is None:
            self._offset = self._not_before_last(now) - pts_s
        elif self._last_pts is not None and (pts_s < self._last_pts - _EPS
                                             or pts_s - self._last_pts > self.max_jump_s):
            elapsed = max(_MIN_STEP_S, now - self._last_arrival)
            self._offset = self.last_t + elapsed - pts_s
            self.reanchors += 1
        elif now - (pts_s + self._offset) > self.max_jump_s:
            self._offset = self._not_before_last(now) - pts_s
            self.reanchors += 1
        if not self.paced and pts_s + self._offset > now:    # never ahead of the wall clock
            self._offset = now - pts_s
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
