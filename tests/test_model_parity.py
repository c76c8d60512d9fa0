"""Prefill logits of our Qwen2VL vs transformers 4.57.6 (eager, fp32) on tiny perturbed checkpoints.

Each checkpoint variant is saved by the reference's save_pretrained and read by our load_pretrained; the variants
cover M-RoPE sections, head dims, GQA ratios, rope theta, tied/untied, sharded files, bf16 files and the newer
`model.visual.*` / `model.language_model.*` names.
"""
import pytest
import torch

import qwen2vl
from tests.reference import build_prompt, build_reference_model, left_pad, load_reference, save_reference

TOL = 1e-4
VARIANTS = {
    "base": dict(text={}, save={}),
    "gqa4_theta1e4_tied_sharded": dict(
        text=dict(num_attention_heads=8, num_key_value_heads=2, mrope_section=[1, 1, 2], rope_theta=1e4,
                  tie_word_embeddings=True),
        save=dict(max_shard_size="5MB")),
    "mha_wide_heads_newnames": dict(
        text=dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=2, mrope_section=[8, 8, 8]),
        vision=dict(embed_dim=48, num_heads=3), save=dict(naming="new")),
    "bf16_tied_newnames_sharded": dict(
        text=dict(num_key_value_heads=1, mrope_section=[4, 2, 2], tie_word_embeddings=True),
        save=dict(dtype=torch.bfloat16, naming="new", max_shard_size="10MB")),
}
PROMPTS = {
    "text": [("text", 11)],
    "image": [("text", 3), ("image", (1, 4, 6)), ("text", 5)],
    "video": [("text", 2), ("video", (3, 4, 4)), ("text", 4)],
    "interleaved": [("text", 2), ("image", (1, 2, 4)), ("text", 1), ("video", (2, 4, 2)), ("image", (1, 6, 2)),
                    ("text", 3)],
    "long_video": [("text", 1), ("video", (8, 2, 2)), ("text", 3)],     # temporal extent > spatial extent
}


# Every prompt on the base variant; the prompts that exercise the most (all modalities, a long video) on the others.
CASES = [("base", p) for p in PROMPTS] + [(v, p) for v in VARIANTS if v != "base" for p in ("interleaved", "long_video")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """variant name -> (reference model, our model), built once per variant."""
    built = {}

    def get(name):
        if name not in built:
            spec = VARIANTS[name]
            folder = tmp_path_factory.mktemp(name)
            model = build_reference_model(seed=3, vision=spec.get("vision"), **spec["text"])
            save_reference(model, folder, **spec["save"])
            built[name] = load_reference(folder), qwen2vl.load_pretrained(folder)
        return built[name]
    return get


@pytest.fixture
def pair(pairs):
    return pairs("base")


def _max_diff(a, b, mask=None):
    diff = (a - b).abs()
    return float(diff[mask.bool()].max() if mask is not None else diff.max())


@pytest.mark.parametrize("variant, prompt", CASES)
@torch.no_grad()
def test_prefill_logits_match(pairs, variant, prompt):
    ref, ours = pairs(variant)
    inputs = build_prompt(PROMPTS[prompt], seed=7)
    expected = ref(**inputs)
    got = ours(**inputs)
    assert got.logits.shape == expected.logits.shape
    assert _max_diff(got.logits, expected.logits) <= TOL
    assert torch.equal(got.rope_deltas.view(-1), expected.rope_deltas.view(-1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_left_padded_batch(pairs, variant):
    ref, ours = pairs(variant)
    a = build_prompt([("text", 2), ("video", (2, 4, 4)), ("text", 3), ("image", (1, 2, 2))], seed=1)
    b = build_prompt([("image", (1, 4, 2)), ("text", 6)], seed=2)
    ids, mask = left_pad([a["input_ids"][0], b["input_ids"][0]])
    inputs = dict(input_ids=ids, attention_mask=mask,
                  pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                  image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
                  pixel_values_videos=a["pixel_values_videos"], video_grid_thw=a["video_grid_thw"])
    expected, got = ref(**inputs), ours(**inputs)
    assert _max_diff(got.logits, expected.logits, mask) <= TOL
    assert torch.equal(got.rope_deltas.view(-1), expected.rope_deltas.view(-1))


@torch.no_grad()
def test_visual_tokens_instead_of_pixels(pair):
    _, ours = pair
    inputs = build_prompt(PROMPTS["interleaved"], seed=5)
    from_pixels = ours(**inputs).logits
    image_embeds = ours.encode_visual(inputs["pixel_values"], inputs["image_grid_thw"])
    video_embeds = ours.encode_visual(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    from_tokens = ours(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                       video_grid_thw=inputs["video_grid_thw"], image_embeds=image_embeds,
                       video_embeds=video_embeds).logits
    assert torch.equal(from_pixels, from_tokens)


@torch.no_grad()
def test_logits_to_keep_is_the_tail(pair):
    _, ours = pair
    inputs = build_prompt(PROMPTS["video"], seed=4)
    full = ours(**inputs).logits
    tail = ours(**inputs, logits_to_keep=3).logits
    assert tail.shape[1] == 3
    assert (tail - full[:, -3:]).abs().max() <= 1e-5            # same rows; only the GEMM blocking differs


def test_placeholder_count_mismatch_raises(pair):
    _, ours = pair
    inputs = build_prompt(PROMPTS["image"], seed=6)
    one_short = inputs["pixel_values"][:20]                # grid (1, 2, 10): 5 visual tokens for 6 image pads
    with pytest.raises(ValueError, match="placeholders do not match"):
        ours(inputs["input_ids"], pixel_values=one_short, image_grid_thw=torch.tensor([[1, 2, 10]]))
    embeds = torch.zeros(5, ours.config.text.hidden_size)                 # prompt has 6 image pads
    with pytest.raises(ValueError, match="5 visual tokens but 6"):
        ours(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], image_embeds=embeds)
    with pytest.raises(ValueError, match="no image pixels or image_embeds"):
        ours(inputs["input_ids"])
    with pytest.raises(ValueError, match="image_grid_thw given without"):
        ours(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"])


@pytest.mark.parametrize("prompt", [[("text", 11)], [("text", 600), ("image", (1, 2, 4)), ("text", 3),
                                                 ("video", (4, 4, 2)), ("text", 3)]], ids=["short", "positions_past_512"])
@torch.no_grad()
def test_bf16_weights_load_directly_and_round_like_the_reference_in_bf16(tmp_path, prompt):
    """decoder_dtype / encoder_dtype = bfloat16: weights go straight from the file to bf16 tensors, and the whole
    model (tower, decoder, M-RoPE over image and video) lands no further from the fp32 logits than transformers
    4.57.6 run in bf16 does (the criterion tests/test_vision.py applies to the tower in bf16). Two bf16 runs differ
    from each other by about their own rounding (here ~0.01 mean, ~0.1 max at logits of scale 5), so a bound on their
    mutual difference would only measure bf16; the distance to the exact answer tells a wrong cast from rounding."""
    from transformers import Qwen2VLForConditionalGeneration

    save_reference(build_reference_model(seed=3), tmp_path)
    ours = qwen2vl.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ref16 = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager",
                                                            dtype=torch.bfloat16).eval()
    inputs = build_prompt(prompt, seed=7)        # past 512, positions are no longer exact in bf16
    want = load_reference(tmp_path)(**inputs).logits
    got, ref = ours(**inputs).logits, ref16(**inputs).logits
    assert got.dtype == torch.bfloat16
    ours_err, ref_err = (got.float() - want).abs(), (ref.float() - want).abs()
    assert ours_err.mean() <= 1.1 * ref_err.mean(), (ours_err.mean(), ref_err.mean())
    assert ours_err.max() <= 1.5 * ref_err.max(), (ours_err.max(), ref_err.max())
