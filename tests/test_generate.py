"""Generation: greedy tokens equal transformers 4.57.6 generate; KV-cache prefix reuse; streaming; sampling."""
import pytest
import torch

import qwen2vl
from tests.reference import build_prompt, build_reference_model, left_pad, load_reference, save_reference

N_NEW = 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    save_reference(build_reference_model(seed=11, num_key_value_heads=1, mrope_section=[4, 2, 2]), folder)
    return load_reference(folder), qwen2vl.load_pretrained(folder)


def _video_prompt(seed=3):
    return build_prompt([("text", 3), ("video", (4, 4, 4)), ("text", 5)], seed=seed)


def test_stop_ids_come_from_generation_config(pair):
    ref, ours = pair
    eos = ref.generation_config.eos_token_id
    assert ours.generation_config.eos_token_id == ([eos] if isinstance(eos, int) else list(eos))


@torch.no_grad()
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_reference_text_and_video(pair, penalty):
    ref, ours = pair
    for inputs in (build_prompt([("text", 9)], seed=1), _video_prompt()):
        expected = ref.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, repetition_penalty=penalty)
        got = ours.generate(**inputs, max_new_tokens=N_NEW, repetition_penalty=penalty)
        assert got.shape == (1, N_NEW)
        assert torch.equal(got, expected[:, inputs["input_ids"].shape[1]:])


@torch.no_grad()
def test_greedy_matches_reference_left_padded_batch(pair):
    ref, ours = pair
    a = build_prompt([("text", 2), ("image", (1, 4, 4)), ("text", 6)], seed=4)
    b = build_prompt([("text", 1), ("image", (1, 2, 2)), ("text", 2)], seed=5)
    ids, mask = left_pad([a["input_ids"][0], b["input_ids"][0]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                  image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]))
    expected = ref.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    got = ours.generate(**inputs, max_new_tokens=N_NEW)
    assert torch.equal(got, expected[:, ids.shape[1]:])


@torch.no_grad()
def test_prefix_cache_reuse_equals_full_prompt(pair):
    _, ours = pair
    prefix = _video_prompt(seed=8)
    questions = [torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    cached = ours(**prefix, use_cache=True, logits_to_keep=1).past_key_values
    for question in questions:
        full_ids = torch.cat([prefix["input_ids"], question[None]], dim=1)
        full = {**prefix, "input_ids": full_ids}
        full_logits = ours(**full).logits[:, -question.shape[0]:]
        cache = cached.clone()
        step = ours(question[None], past_key_values=cache)
        assert (step.logits - full_logits).abs().max() <= 1e-4
        assert cache.seq_len == full_ids.shape[1]
        expected = ours.generate(**full, max_new_tokens=8)
        assert torch.equal(ours.generate(question[None], past_key_values=cached.clone(), max_new_tokens=8), expected)
        roomy = cached.clone(spare=question.shape[0] + 8)           # grows in place: no copy while answering
        buffer = roomy.layer(0)[0].data_ptr()
        assert torch.equal(ours.generate(question[None], past_key_values=roomy, max_new_tokens=8), expected)
        assert roomy.layer(0)[0].data_ptr() == buffer
        reused = cached.clone(spare=8, into=roomy)                   # a scratch cache: its big buffers are reused
        assert reused is roomy and reused.layer(0)[0].data_ptr() == buffer
        assert reused.seq_len == cached.seq_len
        assert torch.equal(ours.generate(question[None], past_key_values=reused, max_new_tokens=8), expected)
    assert cached.seq_len == prefix["input_ids"].shape[1]          # the clones left the prefix untouched
    small = type(cached)(cached.num_layers)
    small.append(0, *[t[:, :, :1].clone() for t in cached.layer(0)])
    grown = cached.clone(into=small)                                  # too small: fresh buffers, same content
    assert grown is small and torch.equal(grown.layer(0)[0], cached.layer(0)[0])
    with pytest.raises(ValueError, match="1-layer"):
        cached.clone(into=type(cached)(1))


@torch.no_grad()
def test_streamers_see_every_token(pair):
    _, ours = pair
    inputs = build_prompt([("text", 6)], seed=2)
    seen = []
    got = ours.generate(**inputs, max_new_tokens=5, streamer=lambda tok: seen.append(tok.clone()))
    assert torch.equal(torch.stack(seen, 1), got)
    stream = qwen2vl.TokenIteratorStreamer()
    got = ours.generate(**inputs, max_new_tokens=5, streamer=stream)
    assert torch.equal(torch.stack(list(stream), 1), got)


@torch.no_grad()
def test_stop_id_ends_generation_and_pads_finished_rows(pair):
    _, ours = pair
    inputs = build_prompt([("text", 6)], seed=2)
    free = ours.generate(**inputs, max_new_tokens=6)
    row = free[0].tolist()
    k = next(i for i in range(1, 6) if row[i] not in row[:i])      # pretend this token is a stop id
    got = ours.generate(**inputs, max_new_tokens=6, eos_token_id=row[k])
    assert torch.equal(got, free[:, :k + 1])
    # A batch: row 0 stops at once and is padded while row 1 goes on.
    ids = torch.cat([inputs["input_ids"], build_prompt([("text", 6)], seed=12)["input_ids"]])
    free = ours.generate(ids, max_new_tokens=6)
    stop = int(free[0, 0])
    rest = free[1].tolist()
    n = rest.index(stop) + 1 if stop in rest else 6
    got = ours.generate(ids, max_new_tokens=6, eos_token_id=stop)
    assert torch.equal(got[1], free[1, :n])
    assert got[0, 0] == stop and torch.all(got[0, 1:] == ours.generation_config.pad_token_id)


@torch.no_grad()
def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, ours = pair
    inputs = build_prompt([("text", 6)], seed=2)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    first = ours.generate(**inputs, generator=torch.Generator().manual_seed(0), **kw)
    again = ours.generate(**inputs, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(first, again)
    greedy = ours.generate(**inputs, max_new_tokens=8)
    top1 = ours.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1,
                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, greedy)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(**inputs, max_new_tokens=2, do_sample=True, top_p=0.0)


@torch.no_grad()
def test_explicit_positions_and_temporal_ids(pair):
    _, ours = pair
    inputs = _video_prompt(seed=6)
    default = ours.generate(**inputs, max_new_tokens=6)
    pos, deltas = qwen2vl.get_rope_index(inputs["input_ids"], None, inputs["video_grid_thw"], config=ours.config)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=6, position_ids=pos, rope_deltas=deltas), default)
    # Tubes placed with a gap (docs/model.md §8): positions change; decoding continues after the larger max position.
    gapped, gapped_deltas = qwen2vl.get_rope_index(inputs["input_ids"], None, inputs["video_grid_thw"],
                                                   config=ours.config, video_temporal_ids=[torch.tensor([0, 1, 5, 6])])
    assert int(gapped_deltas) == int(deltas) + 3                    # temporal extent 7 instead of 4 (spatial 2)
    out = ours(**inputs, position_ids=gapped, rope_deltas=gapped_deltas, use_cache=True, logits_to_keep=1)
    assert torch.equal(out.rope_deltas, gapped_deltas)
    assert not torch.allclose(out.logits, ours(**inputs, logits_to_keep=1).logits)
    tokens = ours.generate(**inputs, max_new_tokens=6, position_ids=gapped, rope_deltas=gapped_deltas)
    assert tokens.shape == (1, 6)


@torch.no_grad()
def test_cache_extension_with_a_new_visual_block(pair):
    # Prefix (text + video) cached, then a chunk with its own image: same logits as the whole prompt at once.
    _, ours = pair
    whole = build_prompt([("text", 2), ("video", (2, 4, 4)), ("text", 3), ("image", (1, 4, 2)), ("text", 2)], seed=9)
    split = 2 + 1 + 8 + 1 + 3                                         # tokens through the first text after the video
    n_video_rows = 2 * 4 * 4
    cache = ours(whole["input_ids"][:, :split], pixel_values_videos=whole["pixel_values_videos"][:n_video_rows],
                 video_grid_thw=whole["video_grid_thw"], use_cache=True, logits_to_keep=1).past_key_values
    chunk = ours(whole["input_ids"][:, split:], pixel_values=whole["pixel_values"],
                 image_grid_thw=whole["image_grid_thw"], past_key_values=cache)
    full = ours(**whole)
    assert (chunk.logits - full.logits[:, split:]).abs().max() <= 1e-4
    assert torch.equal(chunk.rope_deltas, full.rope_deltas)


@torch.no_grad()
def test_cache_repeat_and_crop(pair):
    _, ours = pair
    prefix = _video_prompt(seed=10)
    cache = ours(**prefix, use_cache=True, logits_to_keep=1).past_key_values
    questions = torch.randint(0, 5000, (2, 5), generator=torch.Generator().manual_seed(3))
    batched = ours(questions, past_key_values=cache.repeat(2)).logits           # one prefix, two questions
    for row in range(2):
        alone = ours(questions[row:row + 1], past_key_values=cache.clone()).logits
        assert (batched[row] - alone[0]).abs().max() <= 1e-4
    k_before, _ = cache.layer(0)
    k_before = k_before.clone()
    ours(questions[:1], past_key_values=cache)                                    # extend in place ...
    assert cache.seq_len == prefix["input_ids"].shape[1] + 5
    cache.crop(prefix["input_ids"].shape[1])                                      # ... and drop the question again
    assert torch.equal(cache.layer(0)[0], k_before)
    again = ours(questions[:1], past_key_values=cache).logits
    assert (again[0] - batched[0]).abs().max() <= 1e-4


def test_generation_config_sampling_fields_are_read(tmp_path):
    """The released Qwen2-VL generation_config.json (its fields and values): sampling advice and the penalty are
    kept for answers; a field of the wrong type is an error naming it."""
    import json

    from qwen2vl.checkpoint import read_generation_config, tiny_config

    released = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                "repetition_penalty": 1.05, "temperature": 0.01, "top_p": 0.001, "top_k": 1,
                "transformers_version": "4.41.2"}
    (tmp_path / "generation_config.json").write_text(json.dumps(released))
    got = read_generation_config(tmp_path, tiny_config())
    assert (got.eos_token_id, got.pad_token_id, got.do_sample, got.temperature, got.top_p, got.top_k,
            got.repetition_penalty, got.max_new_tokens) == ([151645, 151643], 151643, True, 0.01, 0.001, 1, 1.05, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({**released, "top_k": "1"}))
    with pytest.raises(ValueError, match="top_k must be a int"):
        read_generation_config(tmp_path, tiny_config())
