"""Decoder.ask over a real index of real clips (tiny model tokens), checked against direct qwen2vl generate calls.

Covers: answers equal a direct generate over the same prompt (contiguous and gapped windows), prefix-cache hits
answer like cold runs, concurrent asks over different footage with the same question, narrowing over the token
budget, streaming, errors, hours of footage, and answers landing in Redis.
"""
from __future__ import annotations

import json
import threading

import pytest
import torch

import qwen2vl
from deploy.decoder import Decoder
from deploy.search import REFINE_CAP, SAMPLE_CAP
from pipeline.checkpoints import model_id
from pipeline.events import ANSWERS_STREAM, SEARCHES_STREAM, EventSink
from pipeline.index import SegmentIndex
from pipeline.records import IndexedSegment
from pipeline.settings import load_settings
from qwen2vl.onednn_linear import OneDNNLinear, onednn_available
from tests.reference import answer_text
from tests.test_footage import answering_checkpoint, clip_frames, index_frames

pytestmark = pytest.mark.timeout(120)
QUESTION = "What moves in this footage?"
N_NEW = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("decoder"))


def build_world(root) -> dict:
    """An answering tiny checkpoint and an index of real clips: cam1 at 0..6 s and 100..106 s, cam2 at 0..6 s."""
    ckpt = answering_checkpoint(root / "tiny")
    model = qwen2vl.load_pretrained(ckpt)
    mid = model_id(ckpt)
    index = SegmentIndex(root / "index")
    moving = clip_frames(root, "moving")
    noise = clip_frames(root, "noise", pattern="noise", seed=3)
    index_frames(index, model, mid, "cam1", moving)                      # 0..6 s contiguous
    index_frames(index, model, mid, "cam1", moving, offset=100.0)        # 100..106 s: a 94 s gap
    index_frames(index, model, mid, "cam2", noise)
    return {"root": root, "ckpt": ckpt, "model": model, "mid": mid, "index": index,
            "processor": qwen2vl.Processor.from_pretrained(ckpt)}


def _decoder(world, tmp_path, events=None, **settings):
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"], **settings)
    return Decoder(s, world["ckpt"], index=world["index"], events=events)


def _direct_inputs(world, labels: list[str], segments: list[list[str]], question: str, temporal=None) -> dict:
    """Model inputs of a prompt written out here by hand: labels, videos of the stored tokens, question."""
    content = []
    for label in labels:
        content += [{"type": "text", "text": label}, {"type": "video"}]
    content.append({"type": "text", "text": "\n" + question})
    proc, index = world["processor"], world["index"]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    grids = []
    for segs in segments:
        rows = [index.get(s) for s in segs]
        grids.append((sum(r.grid_thw[0] for r in rows), *rows[0].grid_thw[1:]))
    grid = torch.tensor(grids)
    ids = proc.encode_with_grids(text, video_grid_thw=grid)["input_ids"]
    embeds = torch.cat([index.tokens(s) for segs in segments for s in segs]).float()
    inputs = {"input_ids": ids, "video_embeds": embeds, "video_grid_thw": grid}
    if temporal is not None:
        inputs["position_ids"], inputs["rope_deltas"] = qwen2vl.get_rope_index(
            ids, None, grid, video_temporal_ids=[torch.tensor(t) for t in temporal])
    return inputs


@torch.no_grad()
def _direct_answer(world, labels, segments, question, temporal=None) -> str:
    inputs = _direct_inputs(world, labels, segments, question, temporal)
    return answer_text(world["model"], world["processor"], world["model"].generate(**inputs, max_new_tokens=N_NEW)[0])


def test_answer_equals_direct_generate_contiguous_window(world, tmp_path):
    dec = _decoder(world, tmp_path)
    pieces = []
    result = dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=N_NEW, on_token=pieces.append)
    expected = _direct_answer(world, ["[source cam1, 0:00:00-0:00:06]"], [["cam1:0", "cam1:2000", "cam1:4000"]],
                              QUESTION)
    assert result["answer"] == expected and len(expected) > 0
    assert "".join(pieces) == result["answer"] and len(pieces) > 1                  # streamed piece by piece
    assert dec.images.tower_runs == 0                         # footage answers come from stored tokens only
    fast = [m for m in dec.model.model.layers.modules() if isinstance(m, OneDNNLinear)]
    assert len(fast) == (7 * len(dec.model.model.layers) if onednn_available() else 0)     # the answer came from them
    assert result["model"] == world["mid"] and result["narrowed"] is False and result["stream_entry"] is None
    assert [e["segment_id"] for e in result["evidence"]] == ["cam1:0", "cam1:2000", "cam1:4000"]
    assert result["evidence"][0] == {"source": "cam1", "segment_id": "cam1:0", "t0": 0.0, "t1": 2.0, "tier": "full",
                                     "start": "0:00", "end": "0:02"}
    assert result["plan"]["kind"] == "full" and result["plan"]["tubes"] == 6
    t = result["timings"]
    assert t["prefix_cache"] == "miss" and t["visual_tokens"] == 3 * 36 and 0 < t["new_tokens"] <= N_NEW
    assert t["prompt_tokens"] > t["visual_tokens"]
    assert 0 < t["select_s"] <= t["ttft_s"] <= t["total_s"] and t["decode_s"] >= 0 and t["prefill_s"] > 0


def test_answer_equals_direct_generate_gapped_window(world, tmp_path):
    dec = _decoder(world, tmp_path, max_gap_seconds=30.0)
    result = dec.ask(QUESTION, ["cam1"], max_new_tokens=N_NEW)
    segs = ["cam1:0", "cam1:2000", "cam1:4000", "cam1:100000", "cam1:102000", "cam1:104000"]
    # tubes at 0..5 s and 100..105 s; the 94 s gap after the tube ending at 6 s is shortened to 30 s
    temporal = [list(range(6)) + [36 + k for k in range(6)]]
    expected = _direct_answer(world, ["[source cam1, 0:00:00-0:00:06, 0:01:40-0:01:46]"], [segs], QUESTION,
                              temporal=temporal)
    assert result["answer"] == expected
    assert [e["segment_id"] for e in result["evidence"]] == segs
    # The cached video prefix holds the KV of the gapped positions, not of the reference's plain ones (the tiny
    # random model's answer text barely depends on positions, its keys do).
    [key] = dec.prefix_cache.keys()
    cached = dec.prefix_cache.get(key)
    n = cached.seq_len
    label = ["[source cam1, 0:00:00-0:00:06, 0:01:40-0:01:46]"]
    gapped = _direct_inputs(world, label, [segs], QUESTION, temporal=temporal)
    plain = _direct_inputs(world, label, [segs], QUESTION)
    assert int(gapped["input_ids"][0, n - 1]) == world["processor"].tokenizer.vision_end_id
    with torch.no_grad():
        kv_gapped = world["model"](gapped["input_ids"][:, :n], video_embeds=gapped["video_embeds"],
                                   position_ids=gapped["position_ids"][:, :, :n], use_cache=True).past_key_values
        kv_plain = world["model"](plain["input_ids"][:, :n], video_embeds=plain["video_embeds"],
                                  video_grid_thw=plain["video_grid_thw"], use_cache=True).past_key_values
    for layer in range(cached.num_layers):
        torch.testing.assert_close(cached.layer(layer)[0], kv_gapped.layer(layer)[0], atol=1e-5, rtol=1e-5)
    assert (cached.layer(1)[0] - kv_plain.layer(1)[0]).abs().max() > 1e-2


def test_cached_prefix_answers_like_a_cold_run(world, tmp_path):
    warm = _decoder(world, tmp_path)
    first = warm.ask(QUESTION, ["cam1", "cam2"], 0.0, 6.0, max_new_tokens=N_NEW)
    second = warm.ask("Is anything white?", ["cam1", "cam2"], 0.0, 6.0, max_new_tokens=N_NEW)
    cold = _decoder(world, tmp_path).ask("Is anything white?", ["cam1", "cam2"], 0.0, 6.0, max_new_tokens=N_NEW)
    assert first["timings"]["prefix_cache"] == "miss" and second["timings"]["prefix_cache"] == "hit"
    assert cold["timings"]["prefix_cache"] == "miss"
    assert second["answer"] == cold["answer"] and second["evidence"] == cold["evidence"]
    assert second["answer"] != first["answer"]                       # the question text is not part of the key
    stats = warm.stats()
    assert stats["prefix_cache"]["hits"] == 1 and stats["prefix_cache"]["entries"] == 1 and stats["asks"] == 2
    assert stats["prefix_cache"]["bytes"] > 0


def test_concurrent_asks_over_different_footage_same_question(world, tmp_path):
    sequential = {src: _decoder(world, tmp_path).ask(QUESTION, [src], 0.0, 6.0, max_new_tokens=N_NEW)["answer"]
                  for src in ("cam1", "cam2")}
    assert sequential["cam1"] != sequential["cam2"]                  # otherwise a mix-up could not show
    dec = _decoder(world, tmp_path)
    jobs = ["cam1", "cam2"] * 3
    answers: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        answers[i] = dec.ask(QUESTION, [jobs[i]], 0.0, 6.0, max_new_tokens=N_NEW)["answer"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [sequential[src] for src in jobs]
    stats = dec.stats()["prefix_cache"]
    assert stats["entries"] == 2 and stats["misses"] == 2 and stats["hits"] == 4     # each prefix prefilled once


def test_narrowing_over_budget_uses_search(world, tmp_path):
    # no long tier: a window over the budget is a retrieval plan (tests/test_plans.py covers the others)
    dec = _decoder(world, tmp_path, ask_token_budget=80, long_pixels=0)      # 36 tokens per segment: two fit
    result = dec.ask(QUESTION, ["cam1", "cam2"], max_new_tokens=4)
    window = {r["segment_id"] for src in ("cam1", "cam2") for r in world["index"].list(src)}
    chosen = [e["segment_id"] for e in result["evidence"]]
    assert result["narrowed"] is True and len(chosen) == 2 and set(chosen) <= window
    assert [e["t0"] for e in result["evidence"]] == sorted(e["t0"] for e in result["evidence"])
    assert result["timings"]["visual_tokens"] == 72
    ranked = dec.search(QUESTION, ["cam1", "cam2"], limit=len(window))
    assert set(chosen) == {r["segment_id"] for r in ranked[:2]}      # the two best by search
    assert dec.stats()["narrowed"] == 1
    roomy = _decoder(world, tmp_path).ask(QUESTION, ["cam1", "cam2"], max_new_tokens=4)
    assert roomy["narrowed"] is False and {e["segment_id"] for e in roomy["evidence"]} == window
    with pytest.raises(ValueError, match="ask_token_budget"):
        _decoder(world, tmp_path, ask_token_budget=20, long_pixels=0).ask(QUESTION, ["cam1"], max_new_tokens=2)


def test_unknown_source_empty_window_and_bad_arguments(world, tmp_path):
    dec = _decoder(world, tmp_path)
    with pytest.raises(LookupError, match="unknown source"):
        dec.ask(QUESTION, ["cam9"])
    with pytest.raises(LookupError, match="no footage"):
        dec.ask(QUESTION, ["cam1"], start=50.0, end=60.0)
    for kwargs, match in ((dict(question=""), "question"), (dict(max_new_tokens=0), "max_new_tokens"),
                          (dict(max_new_tokens=10 ** 6), "max_new_tokens"), (dict(sources=[]), "sources"),
                          (dict(start=5.0, end=1.0), "after start"), (dict(on_token="x"), "on_token")):
        args = {"question": QUESTION, "sources": ["cam1"], **kwargs}
        with pytest.raises(ValueError, match=match):
            dec.ask(**args)
    assert dec.stats()["failed"] == 8 and dec.stats()["asks"] == 0


def test_answers_land_in_redis(world, tmp_path, redis_server):
    sink = EventSink(redis_server.url, tmp_path / "outbox")
    dec = _decoder(world, tmp_path, events=sink)
    result = dec.ask(QUESTION, ["cam2"], max_new_tokens=N_NEW)
    entries = redis_server.client().xrange(ANSWERS_STREAM)
    assert len(entries) == 1
    entry_id, fields = entries[0]
    fields = {k.decode(): v.decode() for k, v in fields.items()}
    assert result["stream_entry"] == entry_id.decode()
    assert fields["id"] == result["id"] and fields["question"] == QUESTION and fields["answer"] == result["answer"]
    assert fields["model"] == world["mid"] and json.loads(fields["evidence"]) == result["evidence"]
    assert json.loads(fields["timings"]) == result["timings"] and json.loads(fields["sources"]) == ["cam2"]
    # a search and its ranked segments go to their own stream
    ranked = dec.search("a person", ["cam2"], limit=3)
    (_, sfields), = redis_server.client().xrange(SEARCHES_STREAM)
    sfields = {k.decode(): v.decode() for k, v in sfields.items()}
    assert sfields["query"] == "a person" and json.loads(sfields["results"]) == ranked
    sink.close()


class CountingIndex(SegmentIndex):
    """A real SegmentIndex that counts token reads (to show that listing hours reads no tokens)."""
    reads = 0

    def tokens(self, segment_id, model_id=None, as_numpy=False):
        self.reads += 1
        return super().tokens(segment_id, model_id, as_numpy)


def test_an_hour_of_footage_reads_only_what_it_uses(world, tmp_path):
    index = CountingIndex(tmp_path / "hour")
    base = world["index"].get("cam1:0")
    n = 450                                                        # 1 hour of 8 s segments
    index.add([IndexedSegment(segment_id="", source_id="yard", t0=8.0 * k, t1=8.0 * (k + 1), grid_thw=base.grid_thw,
                              tube_ts=[8.0 * k, 8.0 * k + 1.0], tokens=base.tokens, model_id=world["mid"])
               for k in range(n)])
    s = load_settings(data_dir=tmp_path / "data", model_path=world["ckpt"], ask_token_budget=36 * 4)
    dec = Decoder(s, world["ckpt"], index=index)
    result = dec.ask(QUESTION, ["yard"], max_new_tokens=2)
    assert result["narrowed"] and len(result["evidence"]) == 4
    assert dec.stats()["segments_scored"] == SAMPLE_CAP + REFINE_CAP
    assert index.reads <= SAMPLE_CAP + REFINE_CAP + 4 < n


def _with_generation_config(world, tmp_path, **fields):
    """The world's checkpoint with other generation settings (same weights, same model id: the index still fits)."""
    folder = tmp_path / "generation" / world["ckpt"].name          # the folder name is part of the model id
    folder.mkdir(parents=True)
    for f in world["ckpt"].iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "generation_config.json").unlink()
    data = json.loads((world["ckpt"] / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**data, **fields}))
    return folder


@torch.no_grad()
def test_answers_follow_the_checkpoint_generation_config_and_request_overrides(world, tmp_path):
    segs = [["cam1:0", "cam1:2000", "cam1:4000"]]
    inputs = _direct_inputs(world, ["[source cam1, 0:00:00-0:00:06]"], segs, QUESTION)

    def direct(**kw) -> str:
        return answer_text(world["model"], world["processor"],
                           world["model"].generate(**inputs, max_new_tokens=N_NEW, **kw)[0])

    ckpt = _with_generation_config(world, tmp_path, repetition_penalty=1.8, max_new_tokens=5)
    assert model_id(ckpt) == world["mid"]
    s = load_settings(data_dir=tmp_path / "data", model_path=ckpt)
    dec = Decoder(s, ckpt, index=world["index"])
    penalised = dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=N_NEW)
    assert penalised["generation"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.8,
                                       "seed": None}
    assert penalised["answer"] == direct(repetition_penalty=1.8) != direct()     # the penalty changed the answer
    assert dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0)["timings"]["new_tokens"] <= 5   # its max_new_tokens

    # a request overrides within limits: sampling with a seed is repeatable and equals a direct seeded generate
    over = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0, "seed": 7}
    first = dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=N_NEW, generation=over)
    again = dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=N_NEW, generation=over)
    generator = torch.Generator().manual_seed(7)
    assert first["answer"] == again["answer"] == direct(do_sample=True, temperature=0.9, top_k=50, top_p=0.95,
                                                        generator=generator)
    assert dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=N_NEW,
                   generation={"temperature": 0.0, "repetition_penalty": 1.0})["answer"] == direct()
    for bad, word in (({"temperature": 5.0}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
                      ({"repetition_penalty": 0.5}, "repetition_penalty"), ({"beam": 2}, "unknown"),
                      ({"seed": True}, "seed")):
        with pytest.raises(ValueError, match=word):
            dec.ask(QUESTION, ["cam1"], generation=bad)


def test_decoder_dtype_setting(world, tmp_path):
    """decoder_dtype: "auto" is fp32 on a CPU; bfloat16 loads bf16 weights and answers from bf16 prefixes."""
    from qwen2vl.dtypes import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32"):
        resolve_dtype("float64", "cpu")
    assert _decoder(world, tmp_path).dtype == torch.float32
    dec = _decoder(world, tmp_path, decoder_dtype="bfloat16")
    assert dec.dtype == torch.bfloat16 and {p.dtype for p in dec.model.parameters()} == {torch.bfloat16}
    result = dec.ask(QUESTION, ["cam1"], start=0.0, end=6.0, max_new_tokens=4)
    assert result["timings"]["new_tokens"] > 0
    [key] = dec.prefix_cache.keys()
    assert dec.prefix_cache.get(key).layer(0)[0].dtype == torch.bfloat16
