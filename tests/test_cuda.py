"""The model on a CUDA device against transformers 4.57.6 on the same device (skipped where no GPU is visible).

CI has no GPU; these run on a GPU machine with `python -m pytest --noconftest tests/test_cuda.py` (the conftest's
Redis/Ray/video fixtures are not needed here). The tolerances are the CPU tests' own: TF32 is switched off, so both
sides compute in true fp32 and only the summation order differs.
"""
import copy

import pytest
import torch

import qwen2vl
from tests.reference import build_prompt, build_reference_model, left_pad, load_reference, save_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TOL = 1e-4                 # logits, as tests/test_model_parity.py
VISION_BF16_TOL = 2e-2     # as tests/test_vision.py
N_NEW = 16
CUDA = torch.device("cuda")
PROMPTS = {
    "text": [("text", 11)],
    "interleaved": [("text", 2), ("image", (1, 2, 4)), ("text", 1), ("video", (2, 4, 2)), ("image", (1, 6, 2)),
                    ("text", 3)],
    "long_video": [("text", 1), ("video", (8, 2, 2)), ("text", 3)],
    "big_video": [("text", 3), ("video", (8, 16, 20)), ("text", 5)],     # 640 visual tokens, several tiles
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False           # the reference's patch embedding is a Conv3d
    folder = tmp_path_factory.mktemp("cuda")
    save_reference(build_reference_model(seed=3, num_key_value_heads=1, mrope_section=[4, 2, 2]), folder)
    return load_reference(folder).to(CUDA), qwen2vl.load_pretrained(folder, device=CUDA)


def _on_cuda(inputs: dict) -> dict:
    return {k: v.to(CUDA) for k, v in inputs.items()}


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@torch.no_grad()
def test_prefill_logits_match_on_cuda(pair, prompt):
    ref, ours = pair
    inputs = _on_cuda(build_prompt(PROMPTS[prompt], seed=7))
    expected, got = ref(**inputs), ours(**inputs)
    assert got.logits.device.type == "cuda" and got.logits.shape == expected.logits.shape
    diff = (got.logits - expected.logits).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff}"
    assert torch.equal(got.rope_deltas.view(-1).cpu(), expected.rope_deltas.view(-1).cpu())


@torch.no_grad()
def test_left_padded_batch_on_cuda(pair):
    ref, ours = pair
    a = build_prompt([("text", 2), ("video", (2, 4, 4)), ("text", 3), ("image", (1, 2, 2))], seed=1)
    b = build_prompt([("image", (1, 4, 2)), ("text", 6)], seed=2)
    ids, mask = left_pad([a["input_ids"][0], b["input_ids"][0]])
    inputs = _on_cuda(dict(input_ids=ids, attention_mask=mask,
                           pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                           image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
                           pixel_values_videos=a["pixel_values_videos"], video_grid_thw=a["video_grid_thw"]))
    expected, got = ref(**inputs), ours(**inputs)
    keep = inputs["attention_mask"].bool()
    assert (got.logits - expected.logits).abs()[keep].max().item() <= TOL


@pytest.mark.parametrize("prompt", ["text", "interleaved", "big_video"])
@torch.no_grad()
def test_greedy_tokens_equal_reference_generate_on_cuda(pair, prompt):
    ref, ours = pair
    inputs = _on_cuda(build_prompt(PROMPTS[prompt], seed=3))
    expected = ref.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    got = ours.generate(**inputs, max_new_tokens=N_NEW)
    assert torch.equal(got.cpu(), expected[:, inputs["input_ids"].shape[1]:].cpu())


@torch.no_grad()
def test_cuda_logits_equal_cpu_logits(pair, tmp_path):
    """The same checkpoint on both devices: what is indexed on a GPU node and asked on a CPU one agrees."""
    _, ours = pair
    inputs = build_prompt(PROMPTS["interleaved"], seed=9)
    on_cpu = copy.deepcopy(ours).to("cpu")(**inputs).logits
    on_gpu = ours(**_on_cuda(inputs)).logits.cpu()
    assert (on_gpu - on_cpu).abs().max().item() <= TOL


@torch.no_grad()
def test_vision_tower_bf16_on_cuda_close_to_reference_fp32(pair):
    """The encoder actors' GPU setting (bf16; flash-attn varlen when installed, SDPA per slice otherwise)."""
    ref, ours = pair
    grid = torch.tensor([(1, 4, 6), (8, 2, 2), (3, 6, 4), (1, 2, 2), (2, 4, 4)])
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(4)) * 0.5
    expected = ref.model.visual(pixels.to(CUDA), grid_thw=grid.to(CUDA)).float()
    got_fp32 = ours.visual(pixels.to(CUDA), grid.to(CUDA))
    assert (got_fp32 - expected).abs().max().item() <= 1e-4
    tower = copy.deepcopy(ours.visual).to(torch.bfloat16)
    got = tower(pixels.to(CUDA), grid.to(CUDA))
    assert got.dtype == torch.bfloat16 and got.device.type == "cuda"
    scale = expected.abs().max().item()
    err = (got.float() - expected).abs().max().item()
    assert err <= VISION_BF16_TOL * max(1.0, scale), f"bf16 max abs diff {err} at output scale {scale}"
