"""Continuous batching of answers: one decoder replica decodes many questions at once (docs/architecture.md,
"Batched answers").

A question joins in its own thread: it waits for a free row (at most `max_rows` decode together), then, holding the
model lock, prefills its prompt into that row of the SlotCache (the prefix from the PrefixCache or a fresh prefill,
then the question) and picks its first token. One background thread then decodes every active row together, one
token per step, taking the model lock for ONE step at a time; the lock is granted in arrival order, so a question
joining, a search, an alert scoring or a caption query waits for at most one step. Each row picks its token with its
own sampling, generator and repetition penalty (qwen2vl.generate.TokenChoice) and leaves on its own stop id or its
max_new_tokens. Tokens reach the asking thread through its own queue, so a slow consumer holds up nobody; a
consumer that stops reading (its on_token raised, its client went away) cancels its row, which leaves at the next
step. A failure of one row's prefill or token choice fails that question only.

Pure scheduling over qwen2vl's model code: no Ray here (deploy/app.py runs the Serve side).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from deploy.generation import Sampling
from qwen2vl.batch_cache import SlotCache, decode_step
from qwen2vl.generate import TokenChoice, model_stop_ids, pick_tokens
from qwen2vl.text import KVCache


class Cancelled(Exception):
    """Raised by a consumer of answer pieces whose asker went away (a closed HTTP stream): its row leaves the batch
    at the next step and the question counts as cancelled, not failed."""


class FairLock:
    """A mutex granted in the order it was asked for. A plain Lock lets the decode thread take it back right after
    releasing it, which would starve a waiting search for a whole answer."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[int] = deque()
        self._tickets = 0
        self._held = False

    def acquire(self) -> bool:
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            self._queue.append(ticket)
            while self._held or self._queue[0] != ticket:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        return True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._held = False
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Threads queued for the lock (not counting the holder)."""
        with self._cond:
            return len(self._queue)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Prompt:
    """One question for the batch. prefill(cache) writes the prompt's prefix into the given empty batch-1 KVCache
    (under the model lock; nothing for a text-only prompt); suffix_ids follow it; prompt_ids are the whole prompt's
    ids (the repetition penalty counts them)."""
    prefill: Callable[[KVCache], None]
    prefix_len: int
    suffix_ids: list[int]
    prompt_ids: list[int]
    sampling: Sampling
    max_new_tokens: int


_END = object()


@dataclass
class _Row:
    prompt: Prompt
    choice: TokenChoice
    out: queue.Queue = field(default_factory=queue.Queue)
    slot: int = -1
    last: int = 0                       # the token to feed at the next step
    produced: int = 0
    cancelled: bool = False


class Batcher:
    """Decodes the questions given to `stream` together, at most max_rows at a time, on `model` under `lock`."""

    def __init__(self, model, lock: FairLock, max_rows: int):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        self.model, self.lock, self.max_rows = model, lock, max_rows
        self.device = model.input_device              # token ids, seen ids and sampling generators go there
        self.stop_ids = set(model_stop_ids(model))
        self.slots = SlotCache.for_model(model, max_rows)
        self._free = threading.Semaphore(max_rows)      # rows not taken; a question waits here for one
        self._rows: list[_Row] = []                     # active rows in slot order (under lock)
        self._thread: threading.Thread | None = None    # the decode thread, alive while rows are (under lock)
        self.steps = 0
        self.peak_rows = 0

    def stream(self, prompt: Prompt) -> Iterator[int]:
        """The answer's token ids as they are decoded (its stop id last when it stopped). Prefill errors raise here;
        closing the iterator early cancels the question."""
        row = _Row(prompt, self._choice(prompt))
        self._free.acquire()
        try:
            with self.lock:
                self._join(row)
        except BaseException:
            self._free.release()
            raise
        try:
            while (item := row.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            row.cancelled = True                        # read by the decode thread at its next step

    def stats(self) -> dict:
        return {"rows": len(self._rows), "max_rows": self.max_rows, "peak_rows": self.peak_rows,
                "steps": self.steps, "capacity": self.slots.capacity}

    # ---- under the lock --------------------------------------------------------------------------------------
    def _choice(self, prompt: Prompt) -> TokenChoice:
        kwargs = prompt.sampling.generate_kwargs(self.device)
        seen = torch.tensor([prompt.prompt_ids], dtype=torch.long, device=self.device)
        return TokenChoice(seen, **kwargs)

    def _join(self, row: _Row) -> None:
        """Prefill the row's prompt into a free slot and pick its first token (lock held)."""
        prompt = row.prompt
        slot, cache = self.slots.add_row(prompt.prefix_len + len(prompt.suffix_ids) + 1)
        try:
            prompt.prefill(cache)
            suffix = torch.tensor([prompt.suffix_ids], dtype=torch.long, device=self.device)
            out = self.model(suffix, past_key_values=cache, use_cache=True, logits_to_keep=1, compute_logits=False)
            self.slots.adopt(slot, cache)
            [token] = pick_tokens(self.model, out.hidden[:, -1], [row.choice])
            if isinstance(token, Exception):
                raise token
        except BaseException:
            self.slots.remove_row(slot)                 # the newest row is the last: nothing moves
            raise
        row.slot = slot
        self._rows.append(row)
        self.peak_rows = max(self.peak_rows, len(self._rows))
        self._deliver([(row, token)])
        if self._rows and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._decode_loop, name="decode-batch", daemon=True)
            self._thread.start()

    def _decode_loop(self) -> None:
        while True:
            with self.lock:
                try:
                    self._leave([r for r in self._rows if r.cancelled])
                    if not self._rows:
                        self._thread = None
                        return
                    self._step()
                except BaseException as e:  # a bug here must not leave askers waiting forever: all rows end
                    for row in self._rows:
                        row.out.put(e)
                        self._free.release()
                    self._rows = []
                    self.slots = SlotCache.for_model(self.model, self.max_rows)
                    self._thread = None
                    raise

    def _step(self) -> None:
        rows = list(self._rows)
        try:
            hidden = decode_step(self.model, self.slots, torch.tensor([r.last for r in rows], device=self.device))
            picks = pick_tokens(self.model, hidden, [r.choice for r in rows])
        except Exception as e:  # noqa: BLE001 - the whole step failed (e.g. out of memory): every row ends with it
            for r in rows:
                r.out.put(e)
            self._leave(rows)
            return
        self.steps += 1
        failed = [(r, p) for r, p in zip(rows, picks) if isinstance(p, Exception)]
        for r, e in failed:
            r.out.put(e)
        self._deliver([(r, p) for r, p in zip(rows, picks) if not isinstance(p, Exception)],
                      failed=[r for r, _ in failed])

    def _deliver(self, picked: list[tuple[_Row, int]], failed: list[_Row] = ()) -> None:
        """Hand each row its token; rows that stopped or reached their max_new_tokens (and failed ones) leave."""
        done = list(failed)
        for row, token in picked:
            row.produced += 1
            row.last = token
            row.choice.observe(token)
            row.out.put(token)
            if token in self.stop_ids or row.produced >= row.prompt.max_new_tokens:
                row.out.put(_END)
                done.append(row)
        self._leave(done)

    def _leave(self, rows: list[_Row]) -> None:
        """Free the rows' slots, highest first, so each move brings in a row that stays."""
        for row in sorted(rows, key=lambda r: r.slot, reverse=True):
            moved = self.slots.remove_row(row.slot)
            last = self._rows.pop()
            if moved is not None:
                last.slot = row.slot
                self._rows[row.slot] = last
            self._free.release()
