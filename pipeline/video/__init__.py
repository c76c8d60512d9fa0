"""Video in: opening and probing media, 2 fps sampling of files (GOP-parallel), live streams, the protocol table,
clocks and backoff, and the one segment rule. Never reads Settings: callers pass plain values.

    protocols.py  scheme -> FFmpeg protocol -> open options; URL checks
    hosts.py      where a network feed may point (not this node, its link, or the service's own ports)
    media.py      open, probe, target frame size, display rotation, YUV -> RGB
    files.py      sample times and decoded windows of files (PyAV or decord)
    parallel.py   GOP-parallel decoding of one window
    clock.py      PtsClock, RateSampler, Backoff for live sources
    segments.py   frames -> segments on the time grid (archives and feeds alike); the bounded segment queue
    stream.py     StreamSampler: one live source read in a thread
    sampler_config.py  SamplerConfig: what a live reader is told, checked when built

Public names resolve lazily, so `pipeline.video.protocols` loads without PyAV.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PROTOCOLS": "protocols", "validate_url": "protocols", "check_protocol": "protocols", "redact_url": "protocols",
    "HostPolicy": "hosts", "check_host": "hosts",
    "DecodeError": "media", "VideoInfo": "media", "probe": "media", "target_size": "media",
    "sample_times": "files", "decode_window": "files", "iter_window": "files",
    "PtsClock": "clock", "RateSampler": "clock", "Backoff": "clock",
    "SegmentBuilder": "segments", "SegmentQueue": "segments", "iter_segments": "segments",
    "segment_frames": "segments", "frames_per_segment": "segments",
    "SamplerConfig": "sampler_config", "StreamSampler": "stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.video' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
