"""GPU paths (skipped where no CUDA device is visible): the model against transformers 4.57.6 on the same device,
the Decoder against the CPU decoder, the encoder actor against the CPU encoder.

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


# ---- the decoder deployment's model path on the GPU ---------------------------------------------------------------

def _frames(seconds: float, shift: int) -> list:
    """(time, uint8 frame) pairs at 2 fps of a moving gradient, already at a 28-multiple size (no decoder needed)."""
    import numpy as np

    ys, xs = np.mgrid[0:112, 0:168]
    return [(k / 2.0, np.stack([(xs * 2 + 9 * k + shift) % 256, (ys * 3 + shift) % 256, (xs + ys + 5 * k) % 256],
                                -1).astype(np.uint8)) for k in range(int(seconds * 2))]


@torch.no_grad()
def test_decoder_on_cuda_answers_and_ranks_like_on_cpu(tmp_path):
    """Prompt building, temporal M-RoPE positions, the prefix KV cache, the exact greedy head and search, all on the
    GPU, give the CPU decoder's answers (TF32 off: both are fp32 to summation order)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from deploy.decoder import Decoder
    from pipeline.checkpoints import model_id
    from pipeline.index import SegmentIndex
    from pipeline.records import IndexedSegment
    from pipeline.settings import load_settings
    from pipeline.tubes import tubes_from_segment
    from pipeline.video.segments import segment_frames
    from tests.reference import answering_checkpoint

    ckpt = answering_checkpoint(tmp_path / "tiny")
    model, mid = qwen2vl.load_pretrained(ckpt), model_id(ckpt)
    index = SegmentIndex(tmp_path / "index")
    for source, shift, offset in (("cam1", 0, 0.0), ("cam1", 0, 100.0), ("cam2", 77, 0.0)):
        records = []
        for seg in segment_frames(source, [(t + offset, f) for t, f in _frames(6.0, shift)], segment_seconds=2.0,
                                  fps=2.0):
            tubes = tubes_from_segment(seg)
            tokens = model.visual(torch.as_tensor(tubes.pixel_rows), torch.tensor([tubes.grid_thw])).half()
            records.append(IndexedSegment(segment_id=seg.segment_id, source_id=source, t0=seg.t0, t1=seg.t1,
                                          grid_thw=tubes.grid_thw, tube_ts=tubes.tube_ts, tokens=tokens,
                                          model_id=mid))
        index.add(records)
    settings = load_settings(data_dir=tmp_path / "data", model_path=ckpt)
    cpu = Decoder(settings, ckpt, index=index, device="cpu")
    gpu = Decoder(settings, ckpt, index=index, device="cuda", dtype="float32")
    assert next(gpu.model.parameters()).device.type == "cuda"
    asks = [("What moves in this footage?", ["cam1"], 0.0, 6.0),       # contiguous window
            ("What moves in this footage?", ["cam1"], None, None),     # a 94 s gap
            ("Is anything red?", ["cam1"], None, None),                # same footage, new question: cache hit
            ("What moves in this footage?", ["cam1", "cam2"], None, None)]
    for question, sources, start, end in asks:
        want = cpu.ask(question, sources, start=start, end=end, max_new_tokens=12)
        got = gpu.ask(question, sources, start=start, end=end, max_new_tokens=12)
        assert got["answer"] == want["answer"] and got["answer"], (question, sources, got["answer"], want["answer"])
        assert got["evidence"] == want["evidence"]
        assert got["timings"]["prefix_cache"] == want["timings"]["prefix_cache"]
    assert gpu.stats()["prefix_cache"]["hits"] >= 1
    want = cpu.search("a moving gradient", ["cam1", "cam2"], limit=20)
    got = gpu.search("a moving gradient", ["cam1", "cam2"], limit=20)
    assert [r["segment_id"] for r in got] == [r["segment_id"] for r in want]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want)) <= 1e-4


@torch.no_grad()
def test_encoder_actor_on_cuda_matches_cpu(tmp_path):
    """The encoder actors' compute on a GPU: uint8 rows normalised on the device, packed batches under a token budget,
    fp16 tokens back on the CPU; fp32 agrees with the CPU encoder to fp16 rounding, bf16 within the tower's bound."""
    from actors.encoder import VisionEncoder

    ckpt = qwen2vl.write_tiny_checkpoint(tmp_path / "tiny")
    grids = [(1, 8, 12), (2, 16, 20), (1, 4, 4), (3, 10, 14), (1, 36, 64)]      # mixed sizes, several batches
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 256, (t * h * w, 1176), generator=gen, dtype=torch.uint8) for t, h, w in grids]
    want = VisionEncoder(str(ckpt), token_budget=600, device="cpu").encode(rows, grids)
    gpu32 = VisionEncoder(str(ckpt), token_budget=600, dtype="float32", device="cuda")
    got = gpu32.encode(rows, grids)
    assert gpu32.stats.batches >= 3 and [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.dtype == torch.float16 and g.device.type == "cpu"
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)        # fp16 storage: one ulp is ~1e-3 relative
    bf16 = VisionEncoder(str(ckpt), token_budget=600, dtype="bfloat16", device="cuda").encode(rows, grids)
    scale = max(w.abs().max().item() for w in want)
    err = max((b.float() - w.float()).abs().max().item() for b, w in zip(bf16, want))
    assert err <= VISION_BF16_TOL * max(1.0, scale), f"bf16 max abs diff {err} at output scale {scale}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@torch.no_grad()
def test_split_over_two_gpus_equals_one_gpu(tmp_path):
    """The decoder's layers over cuda:0 and cuda:1 (qwen2vl/placement.py): each layer's cache on its layer's
    device, logits and greedy tokens equal to the whole model on cuda:0 (same kernels, same summation order)."""
    from qwen2vl.checkpoint import write_tiny_checkpoint, tiny_config
    from qwen2vl.placement import plan_devices

    folder = write_tiny_checkpoint(tmp_path, seed=9, num_hidden_layers=4)
    plan = plan_devices(tiny_config(num_hidden_layers=4), ["cuda:0", "cuda:1"], dtype=torch.float32,
                        visual="cuda:0")
    whole = qwen2vl.load_pretrained(folder, device="cuda:0")
    split = qwen2vl.load_pretrained(folder, device_map=plan)
    assert {p.device.index for p in split.model.layers.parameters()} == {0, 1}
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]], device="cuda:0")
    a, b = whole(ids, use_cache=True), split(ids, use_cache=True)
    assert b.logits.device == torch.device("cuda:1")
    assert torch.equal(a.logits, b.logits.to("cuda:0"))
    on_layer_devices = [plan.layers[i].index for i in range(4)]
    for cache in (b.past_key_values, b.past_key_values.clone(spare=4), b.past_key_values.repeat(2)):
        assert [cache.layer(i)[0].device.index for i in range(4)] == on_layer_devices
    assert torch.equal(whole.generate(ids, max_new_tokens=12), split.generate(ids, max_new_tokens=12))
    # continuous batching over the split model: each layer's slot buffers on its layer's device
    from qwen2vl.batch_cache import SlotCache, decode_step
    hidden = []
    for m in (whole, split):
        slots = SlotCache.for_model(m, max_rows=2)
        for prompt in (ids, ids[:, :5]):
            row, view = slots.add_row(prompt.shape[1] + 1)
            m(prompt, past_key_values=view, use_cache=True, logits_to_keep=1, compute_logits=False)
            slots.adopt(row, view)
        assert [slots._keys[i].device.index for i in range(4)] == ([0] * 4 if m is whole else on_layer_devices)
        hidden.append(decode_step(m, slots, torch.tensor([5, 6], device="cuda:0")).to("cuda:0"))
    assert torch.equal(hidden[0], hidden[1])
