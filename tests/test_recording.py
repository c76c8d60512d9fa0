"""Recording live feeds (pipeline/video/recording.py, pipeline/recordings.py) and clips made from recordings and
archive files (pipeline/clips.py): real RTSP and file feeds read by a real StreamSampler, files checked with ffprobe
and PyAV. The clip route over HTTP is in tests/api/test_footage_routes.py."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import av
import pytest

from pipeline.clips import NoFootage, make_clip
from pipeline.recordings import (list_recordings, recorder_for, source_folder, sweep_recordings,
                                 write_archive_pointer)
from pipeline.settings import load_settings
from pipeline.video.hosts import HostPolicy
from pipeline.video.recording import Recorder, complete_length, parse_recording_name
from pipeline.video.sampler_config import SamplerConfig
from pipeline.video.stream import StreamSampler
from streams import RtspServer, make_stream_video, wait_for
from videos import encode_video

FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"
LOOPBACK = HostPolicy(allow=("127.0.0.1",))        # the test RTSP server listens there


def ffprobe(path, entry: str) -> str:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", entry, "-of",
                          "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def packets(path) -> list[tuple[bytes, bool]]:
    with av.open(str(path)) as c:
        return [(bytes(p), p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]


def run_feed(url: str, folder: Path, seconds: float, chunk_seconds: float = 60.0, retry_s: float = 10.0,
             until=None) -> tuple[StreamSampler, Recorder]:
    recorder = Recorder(folder, chunk_seconds, retry_s)
    sampler = StreamSampler(SamplerConfig("cam", url, segment_seconds=1.0, hosts=LOOPBACK), recorder=recorder)
    sampler.start()
    try:
        if until is None:
            time.sleep(seconds)
        else:
            until(sampler, recorder)
    finally:
        sampler.stop()
    return sampler, recorder


@pytest.fixture(scope="module")
def file_recording(tmp_path_factory):
    """A 2 s file feed (keyframe every second, 25 fps) read for one loop and a half, recorded in 1 s chunks."""
    root = tmp_path_factory.mktemp("file-recording")
    source = make_stream_video(root / "src.mp4", seconds=2.0, width=160, height=120)
    settings = load_settings(data_dir=root / "data")
    folder = source_folder(settings, "cam")
    began = time.time()
    sampler, recorder = run_feed(str(source), folder, 3.3, chunk_seconds=1.0)
    return {"source": source, "settings": settings, "folder": folder, "began": began, "ended": time.time(),
            "sampler": sampler, "recorder": recorder}


# ---- recording ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_an_rtsp_feed_is_recorded_in_chunks_that_play_for_the_times_their_names_say(tmp_path):
    with RtspServer(width=160, height=120, fps=25) as server:     # a keyframe every second
        began = time.time()
        sampler, recorder = run_feed(server.url, tmp_path / "rec", 0, chunk_seconds=2.0,
                                     until=lambda s, r: wait_for(lambda: r.files >= 2, 20, 0.1, "two chunks"))
    files = list_recordings_in(tmp_path / "rec")
    assert len(files) >= 2 and recorder.error is None and sampler.segments_produced >= 2
    assert not [n for n in os.listdir(tmp_path / "rec") if not n.endswith(".mp4")]     # no .part left
    for (name, start, end), nxt in zip(files, files[1:] + [None]):
        path = tmp_path / "rec" / name
        assert ffprobe(path, "stream=codec_name") == "h264"
        assert float(ffprobe(path, "format=duration")) == pytest.approx(end - start, abs=0.1)
        assert began - 1 <= start < end <= time.time() + 0.1       # epoch times of the feed's clock
        assert packets(path)[0][1]                                  # each file starts at a keyframe
        if nxt is not None:
            assert end - start >= 2.0 - 0.05                        # chunks close at the first keyframe after 2 s
            assert nxt[1] - end == pytest.approx(0, abs=0.1)        # and follow each other without a gap


def list_recordings_in(folder: Path) -> list[tuple[str, float, float]]:
    return sorted((n, *parse_recording_name(n)) for n in os.listdir(folder) if parse_recording_name(n))


def test_a_recording_holds_the_source_packets_unchanged_and_a_loop_starts_a_new_file(file_recording):
    files = list_recordings_in(file_recording["folder"])
    assert len(files) >= 3 and file_recording["recorder"].error is None
    first_loop = [file_recording["folder"] / n for n, _, _ in files[:2]]        # 2 s of source in 1 s chunks
    assert sum((packets(p) for p in first_loop), []) == packets(file_recording["source"])   # the very bytes
    assert ffprobe(first_loop[0], "stream=codec_name,width,height") == "h264,160,120"
    assert file_recording["sampler"].status()["loops"] == 1
    assert files[2][1] >= files[1][2] - 0.01                                     # the loop's file comes after


def test_recording_is_off_per_feed_per_setting_and_on_an_object_store_root(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    assert isinstance(recorder_for({"id": "cam"}, settings), Recorder)           # feeds registered before the flag
    assert isinstance(recorder_for({"id": "cam", "record": True}, settings), Recorder)
    assert recorder_for({"id": "cam", "record": False}, settings) is None
    assert recorder_for({"id": "cam"}, load_settings(data_dir=tmp_path, recording=False)) is None
    assert recorder_for({"id": "cam"}, load_settings(data_dir=tmp_path, index_dir="s3://bucket/index")) is None
    from pipeline.feeds import add_feed
    with pytest.raises(ValueError, match="record must be true or false"):
        add_feed(None, "rtsp://192.168.1.20/cam", record="no", settings=settings)


@contextlib.contextmanager
def tiny_filesystem(folder: Path, size: str = "256k"):
    """A real filesystem of `size` bytes (tmpfs) at folder: writes past it fail with ENOSPC, as a full disk does.
    Mounting needs root with mount rights (the test machine has them); elsewhere the test is skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


@pytest.mark.timeout(60)
def test_a_full_disk_pauses_recording_with_an_error_while_reading_goes_on_and_recording_resumes(tmp_path):
    source = make_stream_video(tmp_path / "src.mp4", seconds=2.0, width=160, height=120)
    with tiny_filesystem(tmp_path / "disk") as disk:
        filler = fill(disk)

        def scenario(sampler, recorder):
            wait_for(lambda: recorder.error is not None, 10, 0.05, "recording to pause")
            assert "No space left on device" in recorder.error
            assert sampler.status()["recording_error"] == recorder.error
            produced = sampler.segments_produced
            wait_for(lambda: sampler.segments_produced >= produced + 1, 10, 0.05, "segments while paused")
            assert recorder.files == 0
            filler.unlink()                                       # space again: the next retry records
            wait_for(lambda: recorder.files >= 1, 10, 0.05, "recording to resume")
            assert recorder.error is None and sampler.status()["recording_error"] is None

        sampler, recorder = run_feed(str(source), disk / "rec", 0, chunk_seconds=0.5, retry_s=0.3, until=scenario)
        assert recorder.errors >= 1 and sampler.last_error is None       # the reader itself never failed
        names = os.listdir(disk / "rec")
        assert names and all(parse_recording_name(n) for n in names)    # no .part left behind


# ---- clips ----------------------------------------------------------------------------------------------------------
def test_a_clip_joins_recordings_from_the_keyframe_before_start(file_recording):
    settings, files = file_recording["settings"], list_recordings(file_recording["settings"], "cam")
    a = files[0].start
    clip = make_clip(settings, "cam", a + 0.5, a + 1.5)                 # across the first two chunks
    assert clip.start == pytest.approx(a, abs=0.01)                     # the keyframe at or before start
    assert clip.end >= a + 1.5
    assert float(ffprobe(clip.path, "format=duration")) == pytest.approx(clip.end - clip.start, abs=0.05)
    assert packets(clip.path) == packets(file_recording["source"])[:len(packets(clip.path))]   # copied, not encoded
    assert make_clip(settings, "cam", a + 0.5, a + 1.5).path == clip.path            # cached
    exact = make_clip(settings, "cam", a + 0.52, a + 1.48, exact=True)
    assert exact.start == pytest.approx(a + 0.52, abs=0.04) and exact.end == pytest.approx(a + 1.48, abs=0.05)
    assert float(ffprobe(exact.path, "format=duration")) == pytest.approx(0.96, abs=0.05)


def test_clip_windows_without_footage_or_too_long_are_refused(file_recording):
    settings, a = file_recording["settings"], list_recordings(file_recording["settings"], "cam")[0].start
    with pytest.raises(NoFootage):
        make_clip(settings, "cam", a - 100, a - 50)
    with pytest.raises(NoFootage):
        make_clip(settings, "nobody", a, a + 1)
    with pytest.raises(ValueError, match="clip_max_seconds"):
        make_clip(settings, "cam", a, a + 601)
    with pytest.raises(ValueError, match="must be after"):
        make_clip(settings, "cam", a + 1, a)


def test_a_clip_of_an_archive_source_reads_its_file_in_media_time(tmp_path):
    video = encode_video(tmp_path / "a.mp4", 160, 90, 30, seconds=4.0, gop=15).path     # keyframes every 0.5 s
    settings = load_settings(data_dir=tmp_path / "data")
    write_archive_pointer(settings, "yard", str(video), 0.0)
    clip = make_clip(settings, "yard", 1.2, 2.7)
    assert clip.start == pytest.approx(1.0, abs=0.01) and 2.7 <= clip.end <= 2.7 + 0.2   # B-frames: a frame or 3 more
    assert float(ffprobe(clip.path, "format=duration")) == pytest.approx(clip.end - clip.start, abs=0.05)
    with pytest.raises(NoFootage):
        make_clip(settings, "yard", 10, 20)                           # past the end of the file
    video.unlink()
    with pytest.raises(NoFootage):
        make_clip(settings, "yard", 1.2, 2.7)                         # the file is gone


def test_retention_ages_recordings_out_and_removes_crash_leftovers(file_recording, tmp_path):
    settings = load_settings(data_dir=tmp_path)
    folder = source_folder(settings, "cam")
    shutil.copytree(file_recording["folder"], folder)
    files = list_recordings(settings, "cam")
    (folder / ".stale.part").write_bytes(b"x")
    os.utime(folder / ".stale.part", (0, 0))
    now = files[1].end + 10
    assert sweep_recordings(settings, [files[-1]], max_age_s=10.5, now=now) == 2   # the first by age, the last named
    assert [f.path for f in list_recordings(settings, "cam")] == [f.path for f in files[1:-1]]
    assert not (folder / ".stale.part").exists()


# ---- the open chunk -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_chunk(tmp_path_factory):
    """A 10 s file feed recorded in 30 s chunks: after 4 s of it, while the first chunk is still being written, a
    clip of its last 3 s is made and the open chunk is copied (what a crash would leave)."""
    root = tmp_path_factory.mktemp("open-chunk")
    source = make_stream_video(root / "src.mp4", seconds=10.0, width=160, height=120)
    settings = load_settings(data_dir=root / "data")
    seen = {}

    def scenario(sampler, recorder):
        wait_for(lambda: list_recordings(settings, "cam"), 10, 0.05, "the open chunk to be listed")
        time.sleep(4.0)
        seen["now"] = now = time.time()
        seen["clip"] = make_clip(settings, "cam", now - 3.0, now)
        seen["files"], seen["closed"] = list_recordings(settings, "cam"), recorder.files
        crashed = source_folder(settings, "crashed")
        crashed.mkdir(parents=True)
        seen["copy"] = Path(shutil.copy(seen["files"][0].path, crashed))

    run_feed(str(source), source_folder(settings, "cam"), 0, chunk_seconds=30.0, until=scenario)
    return {"source": source, "settings": settings, **seen}


def test_a_clip_of_the_last_seconds_of_a_live_feed_reads_the_chunk_still_being_written(open_chunk):
    clip, now, [part] = open_chunk["clip"], open_chunk["now"], open_chunk["files"]
    assert open_chunk["closed"] == 0 and part.open and os.path.basename(part.path).endswith(".part")
    assert clip.start <= now - 3.0 and clip.start == pytest.approx(now - 3.0, abs=1.05)    # the keyframe before
    assert clip.end == pytest.approx(now, abs=1.6)         # up to the last complete fragment (1 s) and its flush
    assert float(ffprobe(clip.path, "format=duration")) == pytest.approx(clip.end - clip.start, abs=0.05)
    with av.open(clip.path) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == pytest.approx((clip.end - clip.start) * 25, abs=1) and frames[0].width == 160
    offset = round((clip.start - part.start) * 25)                     # the source's own packets, from a keyframe
    assert packets(clip.path) == packets(open_chunk["source"])[offset:offset + len(frames)]


def test_an_open_chunk_is_read_to_its_last_complete_fragment_and_a_crash_left_one_is_sealed(open_chunk, tmp_path):
    settings, copy = open_chunk["settings"], open_chunk["copy"]
    whole = complete_length(copy)
    os.truncate(copy, whole - 100)                                      # cut inside the last fragment
    assert 0 < complete_length(copy) < whole - 100
    [part] = list_recordings(settings, "crashed")
    clip = make_clip(settings, "crashed", part.start, part.start + 10)
    assert clip.start == pytest.approx(part.start, abs=0.01) and 1.0 <= clip.end - clip.start < 4.5
    assert float(ffprobe(clip.path, "format=duration")) == pytest.approx(clip.end - clip.start, abs=0.05)
    os.utime(copy, (0, 0))                                              # its writer is long gone
    sweep_recordings(settings, [], max_age_s=None, now=time.time())
    [sealed] = list_recordings(settings, "crashed")
    assert not sealed.open and sealed.start == part.start and sealed.end == pytest.approx(clip.end, abs=0.002)
    assert float(ffprobe(sealed.path, "format=duration")) == pytest.approx(sealed.end - sealed.start, abs=0.05)
    assert [n for n in os.listdir(copy.parent)] == [os.path.basename(sealed.path)]
