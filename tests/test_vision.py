"""Vision tower against the transformers 4.57.6 reference (perturbed weights), plus packing/rotary/error checks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from qwen2vl.config import VisionConfig
from qwen2vl.vision import (VisionRotary, VisionTransformer, plan_tiles, vision_cu_seqlens,
                            vision_rotary_pos_ids)

FP32_TOL = 1e-5
BF16_TOL = 2e-2

# (name, our config, reference attention backend); the second has head_dim 24 and a merger width != embed_dim
CONFIGS = {
    "hd16": (dict(depth=2, embed_dim=64, num_heads=4, hidden_size=96), "eager"),
    "hd24": (dict(depth=2, embed_dim=96, num_heads=4, hidden_size=80), "sdpa"),
}

BATCHES = {
    "one_image": [(1, 6, 8)],
    "odd_aspect_images": [(1, 2, 14), (1, 10, 4), (1, 6, 6), (1, 4, 2), (1, 12, 2)],
    "video": [(5, 4, 6)],
    "mixed_images_videos": [(1, 4, 6), (8, 2, 2), (3, 6, 4), (1, 2, 2), (2, 4, 4), (1, 4, 6)],
}


def _rows(grid) -> int:
    return sum(t * h * w for t, h, w in grid)


def _pixels(grid, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(_rows(grid), 1176, generator=gen)


@torch.no_grad()
def _perturb(module: torch.nn.Module, seed: int) -> None:
    # The reference init zeroes biases and sets norms to 1; noise on every parameter keeps bugs visible.
    # Scale 0.03 keeps the outputs below ~2: bf16 resolution there is <= 0.0078, so a 2e-2 bound means something
    # (at |y| in [2, 4) one bf16 ulp is already 0.0156).
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.03)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def towers(request):
    kw, attn = CONFIGS[request.param]
    ref_cfg = Qwen2VLVisionConfig(**kw)
    ref_cfg._attn_implementation = attn
    ref = Qwen2VisionTransformerPretrainedModel(ref_cfg).eval()
    _perturb(ref, seed=len(request.param))
    ours = VisionTransformer(VisionConfig(**kw)).eval()
    ours.load_state_dict(ref.state_dict())            # strict: names and shapes equal the checkpoint's
    return ref, ours


def test_parameter_names_and_shapes_match_reference(towers):
    ref, ours = towers
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    e = ours.cfg.embed_dim
    assert ours_sd["patch_embed.proj.weight"].shape == (e, 3, 2, 14, 14)
    assert ours_sd["merger.mlp.2.weight"].shape == (ours.cfg.hidden_size, 4 * e)


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_fp32_matches_reference(towers, batch):
    ref, ours = towers
    grid = torch.tensor(BATCHES[batch])
    pixels = _pixels(BATCHES[batch])
    with torch.no_grad():
        expected = ref(pixels, grid)
    for tile_rows in (None, 16, 40):                  # one tile, and many tiles cutting runs of slices
        try:
            ours.tile_rows = tile_rows
            got = ours(pixels, grid)
        finally:
            ours.tile_rows = None
        assert got.shape == (_rows(BATCHES[batch]) // 4, ours.cfg.hidden_size)
        assert got.dtype == torch.float32
        diff = (got - expected).abs().max().item()
        assert diff <= FP32_TOL, f"{batch} tile_rows={tile_rows}: max abs diff {diff}"


def test_bf16_close_to_fp32(towers):
    ref, ours = towers
    grid_list = BATCHES["mixed_images_videos"]
    grid, pixels = torch.tensor(grid_list), _pixels(grid_list, seed=3)
    with torch.no_grad():
        expected = ref(pixels, grid)
        ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(pixels, grid).float()
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    got = ours_bf16(pixels, grid)                    # fp32 rows are cast to the weight dtype
    assert got.dtype == torch.bfloat16
    err = (got.float() - expected).abs()
    assert expected.abs().max() < 2, "keep outputs in the range where the bound is meaningful (see _perturb)"
    assert err.max().item() <= BF16_TOL, f"bf16 max abs diff {err.max().item()}"
    # Rounding like the reference does (fp32 rotary, each branch rounded before the residual add): on average no
    # worse than the reference's own bf16 run.
    ref_err = (ref_bf16 - expected).abs().mean().item()
    assert err.mean().item() <= 1.1 * ref_err, f"mean bf16 error {err.mean().item()} vs reference's {ref_err}"


def test_slices_attend_only_within_themselves(towers):
    """Packed output == each temporal slice encoded alone (cu_seqlens isolation, no cross-item leakage)."""
    _, ours = towers
    grid_list = [(3, 4, 4), (1, 2, 6), (2, 2, 2)]
    pixels = _pixels(grid_list, seed=5)
    packed = ours(pixels, torch.tensor(grid_list))
    alone, row = [], 0
    for t, h, w in grid_list:
        for _ in range(t):
            alone.append(ours(pixels[row:row + h * w], torch.tensor([[1, h, w]])))
            row += h * w
    assert (packed - torch.cat(alone)).abs().max().item() <= FP32_TOL


def test_no_dense_mask_no_conv_and_equal_slices_batched(towers):
    _, ours = towers
    grid_list = [(48, 8, 8), (1, 4, 6), (48, 8, 8)]    # 6168 patches: a dense bool mask alone would be 38 MB
    pixels, grid = _pixels(grid_list), torch.tensor(grid_list)
    n, e = pixels.shape[0], ours.cfg.embed_dim
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ours(pixels, grid)
    events = prof.events()
    biggest = max(ev.cpu_memory_usage for ev in events)
    assert biggest <= n * 4 * e * 4, f"an op allocated {biggest} bytes: more than the widest fp32 activation"
    names = [ev.name for ev in events]
    assert not any("conv" in name for name in names), "patch embedding must be one matmul, not a convolution"
    # All rows fit one tile here: three runs (48 equal slices, 1 image, 48 equal slices) -> 3 SDPA calls per block.
    assert [run[2] for run in plan_tiles(grid_list, 10**9)[0].runs] == [64, 24, 64]
    assert names.count("aten::scaled_dot_product_attention") == 3 * ours.cfg.depth


def test_cu_seqlens_one_segment_per_temporal_slice():
    cu = vision_cu_seqlens(torch.tensor([[1, 32, 48], [4, 20, 30]]))
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 1536, 2136, 2736, 3336, 3936]


def test_rotary_pos_ids_spec_example_and_reference_angles():
    ids = vision_rotary_pos_ids(torch.tensor([[1, 4, 4]]))
    assert ids[:, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert ids[:, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3]

    cfg = Qwen2VLVisionConfig(depth=1, embed_dim=64, num_heads=4, hidden_size=64)
    ref = Qwen2VisionTransformerPretrainedModel(cfg)
    grid = torch.tensor([[2, 4, 6], [1, 10, 2], [3, 2, 2]])
    ref_angles = ref.rot_pos_emb(grid)                       # (N, head_dim/2) fp32
    rotary = VisionRotary(head_dim=16, spatial_merge_size=2)
    rotary.cos_sin(2, 2, torch.device("cpu"))                # a small grid first: the table must grow correctly
    cos, sin = rotary.for_batch([tuple(r) for r in grid.tolist()], torch.device("cpu"))
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_angles.cos(), rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_angles.sin(), rtol=0, atol=0)


def test_rotary_tables_stay_on_cpu_whatever_the_default_device():
    """load_pretrained builds the tower under `with torch.device(device)`; a table made there (on cuda) and grown
    later outside it (on cpu) would fail the first GPU batch (docs/model.md §5). Meta stands in for cuda here."""
    with torch.device("meta"):
        rotary = VisionRotary(head_dim=16, spatial_merge_size=2)
        small = rotary.cos_sin(2, 2, torch.device("cpu"))
    assert rotary.inv_freq.device.type == "cpu" and small[0].device.type == "cpu"
    cos, _ = rotary.for_batch([(1, 8, 12)], torch.device("cpu"))          # grows the table outside the context
    expected = VisionRotary(head_dim=16, spatial_merge_size=2).for_batch([(1, 8, 12)], torch.device("cpu"))[0]
    assert torch.equal(cos, expected)


def test_input_dtype_is_cast_to_weights(towers):
    _, ours = towers
    grid_list = [(1, 4, 4)]
    pixels = _pixels(grid_list)
    got64 = ours(pixels.double(), torch.tensor(grid_list))
    assert got64.dtype == torch.float32
    assert torch.equal(got64, ours(pixels, torch.tensor(grid_list)))


@pytest.mark.parametrize("pixels_shape, grid, message", [
    ((16, 1175), [[1, 4, 4]], "pixel_values must have shape"),
    ((16,), [[1, 4, 4]], "pixel_values must have shape"),
    ((16, 1176), [[1, 4, 6]], "describes 24 patches"),
    ((18, 1176), [[1, 3, 6]], "divisible by spatial_merge_size"),
    ((16, 1176), [[1, 4, 4, 1]], "shape \\[n_items, 3\\]"),
    ((16, 1176), [[0, 4, 4]], ">= 1"),
])
def test_bad_input_raises_clear_error(towers, pixels_shape, grid, message):
    _, ours = towers
    with pytest.raises(ValueError, match=message):
        ours(torch.zeros(pixels_shape), torch.tensor(grid))


def test_float_grid_rejected(towers):
    _, ours = towers
    with pytest.raises(ValueError, match="integer"):
        ours(torch.zeros(16, 1176), torch.tensor([[1.0, 4.0, 4.0]]))
