"""Archive-speed changes of the encoder stage: the reused input buffer, the thread count of CPU encoder actors, and
encoders kept loaded between jobs."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import qwen2vl
from actors.encoder import VisionEncoder
from pipeline.archive import _encoder_threads, index_archive
from pipeline.settings import load_settings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def _uint8_rows(grid: tuple[int, int, int], seed: int) -> torch.Tensor:
    t, h, w = grid
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t * h * w, 1176), dtype=torch.uint8, generator=g)


def test_buffered_normalisation_is_bit_identical_for_growing_and_shrinking_batches(tiny_model):
    enc = VisionEncoder(str(tiny_model), device="cpu")
    for n, seed in [(96, 0), (400, 1), (8, 2), (400, 3)]:          # grows, shrinks, then refills the big buffer
        rows = _uint8_rows((1, 1, n), seed)
        expected = torch.addcmul(enc._shift, rows.float(), enc._scale)   # the unbuffered formula
        assert torch.equal(enc._rows_to_input(rows), expected)


def test_encoder_reusing_its_buffer_gives_the_tokens_of_a_fresh_encoder(tiny_model):
    big = [(_uint8_rows((2, 8, 12), 4), (2, 8, 12)), (_uint8_rows((4, 6, 4), 5), (4, 6, 4))]
    small = [(_uint8_rows((2, 4, 4), 6), (2, 4, 4))]
    warm = VisionEncoder(str(tiny_model), token_budget=256, device="cpu")
    warm.encode(*zip(*big))                                           # leaves a larger, dirty buffer behind
    reused = warm.encode(*zip(*small))
    fresh = VisionEncoder(str(tiny_model), token_budget=256, device="cpu").encode(*zip(*small))
    assert torch.equal(reused[0], fresh[0])
    with torch.inference_mode():                                      # and both are the tower on normalised rows
        rows, grid = small[0]
        direct = warm.visual(torch.addcmul(warm._shift, rows.float(), warm._scale), torch.tensor([grid]))
    assert torch.equal(reused[0], direct.to(torch.float16))


def test_threads_argument_sets_torch_threads(tiny_model):
    before = torch.get_num_threads()
    try:
        VisionEncoder(str(tiny_model), device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        VisionEncoder(str(tiny_model), device="cpu", threads=None)     # None leaves the process setting alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_encoder_actors_share_the_node_cores(ray_local):
    assert _encoder_threads(0.0, 1) == 2                              # ray_local: one node with 2 CPUs
    assert _encoder_threads(0.0, 2) == 1
    assert _encoder_threads(0.0, 3) == 1                              # never below one thread
    assert _encoder_threads(1.0, 1) is None                           # GPU actors keep their default


def test_cpu_archive_job_runs_its_encoder_on_the_node_cores_with_sleeping_omp_threads(tmp_path, ray_local, tiny_model,
                                                                                       video_factory):
    seen = tmp_path / "seen.json"

    class Probe(VisionEncoder):                   # defined here, so Ray ships it by value with `seen`
        def __call__(self, batch):
            seen.write_text(json.dumps({"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_WAIT_POLICY")}))
            return super().__call__(batch)

    clip = video_factory("probe.mp4", width=128, height=96, fps=10, seconds=2.0)
    s = load_settings(data_dir=tmp_path / "data", model_path=tiny_model, segment_seconds=2.0,
                      min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40, encoder_token_budget=300)
    report = index_archive([str(clip)], s, Probe, progress=False)
    assert report.exit_code == 0 and report.segments == 1
    assert json.loads(seen.read_text()) == {"threads": 2, "omp": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# ---- encoders kept loaded between jobs (pipeline.encoder_pool) -------------------------------------------------
def _small_job_settings(tmp_path, tiny_model, **overrides):
    return load_settings(data_dir=tmp_path / "data", model_path=tiny_model, segment_seconds=2.0,
                         min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40, encoder_token_budget=300, **overrides)


def _pid_recording_encoder(log):
    class Recorder(VisionEncoder):                # defined here, so Ray ships it by value with `log`
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with open(log, "a") as f:
                f.write(f"init {os.getpid()}\n")

        def __call__(self, batch):
            with open(log, "a") as f:
                f.write(f"call {os.getpid()}\n")
            return super().__call__(batch)

    return Recorder


def _log_lines(log) -> list[tuple[str, int]]:
    return [(kind, int(pid)) for kind, pid in (line.split() for line in log.read_text().splitlines())]


def test_a_second_job_finds_the_encoder_the_first_left_loaded(tmp_path, ray_local, tiny_model, video_factory):
    log = tmp_path / "encoder.log"
    encoder_cls = _pid_recording_encoder(log)
    s = _small_job_settings(tmp_path, tiny_model)
    for i in range(2):
        clip = video_factory(f"cam{i}.mp4", width=128, height=96, fps=10, seconds=4.0)
        report = index_archive([str(clip)], s, encoder_cls, progress=False)
        assert report.exit_code == 0 and report.segments == 2
    lines = _log_lines(log)
    assert [kind for kind, _ in lines if kind == "init"] == ["init"]          # loaded once
    assert len({pid for _, pid in lines}) == 1 and [kind for kind, _ in lines].count("call") >= 2


def test_without_keepalive_each_job_starts_and_ends_its_own_encoder(tmp_path, ray_local, tiny_model, video_factory):
    log = tmp_path / "encoder.log"
    encoder_cls = _pid_recording_encoder(log)
    s = _small_job_settings(tmp_path, tiny_model, encoder_keepalive_seconds=0)
    for i in range(2):
        clip = video_factory(f"cam{i}.mp4", width=128, height=96, fps=10, seconds=2.0)
        assert index_archive([str(clip)], s, encoder_cls, progress=False).segments == 1
    inits = [pid for kind, pid in _log_lines(log) if kind == "init"]
    assert len(inits) == 2 and inits[0] != inits[1]


def test_an_idle_encoder_ends_itself_and_the_next_job_starts_another(tmp_path, ray_local, tiny_model, video_factory):
    import ray

    from pipeline.archive import JobPlan, encoder_pool

    log = tmp_path / "encoder.log"
    encoder_cls = _pid_recording_encoder(log)
    s = _small_job_settings(tmp_path, tiny_model, encoder_keepalive_seconds=1)
    clip = video_factory("cam.mp4", width=128, height=96, fps=10, seconds=2.0)
    assert index_archive([str(clip)], s, encoder_cls, progress=False).segments == 1
    pool = encoder_pool(JobPlan([], [], [], {}, str(tiny_model), {}), s, encoder_cls)   # finds the loaded actor
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            ray.get(pool.actors[0].__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the idle encoder did not end itself")
    clip2 = video_factory("cam2.mp4", width=128, height=96, fps=10, seconds=2.0)
    assert index_archive([str(clip2)], s, encoder_cls, progress=False).segments == 1
    inits = [pid for kind, pid in _log_lines(log) if kind == "init"]
    assert len(inits) == 2


def test_an_encoder_that_dies_is_replaced_and_its_block_encoded_again(tmp_path, ray_local, tiny_model, video_factory):
    import ray

    from pipeline.archive import decoded_segments, encoder_pool, plan_job
    from pipeline.index import SegmentIndex

    log = tmp_path / "encoder.log"
    encoder_cls = _pid_recording_encoder(log)
    s = _small_job_settings(tmp_path, tiny_model, encoder_keepalive_seconds=0)
    clip = video_factory("cam.mp4", width=128, height=96, fps=10, seconds=4.0)
    plan = plan_job([str(clip)], s, SegmentIndex(s.index_root))
    pool = encoder_pool(plan, s, encoder_cls)
    ray.get(pool.actors[0].__ray_ready__.remote())
    first = pool.actors[0]
    ray.kill(first)
    try:
        batches = list(pool.encode_bundles(decoded_segments(plan, s).iter_internal_ref_bundles(), 8))
    finally:
        pool.release()
    assert pool.actors[0] is not first
    assert sorted(str(sid) for b in batches for sid in b["segment_id"]) == ["cam:0", "cam:2000"]
    assert all(len(tok) for b in batches for tok in b["tokens"])


def test_decoded_blocks_are_a_few_segments_without_touching_the_global_data_context(tmp_path, ray_local, tiny_model,
                                                                                    video_factory):
    from ray.data import DataContext

    from pipeline.archive import DECODED_BLOCK_BYTES, decoded_segments, plan_job
    from pipeline.index import SegmentIndex

    before = DataContext.get_current().target_max_block_size
    s = _small_job_settings(tmp_path, tiny_model)
    clip = video_factory("cam.mp4", width=128, height=96, fps=10, seconds=2.0)
    ds = decoded_segments(plan_job([str(clip)], s, SegmentIndex(s.index_root)), s)
    assert ds.context.target_max_block_size == DECODED_BLOCK_BYTES < 128 << 20
    assert DataContext.get_current().target_max_block_size == before
    assert [str(r["segment_id"]) for r in ds.take_all()] == ["cam:0"]
