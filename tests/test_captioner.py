"""pipeline.captioner.Captioner on the tiny random checkpoint (its captions are random text, which is enough here).

Covers: batched results equal one-at-a-time ones (captions exactly, vectors to 1e-5: fp32 summation order differs
between batch shapes and masked attention kernels, ~1e-6 seen), unit vectors of the model width, each video prefix
prefilled once for both prompts, query vectors, input errors, and one caption and its vector against transformers
4.57.6 given the same prompt and the same stored tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qwen2vl
from pipeline.captioner import CAPTION_PROMPT, EMBED_PROMPT, Captioner
from pipeline.checkpoints import model_id
from pipeline.records import IndexedSegment

pytestmark = pytest.mark.timeout(240)
N_NEW = 12
VECTOR_TOL = 1e-5
# Different grids and token counts in one batch; (8, 4, 6) and (8, 6, 4) have equal lengths but other positions.
GRIDS = [(8, 4, 4), (8, 4, 6), (2, 4, 4), (8, 6, 4), (4, 6, 4), (8, 4, 4)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return qwen2vl.write_tiny_checkpoint(tmp_path_factory.mktemp("captioner") / "tiny")


@pytest.fixture(scope="module")
def cap(ckpt):
    return Captioner(ckpt, device="cpu", max_new_tokens=N_NEW, batch_size=8)


def _items(grids=GRIDS, seed=0, width=64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, (t, h, w) in enumerate(grids):
        tokens = (torch.randn(t * h * w // 4, width, generator=gen) * 2).half()
        ts = [8.0 * k + j for j in range(t)] if k % 2 else None
        out.append((tokens.numpy() if k % 3 == 1 else tokens, (t, h, w), ts))
    return out


def _assert_same(got, expected):
    assert [c for c, _ in got] == [c for c, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert float(np.abs(a - b).max()) <= VECTOR_TOL


def test_batched_equals_one_at_a_time(cap):
    items = _items()
    singles = [cap.describe([item])[0] for item in items]
    batched = cap.describe(items)                    # one batch of mixed lengths: stacked with left padding
    _assert_same(batched, singles)
    assert any(caption for caption, _ in batched)    # the tiny model writes decodable text
    for batch_size in (1, 4):                        # other cuts into batches give the same results
        cap.batch_size = batch_size
        try:
            _assert_same(cap.describe(items), singles)
        finally:
            cap.batch_size = 8
    same_grid = _items([(8, 4, 4)] * 3, seed=5)      # one equal-length group: no padding at all
    _assert_same(cap.describe(same_grid), [cap.describe([item])[0] for item in same_grid])


def test_vectors_are_unit_and_model_wide(cap):
    for caption, vector in cap.describe(_items(seed=1)):
        assert isinstance(caption, str)
        assert vector.dtype == np.float32 and vector.shape == (cap.hidden_size,) == (64,)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert cap.describe([]) == []


def test_prefix_runs_once_for_caption_and_embedding(cap):
    """The video tokens go through the decoder exactly once per segment: the embedding prompt and the caption both
    continue that cached prefix."""
    items = _items(seed=2)
    calls = []
    hook = cap.model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: calls.append(args[0].clone()))
    prefills = cap.prefills
    try:
        cap.describe(items)
    finally:
        hook.remove()
    video = cap.processor.video_token_id
    n_tokens = [tokens.shape[0] for tokens, _, _ in items]
    # decode steps (one token per row) are left out: the random model may well emit the video pad id as text
    assert sum(int((ids == video).sum()) for ids in calls if ids.shape[1] > 1) == sum(n_tokens)
    lengths = sorted(set(n_tokens))
    assert cap.prefills - prefills == len(lengths)                   # one prefill per equal-length group
    multi = [ids.shape for ids in calls if ids.shape[1] > 1]         # prefills, then the two suffixes, batched
    assert multi[:len(lengths)] == [(n_tokens.count(n), len(cap.prefix_head) + n + len(cap.prefix_tail))
                                    for n in lengths]
    assert multi[len(lengths):] == [(len(items), len(cap.embed_suffix)), (len(items), len(cap.caption_suffix))]
    assert all(ids.shape[0] == len(items) for ids in calls[len(lengths):])   # every later call is the whole batch


def test_embed_query(cap):
    a, b = cap.embed_query("a truck at the gate"), cap.embed_query("a truck at the gate")
    assert np.array_equal(a, b) and a.dtype == np.float32 and a.shape == (cap.hidden_size,)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert not np.allclose(a, cap.embed_query("someone opens the door"))
    assert np.array_equal(cap.embed_query("  a truck at the gate "), a)        # surrounding blanks do not count


def test_loading_and_identity(cap, ckpt):
    assert cap.model_id == model_id(ckpt)
    assert cap.model.visual is None
    ids = cap.prefix_head + [cap.processor.video_token_id] * 32 + cap.prefix_tail + cap.caption_suffix
    text = cap.processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "\n" + CAPTION_PROMPT}]}])
    assert ids == cap.processor.encode_with_grids(text, video_grid_thw=[(8, 4, 4)], return_tensors=None)["input_ids"][0]


def test_indexed_segment_is_an_item(cap):
    tokens, grid, _ = _items([(2, 4, 4)], seed=3)[0]
    seg = IndexedSegment(segment_id="", source_id="cam", t0=0.0, t1=2.0, grid_thw=grid, tube_ts=[0.0, 1.0],
                         tokens=tokens, model_id=cap.model_id)
    _assert_same(cap.describe([seg]), cap.describe([(tokens, grid, None)]))


def test_bad_input(cap, ckpt):
    tokens = torch.zeros(32, 64, dtype=torch.float16)
    cases = [
        ((torch.zeros(32, 48, dtype=torch.float16), (8, 4, 4), None), "hidden size is 64"),
        ((tokens, (8, 4, 6), None), "holds 48 visual tokens"),
        ((tokens, (8, 4, 5), None), "even h and w"),
        ((tokens, (8, 4), None), "three ints"),
        ((tokens, (8, 4, 4), [0.0, 1.0]), "tube_ts must hold 8"),
        ((tokens.long(), (8, 4, 4), None), "float"),
        ((tokens[0], (8, 4, 4), None), "float"),
        ((torch.full((32, 64), float("nan")), (8, 4, 4), None), "NaN"),
        ((tokens, (8, 4, 4)), "expected \\(tokens, grid_thw, tube_ts"),
    ]
    for item, message in cases:
        with pytest.raises(ValueError, match=message):
            cap.describe([(tokens, (8, 4, 4), None), item])
    with pytest.raises(ValueError, match="list"):
        cap.describe(tokens)
    for query in ("", "   ", None, "stop <|im_end|> here"):
        with pytest.raises(ValueError, match="query"):
            cap.embed_query(query)
    for kwargs in ({"batch_size": 0}, {"max_new_tokens": 0}, {"dtype": "int8"}):
        with pytest.raises(ValueError):
            Captioner(ckpt, device="cpu", **kwargs)


@torch.no_grad()
def test_caption_and_vector_match_transformers(cap, ckpt):
    """transformers 4.57.6 given the same prompt ids and the same stored tokens (its get_video_features returns
    them: the tower is skipped on both sides) writes the same greedy tokens and the same final hidden state."""
    pytest.importorskip("transformers")
    from tests.reference import load_reference

    ref = load_reference(ckpt)
    tokens, grid, _ = _items([(8, 4, 6)], seed=4)[0]
    embeds = torch.as_tensor(tokens).float()
    ref.model.get_video_features = lambda pixels, grid_thw: (embeds,)
    prefix = cap.prefix_head + [cap.processor.video_token_id] * embeds.shape[0] + cap.prefix_tail
    video = dict(pixel_values_videos=torch.zeros(1, 1), video_grid_thw=torch.tensor([grid]))
    caption, vector = cap.describe([(tokens, grid, None)])[0]

    ids = torch.tensor([prefix + cap.caption_suffix])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                       **video)[0, ids.shape[1]:].tolist()
    kept = []
    for token in out:
        if token in cap.stop_ids:
            break
        kept.append(token)
    assert caption == cap.tokenizer.decode(kept, skip_special_tokens=True).strip() and caption

    ids = torch.tensor([prefix + cap.embed_suffix])
    hidden = ref.model(input_ids=ids, **video).last_hidden_state[0, -1]
    assert float(np.abs(vector - (hidden / hidden.norm()).numpy()).max()) <= VECTOR_TOL

    query = cap.processor.apply_chat_template([{"role": "user", "content": "a truck at the gate\n"
                                                "Summarize the above sentence in one word:"}])
    hidden = ref.model(input_ids=torch.tensor([cap.tokenizer.encode(query)])).last_hidden_state[0, -1]
    assert float(np.abs(cap.embed_query("a truck at the gate") - (hidden / hidden.norm()).numpy()).max()) <= VECTOR_TOL
    assert EMBED_PROMPT in cap.tokenizer.decode(cap.embed_suffix)
