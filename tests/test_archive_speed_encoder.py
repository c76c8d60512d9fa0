"""Archive-speed changes of the encoder stage: the reused input buffer and the thread count of CPU encoder actors."""
from __future__ import annotations

import json
import os

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
