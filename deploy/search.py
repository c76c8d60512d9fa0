"""Segment ranking with the model itself (docs/architecture.md, "Search").

score(segment, query) = log p(" yes") - log p(" no") (= the difference of the two logits, so only those two rows
of the output layer are computed) for the next token after
    <segment's time label + video> "Does this clip show: {query}? Answer yes or no." <assistant header>
with the yes/no ids read from the tokenizer (first token of " yes" / " no"). The video prefix of each segment is
query-independent, so its KV goes through the shared PrefixCache: a second query over the same footage only runs the
short question suffix, batched over segments (caches stacked with left padding).

With captions on, the candidates come from the retrieval index (every captioned segment of the window is
considered: hybrid BM25 + vector retrieval, deploy/decoder.py) and `rerank` scores exactly those. Segments not
captioned yet, and every segment when captions are off, go through `rank`'s sampling:

Work bound for long windows: at most `sample_cap` candidates are scored first, spread evenly over the window's
segments in time order; then up to `refine_cap` more, the unscored neighbours (+-1, +-2, ...) of the best
`refine_top` scores. So one query scores at most sample_cap + refine_cap segments (64 + 32 by default) however long
the window is; segments never scored are not ranked.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from deploy.footage import PrefixMemo, PromptPlan, build_prompt, group_blocks
from deploy.prefix_cache import PrefixCache
from pipeline.kv import prefill_kv, split_cache, stack_caches, suffix_hidden

SEARCH_PROMPT = "Does this clip show: {query}? Answer yes or no."
SAMPLE_CAP = 64
REFINE_CAP = 32
REFINE_TOP = 4
BATCH_SIZE = 8


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """First token ids of " yes" and " no"; ValueError when the tokenizer cannot tell them apart."""
    yes, no = tokenizer.encode(" yes"), tokenizer.encode(" no")
    if not yes or not no or yes[0] == no[0]:
        raise ValueError(f"the tokenizer does not give distinct first tokens for ' yes' {yes} and ' no' {no}")
    return yes[0], no[0]


def search_question(query: str) -> str:
    """The yes/no question about a clip for a query (a query written as a question keeps a single '?')."""
    return SEARCH_PROMPT.format(query=query.strip().rstrip("?").rstrip())


def evenly_spaced(n: int, cap: int) -> list[int]:
    """min(n, cap) indices spread evenly over range(n), first and last included."""
    if n <= cap:
        return list(range(n))
    if cap == 1:
        return [0]
    return sorted({round(i * (n - 1) / (cap - 1)) for i in range(cap)})


def neighbours(best: list[int], n: int, scored: set[int], cap: int) -> list[int]:
    """Unscored indices next to the `best` ones, nearest first (round-robin over them), at most cap."""
    out: list[int] = []
    taken = set(scored)
    for dist in range(1, n):
        progressed = False
        for i in best:
            for j in (i - dist, i + dist):
                if 0 <= j < n:
                    progressed = True
                    if j not in taken:
                        taken.add(j)
                        out.append(j)
                        if len(out) >= cap:
                            return out
        if not progressed:
            break
    return out


class SegmentRanker:
    """Scores segments for a query. `lock` guards model calls (shared with the Decoder)."""

    def __init__(self, model, processor, prefix_cache: PrefixCache, model_id: str, tube_seconds: float,
                 max_gap_seconds: float, lock: threading.Lock | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", sample_cap: int = SAMPLE_CAP, refine_cap: int = REFINE_CAP,
                 refine_top: int = REFINE_TOP, batch_size: int = BATCH_SIZE, memo: PrefixMemo | None = None):
        for name, value in (("sample_cap", sample_cap), ("refine_top", refine_top), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(refine_cap, int) or refine_cap < 0:
            raise ValueError(f"refine_cap must be a non-negative int, got {refine_cap!r}")
        self.model, self.processor, self.cache = model, processor, prefix_cache
        self.model_id, self.tube_seconds, self.max_gap_seconds = model_id, tube_seconds, max_gap_seconds
        self.lock = lock or threading.Lock()
        self.dtype, self.device = dtype, torch.device(device)
        self.sample_cap, self.refine_cap = sample_cap, refine_cap
        self.refine_top, self.batch_size = refine_top, batch_size
        self.yes_id, self.no_id = yes_no_ids(processor.tokenizer)
        self.memo = memo if memo is not None else PrefixMemo()
        self.segments_scored = 0

    def rank(self, query: str, rows: list[dict],
             load_tokens: Callable[[str], torch.Tensor]) -> list[tuple[dict, float]]:
        """(row, score) for the scored subset of `rows` (time-ordered metadata), best first.

        load_tokens(segment_id) -> fp16 visual tokens [n, D] (read only for segments whose prefix is not cached).
        """
        question = search_question(query)
        order = sorted(range(len(rows)), key=lambda i: (rows[i]["t0"], rows[i]["source_id"]))
        ordered = [rows[i] for i in order]
        scores: dict[int, float] = {}
        first = evenly_spaced(len(ordered), self.sample_cap)
        scores.update(zip(first, self._score([ordered[i] for i in first], question, load_tokens)))
        if len(ordered) > len(first) and self.refine_cap:
            best = sorted(scores, key=lambda i: -scores[i])[:self.refine_top]
            more = neighbours(best, len(ordered), set(scores), self.refine_cap)
            scores.update(zip(more, self._score([ordered[i] for i in more], question, load_tokens)))
        ranked = sorted(scores, key=lambda i: (-scores[i], ordered[i]["t0"], ordered[i]["source_id"]))
        return [(ordered[i], scores[i]) for i in ranked]

    def rerank(self, query: str, rows: list[dict],
               load_tokens: Callable[[str], torch.Tensor]) -> list[tuple[dict, float]]:
        """(row, score) for every one of `rows` (candidates from retrieval), best first."""
        question = search_question(query)
        scores = self._score(rows, question, load_tokens)
        order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]["t0"], rows[i]["source_id"]))
        return [(rows[i], scores[i]) for i in order]

    def score_questions(self, rows: list[dict], queries: list[list[str]],
                        load_tokens: Callable[[str], torch.Tensor]) -> list[list[float]]:
        """Scores of each row for each of its own queries (standing alerts: queries[i] for rows[i]). Each row's video
        prefix is prefilled once (or taken from the prefix cache), then every (row, query) pair is scored in
        batches of `batch_size`, questions of different lengths left-padded."""
        if len(queries) != len(rows):
            raise ValueError(f"score_questions needs one query list per row, got {len(queries)} for {len(rows)}")
        pairs = [(i, search_question(q)) for i, qs in enumerate(queries) for q in qs]
        plans = [build_prompt(self.processor, group_blocks([rows[i]], self.tube_seconds, self.max_gap_seconds),
                              question, self.model.config, self.memo) for i, question in pairs]
        flat: list[float] = []
        for lo in range(0, len(plans), self.batch_size):
            flat.extend(self._score_batch(plans[lo:lo + self.batch_size], load_tokens))
        out: list[list[float]] = [[] for _ in rows]
        for (i, _), score in zip(pairs, flat):
            out[i].append(score)
        return out

    # ---- scoring -------------------------------------------------------------------------------------------------
    def _score(self, rows: list[dict], question: str, load_tokens) -> list[float]:
        plans = [build_prompt(self.processor, group_blocks([r], self.tube_seconds, self.max_gap_seconds), question,
                              self.model.config, self.memo) for r in rows]
        out: list[float] = []
        for lo in range(0, len(plans), self.batch_size):
            out.extend(self._score_batch(plans[lo:lo + self.batch_size], load_tokens))
        return out

    @torch.no_grad()
    def _score_batch(self, plans: list[PromptPlan], load_tokens) -> list[float]:
        keys = [p.prefix_key(self.model_id, self.dtype) for p in plans]
        caches = {k: self.cache.get(k, copy=False) for k in dict.fromkeys(keys)}    # read only: stacking copies
        missing = [k for k, c in caches.items() if c is None]
        first = {k: plans[keys.index(k)] for k in missing}                           # one prefill per prefix
        tokens = {k: load_tokens(first[k].segment_ids[0]) for k in missing}          # I/O outside the model lock
        with self.lock:
            for k, cache in zip(missing, self._prefill([first[k] for k in missing], [tokens[k] for k in missing])):
                self.cache.put(k, cache)                    # split_cache made fresh tensors
                caches[k] = cache
            batch = stack_caches([caches[k] for k in keys])
            # questions of different lengths (standing alerts) are left-padded; one question needs no padding
            longest = max(len(p.suffix_ids) for p in plans)
            pads = [longest - len(p.suffix_ids) for p in plans]
            suffix = torch.tensor([[0] * pad + p.suffix_ids for p, pad in zip(plans, pads)], device=self.device)
            hidden = suffix_hidden(self.model, suffix, batch, torch.tensor(pads))          # (B, D)
            self.segments_scored += len(plans)
        # log p(yes) - log p(no) = logit(yes) - logit(no): the softmax normaliser cancels, so only two rows of the
        # output layer are needed, not the whole vocabulary
        rows = self.model.lm_head.weight[[self.yes_id, self.no_id]]                        # (2, D)
        logits = hidden.float() @ rows.float().T                                            # (B, 2)
        return (logits[:, 0] - logits[:, 1]).tolist()

    def _prefill(self, plans: list[PromptPlan], tokens: list[torch.Tensor]):
        """Prefix KV of each plan (batch-1 caches); plans with equal prefix length run as one batch."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(plans):
            groups.setdefault(len(p.prefix_ids), []).append(i)
        out: list = [None] * len(plans)
        for members in groups.values():
            ids = torch.tensor([plans[i].prefix_ids for i in members], device=self.device)
            positions = torch.cat([plans[i].prefix_positions for i in members], dim=1).to(self.device)
            deltas = torch.cat([plans[i].prefix_rope_deltas for i in members]).to(self.device)
            embeds = torch.cat([tokens[i] for i in members]).to(self.device, self.dtype)
            for i, one in zip(members, split_cache(prefill_kv(self.model, ids, embeds, positions, deltas))):
                out[i] = one
        return out
