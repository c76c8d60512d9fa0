"""Token generation: prefill once, then one token per step from the KV cache (positions: docs/model.md §7).

Stop ids default to the checkpoint's generation_config.json (model.generation_config), never constants here.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .text import KVCache


class TokenIteratorStreamer:
    """Pass as `streamer=` and iterate (e.g. from another thread): yields each step's tokens, LongTensor (B,)."""

    _END = object()

    def __init__(self, timeout: float | None = None):
        self._queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def put(self, tokens: torch.Tensor) -> None:
        self._queue.put(tokens)

    def end(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while (item := self._queue.get(timeout=self.timeout)) is not self._END:
            yield item


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
             image_embeds=None, video_embeds=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, streamer=None,
             past_key_values: KVCache | None = None, position_ids=None, rope_deltas=None,
             generator: torch.Generator | None = None, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Generate up to max_new_tokens after input_ids (left padded for batches); returns new tokens (B, n).

    A row that emitted a stop id is filled with the pad id afterwards; generation ends when all rows stopped.
    With past_key_values (a cached prefix), input_ids are the tokens after the prefix; the cache is extended in
    place, so pass `cache.clone()` to keep the prefix; then `prompt_ids` (B, prefix + S) are the whole prompt's ids,
    which the repetition penalty counts as the reference does (input_ids alone otherwise). streamer: a callable taking LongTensor (B,) per step, or an
    object with put(tokens) / end() such as TokenIteratorStreamer.
    """
    _check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty)
    stop_ids = model_stop_ids(model, eos_token_id)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = stop_ids[0] if stop_ids else 0
    put, end = _streamer_hooks(streamer)

    # Greedy without a penalty needs only the argmax: an fp32 output layer then goes through the screened head.
    head = model.argmax_head() if not do_sample and repetition_penalty == 1.0 else None
    cache = past_key_values if past_key_values is not None else model.new_cache()
    out = model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, position_ids=position_ids,
                image_embeds=image_embeds, video_embeds=video_embeds, past_key_values=cache, use_cache=True,
                logits_to_keep=1, rope_deltas=rope_deltas, compute_logits=head is None)
    seen = input_ids if prompt_ids is None else prompt_ids.to(input_ids.device)   # for the repetition penalty
    choice = TokenChoice(seen, do_sample, temperature, top_p, top_k, repetition_penalty, generator)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    try:
        for step in range(max_new_tokens):
            if head is not None:
                token = head(out.hidden[:, -1])                             # (B,)
            else:
                token = choice.pick(out.logits[:, -1].float())             # (B,)
            token = token.to(finished.device)       # from the output layer's device (placement: the last one)
            token = torch.where(finished, torch.full_like(token, pad_id), token)   # (B,)
            new_tokens.append(token)
            put(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            choice.seen = torch.cat([choice.seen, token[:, None]], dim=1)
            out = model(token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1,
                        compute_logits=head is None)
    finally:
        end()
    return torch.stack(new_tokens, dim=1)


def model_stop_ids(model, eos_token_id=None) -> list[int]:
    """The ids that end an answer: eos_token_id when given, else the checkpoint's generation_config.json."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id or model.config.eos_token_id
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


@dataclass
class TokenChoice:
    """How one sequence of a batch picks its next token: its own sampling settings, generator and seen ids, so a
    sequence decoded beside others picks what it would pick alone (deploy/batching.py).

    seen (1, n): the prompt's ids and the answer so far, which the repetition penalty counts; `observe` extends it."""
    seen: torch.Tensor
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        _check_sampling(1, self.do_sample, self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    @property
    def needs_logits(self) -> bool:
        """False: the argmax of the logits is the token (the screened head may pick it)."""
        return self.do_sample or self.repetition_penalty != 1.0

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The token (1,) for fp32 scores (1, V) of this sequence's last position, on the device of `seen` (the
        input's, where the generator lives; a split model's logits come from its last device)."""
        scores = scores.to(self.seen.device)
        if self.repetition_penalty != 1.0:
            scores = _penalize_repeats(scores, self.seen, self.repetition_penalty)
        if self.do_sample:
            return _sample(scores, self.temperature, self.top_k, self.top_p, self.generator)
        return scores.argmax(dim=-1)

    def observe(self, token: int) -> None:
        if self.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([[token]])], dim=1)


@torch.no_grad()
def pick_tokens(model, hidden: torch.Tensor, choices: list[TokenChoice]) -> list[int | Exception]:
    """Next token of each row of final hidden states (B, D), row b chosen by choices[b]: rows that only need the
    argmax go through the screened head (fp32 weights) together, the others get full logits, computed together
    and processed row by row. A row whose choice fails (e.g. non-finite scores when sampling) gets the exception
    instead of a token, so the other rows keep theirs."""
    head = model.argmax_head()
    plain = [b for b, c in enumerate(choices) if not c.needs_logits]
    fast = plain if head is not None else []
    full = sorted(set(range(len(choices))) - set(fast))
    out: list[int | Exception] = [0] * len(choices)
    if fast:
        for b, token in zip(fast, head(hidden[fast]).tolist()):
            out[b] = token
    if full:
        logits = model.lm_head(hidden[full]).float()                          # (len(full), V)
        argmax = [j for j, b in enumerate(full) if not choices[b].needs_logits]
        if argmax:                                                            # one device sync for all of them
            for j, token in zip(argmax, logits[argmax].argmax(dim=-1).tolist()):
                out[full[j]] = token
        for j, b in enumerate(full):
            if not choices[b].needs_logits:
                continue
            try:
                out[b] = int(choices[b].pick(logits[j:j + 1]))
            except Exception as e:  # noqa: BLE001 - one row's failure is that row's answer, not the batch's
                out[b] = e
    return out


def _streamer_hooks(streamer) -> tuple[Callable, Callable]:
    if streamer is None:
        return (lambda token: None), (lambda: None)
    if hasattr(streamer, "put"):
        return streamer.put, getattr(streamer, "end", lambda: None)
    if callable(streamer):
        return streamer, (lambda: None)
    raise ValueError(f"streamer must be a callable or have put()/end(), got {type(streamer).__name__}")


def _check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _penalize_repeats(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: seen tokens' scores divided by penalty when positive, multiplied when negative."""
    picked = scores.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def _sample(scores: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p             # mass before this token already reaches top_p
        drop[:, 0] = False                                          # always keep the best token
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
