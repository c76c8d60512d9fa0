"""Batched concurrent asks: questions decoding together in one Decoder answer exactly as when asked one by one.

Joining mid-generation is made certain, not likely: the test takes the decoder's model lock (granted in arrival
order) between two decode steps, starts the joiners, and lets go once they all wait for it.
"""
from __future__ import annotations

import threading
import time

import pytest

from tests.test_decoder import QUESTION, _decoder, build_world

pytestmark = pytest.mark.timeout(180)
SAMPLED = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.3, "seed": 7}
# name -> (sources, start, end, max_new_tokens, generation): different footage and prefix lengths (3 or 6
# segments, one or two video blocks), lengths and sampling; "stopper" ends on a stop id before its limit
JOBS = {
    "long": (["cam2"], 0.0, 6.0, 40, None),
    "short": (["cam1", "cam2"], 0.0, 6.0, 5, {"repetition_penalty": 1.5}),
    "penalised": (["cam1"], None, None, 16, {"repetition_penalty": 1.5}),
    "sampled": (["cam1"], 0.0, 6.0, 24, SAMPLED),
    "stopper": (["cam1", "cam2"], 0.0, 6.0, 40, None),
}
COMPLETE = ("Describe a quiet street.", 10)


def _ask(dec, name: str, on_token=None, max_new_tokens: int | None = None) -> dict:
    sources, start, end, n, generation = JOBS[name]
    return dec.ask(QUESTION, sources, start, end, max_new_tokens=max_new_tokens or n, generation=generation,
                   on_token=on_token)


def _answer(result: dict) -> tuple:
    return result["answer"], result["timings"]["new_tokens"], result["finish_reason"], result["evidence"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("batching"))


@pytest.fixture(scope="module")
def sequential(world, tmp_path_factory):
    """Every job asked one by one, on a decoder that decodes one question at a time."""
    dec = _decoder(world, tmp_path_factory.mktemp("sequential"), decoder_max_ongoing_requests=1)
    out = {name: _answer(_ask(dec, name)) for name in JOBS}
    out["complete"] = dec.complete(*COMPLETE)
    assert out["stopper"][2] == "stop" and out["long"][2] == "length"        # both ways of ending are covered
    return out


class Asks:
    """Asks running in threads: results, errors, streamed pieces with their times."""

    def __init__(self, dec):
        self.dec, self.results, self.errors, self.threads = dec, {}, {}, []
        self.pieces: dict[str, list[tuple[float, str]]] = {}
        self.done_at: dict[str, float] = {}
        self.first_piece: dict[str, threading.Event] = {}

    def start(self, name: str, fail_at: int | None = None, max_new_tokens: int | None = None) -> None:
        self.pieces[name], self.first_piece[name] = [], threading.Event()

        def on_token(piece: str) -> None:
            self.pieces[name].append((time.perf_counter(), piece))
            self.first_piece[name].set()
            if fail_at is not None and len(self.pieces[name]) >= fail_at:
                raise RuntimeError("the client went away")

        def run() -> None:
            try:
                if name == "complete":
                    self.results[name] = self.dec.complete(*COMPLETE)
                else:
                    self.results[name] = _ask(self.dec, name.split("#")[0], on_token, max_new_tokens)
            except Exception as e:  # noqa: BLE001 - the test looks at it
                self.errors[name] = e
            self.done_at[name] = time.perf_counter()

        thread = threading.Thread(target=run, name=f"ask-{name}")
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads)

    def streamed(self, name: str) -> str:
        return "".join(p for _, p in self.pieces[name])


def _paused(dec, asks: Asks, names: list[str], already_waiting: int) -> None:
    """Start `names` while holding the model lock; let go when each of them waits for it (they then join the batch
    at once, between two decode steps of whatever runs)."""
    with dec._lock:
        for name in names:
            asks.start(name)
        deadline = time.monotonic() + 60
        while dec._lock.waiting < already_waiting + len(names):
            assert time.monotonic() < deadline, "the joiners never reached the model lock"
            time.sleep(0.005)


def test_questions_joining_mid_generation_answer_as_when_asked_one_by_one(world, tmp_path, sequential):
    dec = _decoder(world, tmp_path, decoder_max_ongoing_requests=8)
    asks = Asks(dec)
    asks.start("long")
    assert asks.first_piece["long"].wait(60)
    with dec._lock:                                  # between two steps of "long"
        assert dec.batcher.stats()["rows"] == 1 and "long" not in asks.done_at
    _paused(dec, asks, ["short", "penalised", "sampled"], already_waiting=1)    # 1: the decode thread
    assert asks.first_piece["sampled"].wait(60)
    asks.start("stopper")                            # joins whenever it is ready, others still decoding
    asks.start("complete")
    asks.join()
    assert not asks.errors
    for name in JOBS:
        assert _answer(asks.results[name]) == sequential[name], name
        assert asks.streamed(name) == asks.results[name]["answer"]
    assert asks.results["stopper"]["finish_reason"] == "stop"
    assert asks.results["complete"] == sequential["complete"]
    batch = dec.stats()["batch"]
    assert batch["peak_rows"] >= 4 and batch["rows"] == 0
    cache = dec.stats()["prefix_cache"]
    assert cache["misses"] == 4 and cache["hits"] == 1       # cam2, both 0-6 s, cam1 gapped, cam1 0-6 s; "stopper" hits


def test_each_stream_ends_on_its_own(world, tmp_path, sequential):
    dec = _decoder(world, tmp_path, decoder_max_ongoing_requests=4)
    asks = Asks(dec)
    _paused(dec, asks, ["long", "short"], already_waiting=0)
    asks.join()
    assert not asks.errors
    for name in ("long", "short"):
        assert _answer(asks.results[name]) == sequential[name]
        assert asks.streamed(name) == asks.results[name]["answer"]
    # the short answer was returned while the long one went on decoding in the same batch
    assert asks.done_at["short"] < asks.pieces["long"][-1][0]
    assert asks.results["short"]["timings"]["new_tokens"] == 5 < asks.results["long"]["timings"]["new_tokens"]
    assert dec.stats()["batch"]["peak_rows"] == 2


def test_the_batch_never_holds_more_than_decoder_max_ongoing_requests(world, tmp_path, sequential):
    dec = _decoder(world, tmp_path, decoder_max_ongoing_requests=2)
    asks = Asks(dec)
    names = ["long", "short", "penalised", "stopper", "short#2"]
    for name in names:
        asks.start(name)
    asks.join()
    assert not asks.errors
    for name in names:
        assert _answer(asks.results[name]) == sequential[name.split("#")[0]], name
    batch = dec.stats()["batch"]
    assert batch["peak_rows"] == 2 and batch["max_rows"] == 2 and batch["rows"] == 0


def test_a_failing_question_leaves_the_others_undisturbed(world, tmp_path, sequential):
    dec = _decoder(world, tmp_path, decoder_max_ongoing_requests=2)
    asks = Asks(dec)
    with dec._lock:
        asks.start("long", fail_at=2)                # its consumer raises at its second piece
        asks.start("penalised")
        while dec._lock.waiting < 2:
            time.sleep(0.005)
    asks.join()
    assert set(asks.errors) == {"long"} and "went away" in str(asks.errors["long"])
    assert _answer(asks.results["penalised"]) == sequential["penalised"]
    assert dec.stats()["failed"] == 1 and dec.stats()["batch"]["rows"] == 0
    # its row was given back: two questions still fit at once
    again = Asks(dec)
    _paused(dec, again, ["short", "stopper"], already_waiting=0)
    again.join()
    assert not again.errors and _answer(again.results["stopper"]) == sequential["stopper"]
    assert dec.stats()["batch"]["peak_rows"] == 2


def test_a_search_runs_between_decode_steps_not_after_the_answer(world, tmp_path):
    dec = _decoder(world, tmp_path)
    asks = Asks(dec)
    asks.start("long", max_new_tokens=160)
    assert asks.first_piece["long"].wait(60)
    hits = dec.search(QUESTION, ["cam1"], limit=3)          # its scoring takes the model lock between two steps
    searched_at = time.perf_counter()
    asks.join()
    assert len(hits) == 3 and not asks.errors
    assert searched_at < asks.pieces["long"][-1][0]         # the answer was still decoding
