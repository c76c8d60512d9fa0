"""Decoder: answers questions over indexed footage from its stored visual tokens.

See docs/architecture.md, "Temporal positions" and "Search".

Ray-free core; deploy/app.py wraps it in a Serve deployment. Per question:
  select  list the window's segments (metadata only) and plan what to look at (deploy.plans): every segment when
          they fit the visual-token budget, else the long tier (all tubes, or tubes sampled evenly), else the best
          segments by search with the captions of the rest as text (never silently truncated: `plan`, `narrowed`
          and `evidence` say exactly what the model saw)
  prompt  chat template; uploaded images first (their tokens from the vision tower, once per image:
          deploy.images), then per source run one video block of the stored tokens, preceded by its time label;
          temporal M-RoPE ids from the tubes' times (deploy.footage)
  prefill the video prefix's KV comes from the PrefixCache when the same footage was asked about before, else one
          forward over the prefix (no output layer at all) which is then cached; then the question
  decode  in the replica's running batch (deploy.batching: up to decoder_max_ongoing_requests questions decode
          together, each joining at the next step and leaving on its own stop id or max_new_tokens), under the
          checkpoint's sampling or the request's; text pieces streamed to on_token (clean text: a box's label, never
          its markup; deploy.boxes places the boxes on the footage shown)
  record  one entry in the Redis stream tubescope:answers (through the EventSink), whose id the result carries
The vision tower runs only on uploaded images: indexed footage is never re-encoded. One lock, granted in
arrival order, serialises model calls (CPU threads gain nothing from running two forwards at once); the batch
takes it for one decode step at a time, so searches and alert scoring run between steps. Cached prefixes are
copied into the question's row of the batch before being extended.
"""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from deploy.batching import Batcher, Cancelled, FairLock, Prompt
from deploy.boxes import answer_boxes
from deploy.footage import (WINDOW_NOTES, PrefixMemo, PromptPlan, build_prompt, check_question, format_span,
                            group_blocks, list_window)
from deploy.generation import answer_sampling
from deploy.image_search import ImageRanker
from deploy.images import ImageEncoder
from deploy.plans import WindowPlan, caption_lines, plan_window
from deploy.prefix_cache import PrefixCache
from deploy.search import SegmentRanker, evenly_spaced
from deploy.text_stream import TextStream
from pipeline.captioner import embed_query
from pipeline.captions import CaptionStore
from pipeline.long_tier import LongTier
from pipeline.retrieval import RetrievalIndex
from pipeline.checkpoints import model_id as checkpoint_model_id
from pipeline.kv import prefill_kv
from pipeline import metrics
from pipeline.events import ANSWERS_STREAM, SEARCHES_STREAM
from pipeline.settings import Settings
from pipeline.thumbnails import ThumbnailStore
from pipeline.times import with_times
from qwen2vl.checkpoint import load_pretrained
from qwen2vl.dtypes import resolve_dtype
from qwen2vl.onednn_linear import use_onednn_linears_
from qwen2vl.placement import plan_gpus
from qwen2vl.processor import Processor

MAX_NEW_TOKENS = 1024             # per question; larger requests are refused (ValueError)
MAX_SEARCH_LIMIT = 1000


class Decoder:
    def __init__(self, settings: Settings, model_path: str | Path, *, index=None, events=None,
                 dtype: str | torch.dtype | None = None, device=None, prefix_cache_bytes: int = 2 << 30):
        """dtype: the weights' dtype (None: settings.decoder_dtype; "auto" is bf16 on a GPU that has it, else fp32)."""
        if not isinstance(settings, Settings):
            raise ValueError(f"settings must be a pipeline.settings.Settings, got {type(settings).__name__}")
        self.settings = settings
        self.model_path = Path(model_path)
        self.model_id = checkpoint_model_id(self.model_path)
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype = resolve_dtype(settings.decoder_dtype if dtype is None else dtype, self.device)
        self.model = load_pretrained(self.model_path, dtype=dtype, device=self.device,
                                     device_map=None if self.device.type != "cuda" else
                                     plan_gpus(self.model_path / "config.json", settings.decoder_gpus, dtype))
        self.model.argmax_head()          # built now (fp32 only), not inside the first question's timings
        use_onednn_linears_(self.model.model.layers)    # fp32 CPU matmuls through oneDNN (qwen2vl/onednn_linear)
        self.processor = Processor.from_pretrained(self.model_path)
        if index is None:
            from pipeline.index import SegmentIndex
            index = SegmentIndex(settings.index_root, create=False)
        self.index = index
        self.events = events
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.tube_seconds = self.model.config.vision.temporal_patch_size / settings.fps
        self._lock = FairLock()           # model calls; the batch holds it for one decode step at a time
        self.batcher = Batcher(self.model, self._lock, settings.decoder_max_ongoing_requests)
        self._count_lock = threading.Lock()
        self.prompt_memo = PrefixMemo()   # tokenized prefixes (pure function results, shared with search)
        self.ranker = SegmentRanker(self.model, self.processor, self.prefix_cache, self.model_id, self.tube_seconds,
                                    settings.max_gap_seconds, lock=self._lock, dtype=dtype, device=self.device,
                                    memo=self.prompt_memo)
        self.images = ImageEncoder(self.model, self.processor, self._lock, settings.api_max_image_pixels)
        self.captions = CaptionStore(index)
        self.thumbnails = ThumbnailStore(index)
        self.long_tier = LongTier(index, settings.long_pixels) if settings.long_pixels else None
        # captions on: searches and over-budget asks consider every captioned segment through the retrieval index;
        # queries are embedded by the checkpoint that wrote the caption vectors (this one unless configured)
        self.retrieval = RetrievalIndex(settings.index_root) if settings.captions else None
        self.image_ranker = ImageRanker(self._segment_tokens, self.model_id, settings.search_image_segments,
                                        self.retrieval, settings.search_candidates)
        self.caption_model_id, self._query_model = self.model_id, None
        if settings.captions and settings.caption_model_path is not None \
                and checkpoint_model_id(settings.resolved_caption_model_path()) != self.model_id:
            from pipeline.captioner import Captioner

            self._query_model = Captioner(settings.resolved_caption_model_path(), dtype=dtype, device=self.device)
            self.caption_model_id = self._query_model.model_id
        self.counts = {"asks": 0, "searches": 0, "narrowed": 0, "failed": 0, "cancelled": 0, "new_tokens": 0}

    # ---- public -----------------------------------------------------------------------------------------------
    def ask(self, question: str, sources: list[str], start: float | None = None, end: float | None = None,
            max_new_tokens: int | None = None, on_token: Callable[[str], None] | None = None, record: bool = True,
            with_captions: bool = False, generation: dict | None = None, images: list[bytes] | None = None) -> dict:
        """Answer `question` over `images` (encoded image files, shown first) and the footage of `sources` in
        [start, end) (None = unbounded); sources may be empty when images are given.

        max_new_tokens None: the checkpoint's max_new_tokens, else api_default_new_tokens (at most
        api_max_new_tokens). generation: overrides of the checkpoint's sampling (deploy/generation.py FIELDS).

        record=False keeps the answer out of tubescope:answers (a summary's periods go to tubescope:summaries).
        with_captions: the captions of the window's footage go into the prompt as timestamped lines (summaries).
        LookupError: unknown source / no footage in the window. ValueError: bad arguments.
        """
        t_start = time.perf_counter()
        try:
            result = self._ask(question, sources, start, end, max_new_tokens, on_token, t_start, record,
                               with_captions, generation, images or [])
        except Cancelled:
            self._count("cancelled")
            raise
        except Exception:
            self._count("failed")
            raise
        self._count("asks")
        self._count("narrowed", int(result["narrowed"]))
        t = result["timings"]
        self._count("new_tokens", t["new_tokens"])
        metrics.record_ask(t["ttft_s"] if t["new_tokens"] else None, t["total_s"], t["new_tokens"],
                           t["prefix_cache"] == "hit")
        return result

    def search(self, query: str, sources: list[str], start: float | None = None, end: float | None = None,
               limit: int = 10) -> list[dict]:
        """Segments of the window ranked for `query`: [{source, segment_id, t0, t1, score, caption}], best first."""
        return self.search_window(query, sources, start, end, limit)["results"]

    def search_window(self, query: str | None, sources: list[str], start: float | None = None,
                      end: float | None = None, limit: int = 10, image: bytes | None = None) -> dict:
        """{"results": search's list, "coverage": how the window's segments were considered (see _ranked)}. image: the
        segments most like it (deploy.image_search); with a query too, its best candidates reranked by the query."""
        t_start = time.perf_counter()
        if image is None or query is not None:
            check_question(query)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise ValueError(f"limit must be an int in [1, {MAX_SEARCH_LIMIT}], got {limit!r}")
        rows = list_window(self.index, sources, start, end, self.model_id)
        image_tokens = self.images.tokens(image) if image is not None else None
        if image_tokens is None:
            ranked, coverage = self._ranked(query, rows, start, end)
        else:
            ranked, coverage = self.image_ranker.rank(image_tokens.tokens, rows, self._uncaptioned(rows), start, end)
            if query is not None:
                candidates = [r for r, _ in ranked[:self.settings.search_candidates]]
                ranked = self.ranker.rerank(query, candidates, self._segment_tokens)
                coverage["reranked"] = len(candidates)
        self._count("searches")
        tz = self.settings.time_zone
        results = [with_times({"source": r["source_id"], "segment_id": r["segment_id"], "t0": r["t0"], "t1": r["t1"],
                               "score": float(score), "caption": r.get("caption")}, tz) for r, score in ranked[:limit]]
        results = self.thumbnails.with_urls(results)                 # one folder listing per source
        metrics.record_search(time.perf_counter() - t_start)
        if self.events is not None:          # search results and their evidence go to Redis too
            self.events.emit(SEARCHES_STREAM, {"query": query, "image": image_tokens and image_tokens.digest,
                                               "results": results, "model": self.model_id,
                                               "sources": list(dict.fromkeys([sources] if isinstance(sources, str)
                                                                             else sources)),
                                               "start": start, "end": end, "coverage": coverage})
        return {"results": results, "coverage": coverage}

    def score_segments(self, segments: list[dict], queries: list[list[str]]) -> list[list[float] | None]:
        """Yes/no scores (as search's) of each segment ({segment_id, source_id, t0, t1}, as tubescope:segments has
        them) for each of its own queries (standing alerts), batched over segments and queries: each video prefix
        is prefilled once. None for a segment this checkpoint has not indexed (deleted since, or another model's)."""
        if len(queries) != len(segments):
            raise ValueError(f"one query list per segment, got {len(queries)} for {len(segments)}")
        for query in (q for qs in queries for q in qs):
            check_question(query)
        rows, wanted = [], []
        for i, seg in enumerate(segments):
            found = [r for r in self.index.list(seg["source_id"], float(seg["t0"]), float(seg["t1"]), self.model_id)
                     if r["segment_id"] == seg["segment_id"]]
            if found and queries[i]:
                rows.append(found[0])
                wanted.append(i)
        scores = self.ranker.score_questions(rows, [queries[i] for i in wanted], self._segment_tokens)
        out: list[list[float] | None] = [None] * len(segments)
        for i, row_scores in zip(wanted, scores):
            out[i] = row_scores
        return out

    def _ranked(self, query: str, rows: list[dict], start, end) -> tuple[list[tuple[dict, float]], dict]:
        """The window's rows ranked for `query`, and the coverage: every captioned segment is considered through the
        retrieval index, whose best `search_candidates` are reranked by the yes/no scorer together with an even
        sample of the segments not captioned yet. With captions off, or nothing captioned yet, the sampled scan of
        SegmentRanker.rank. RetrievalUnavailable (a 503) when captions exist but the retrieval index cannot be read."""
        pending = self._uncaptioned(rows)
        coverage = {"segments": len(rows), "captioned": len(rows) - len(pending), "retrieval": False}
        if len(pending) == len(rows):
            return self.ranker.rank(query, rows, self._segment_tokens), coverage
        with self._lock:
            vector = embed_query(self.model, self.processor, query) if self._query_model is None \
                else self._query_model.embed_query(query)
        hits = self.retrieval.search(query, vector, sources=sorted({r["source_id"] for r in rows}), start=start,
                                     end=end, limit=self.settings.search_candidates)
        by_id = {r["segment_id"]: r for r in rows}
        candidates = [{**by_id[h["segment_id"]], "caption": h["caption"]} for h in hits if h["segment_id"] in by_id]
        candidates += [pending[i] for i in evenly_spaced(len(pending), self.ranker.sample_cap)]
        coverage.update(retrieval=True, reranked=len(candidates))
        return self.ranker.rerank(query, candidates, self._segment_tokens), coverage

    def _uncaptioned(self, rows: list[dict]) -> list[dict]:
        """The rows not captioned yet (all of them with captions off)."""
        return rows if self.retrieval is None else self.captions.uncaptioned(rows, self.caption_model_id)

    def complete(self, prompt: str, max_new_tokens: int = 128) -> str:
        """A text-only turn (no footage): the model's reply to `prompt` under the checkpoint's own sampling
        (summaries of summaries)."""
        check_question(prompt)
        ids = self.processor.tokenizer.encode(self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": prompt}]}], add_generation_prompt=True))
        stream = TextStream(self.processor.tokenizer, None, self.model.generation_config.eos_token_id)
        prompt = Prompt(prefill=lambda cache: None, prefix_len=0, suffix_ids=ids, prompt_ids=ids,
                        sampling=answer_sampling(self.model.generation_config), max_new_tokens=max_new_tokens)
        for token in self.batcher.stream(prompt):
            stream.put(token)
        return stream.text

    def stats(self) -> dict:
        with self._count_lock:
            counts = dict(self.counts)
        return {"model": self.model_id, "prefix_cache": self.prefix_cache.stats(), "images": self.images.stats(),
                "segments_scored": self.ranker.segments_scored, "batch": self.batcher.stats(), **counts}

    # ---- one question ---------------------------------------------------------------------------------------------
    def _ask(self, question, sources, start, end, max_new_tokens, on_token, t_start, record, with_captions,
             generation, images) -> dict:
        check_question(question)
        sampling = answer_sampling(self.model.generation_config, generation)
        if max_new_tokens is None:
            max_new_tokens = min(self.model.generation_config.max_new_tokens or self.settings.api_default_new_tokens,
                                 self.settings.api_max_new_tokens)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be an int in [1, {MAX_NEW_TOKENS}], got {max_new_tokens!r}")
        if on_token is not None and not callable(on_token):
            raise ValueError("on_token must be a callable taking a text piece, or None")

        image_tokens = self.images.tokens_of(images, self.settings.api_max_images)   # the tower: once per image
        if sources or not images:
            rows = list_window(self.index, sources, start, end, self.model_id)
            window = self._plan(question, rows, start, end, with_captions)
        else:                                                             # a question about the images alone
            rows, window = [], WindowPlan(kind="none", rows=[], window_segments=0)
        narrowed = window.tubes < sum(int(r["grid_thw"][0]) for r in rows)
        plan = build_prompt(self.processor, group_blocks(window.rows, self.tube_seconds,
                                                         self.settings.max_gap_seconds),
                            question, self.model.config, self.prompt_memo, notes=window.notes,
                            notes_title=window.notes_title, images=image_tokens)
        t_selected = time.perf_counter()

        key = plan.prefix_key(self.model_id, self.dtype)
        # Read tokens outside the lock when the prefix is not cached yet; look the cache up inside it, so concurrent
        # first questions over the same footage prefill it once.
        embeds = None if key in self.prefix_cache else self._plan_tokens(plan)
        hit = False

        def prefill(row_cache) -> None:
            """The prefix into the question's row of the batch (under the model lock)."""
            nonlocal hit, embeds
            hit = self.prefix_cache.get(key, spare=len(plan.suffix_ids) + 1, into=row_cache) is not None
            if not hit:
                if embeds is None:                          # evicted since the check
                    embeds = self._plan_tokens(plan)
                cache = self._prefill_prefix(plan, embeds)
                self.prefix_cache.put(key, cache)           # stored as is; the row extends a copy
                cache.clone(spare=len(plan.suffix_ids) + 1, into=row_cache)

        stream = TextStream(self.processor.tokenizer, on_token, self.model.generation_config.eos_token_id)
        prompt = Prompt(prefill=prefill, prefix_len=len(plan.prefix_ids), suffix_ids=list(plan.suffix_ids),
                        prompt_ids=list(plan.input_ids), sampling=sampling, max_new_tokens=max_new_tokens)
        new_ids = []
        for token in self.batcher.stream(prompt):
            new_ids.append(token)
            stream.put(token)
        stream.finish()
        t_end = time.perf_counter()

        t_first = stream.first_token_at or t_end
        timings = {"select_s": t_selected - t_start, "prefill_s": t_first - t_selected, "ttft_s": t_first - t_start,
                   "decode_s": t_end - t_first, "total_s": t_end - t_start, "prefix_cache": "hit" if hit else "miss",
                   "prompt_tokens": len(plan.input_ids), "visual_tokens": plan.visual_tokens,
                   "new_tokens": len(new_ids)}
        shown = sorted(plan.segments, key=lambda r: (r["t0"], r["source_id"]))
        evidence = self.thumbnails.with_urls([self._evidence(r) for r in shown])
        grounded = stream.grounded()
        boxes = answer_boxes(grounded.boxes, grounded.text, shown, self.tube_seconds)
        summary = window.summary()
        result = {"id": uuid.uuid4().hex, "answer": grounded.text, "boxes": boxes, "evidence": evidence,
                  "model": self.model_id, "timings": timings, "narrowed": narrowed, "plan": summary,
                  "generation": sampling.to_dict(),
                  # "length": the answer ran into max_new_tokens before a stop token
                  "finish_reason": "stop" if stream.stopped else "length",
                  "stream_entry": None}
        if self.events is not None and record:
            result["stream_entry"] = self.events.emit(ANSWERS_STREAM, {
                "id": result["id"], "question": question, "answer": result["answer"], "boxes": boxes,
                "evidence": evidence,
                "model": self.model_id, "timings": timings, "narrowed": narrowed, "plan": summary,
                "sources": list(dict.fromkeys([sources] if isinstance(sources, str) else sources)),
                "start": start, "end": end})
        return result

    def _plan(self, question: str, rows: list[dict], start, end, with_captions: bool = False) -> WindowPlan:
        """The window's plan (deploy.plans); a retrieval plan is filled here: the best segments by search, and the
        captions of the others as timestamped lines. with_captions: other plans carry the captions of their window."""
        s = self.settings
        over = sum(int(r["n_tokens"]) for r in rows) > s.ask_token_budget
        present = self.long_tier.present(rows, self.model_id) if over and self.long_tier is not None else set()
        plan = plan_window(rows, budget=s.ask_token_budget, long_pixels=s.long_pixels, long_present=present,
                           max_stride_s=s.long_max_stride_seconds, tube_seconds=self.tube_seconds)
        if plan.kind == "retrieval":
            plan.rows = [{**r, "tier": "full"} for r in self._fit_budget(question, rows, start, end)]
            if self._captioned(rows):
                seen = {r["segment_id"] for r in plan.rows}
                captions = self.retrieval.captions(sorted({r["source_id"] for r in rows}), start, end)
                plan.notes = caption_lines(rows, captions, seen, s.plan_caption_lines, format_span)
        elif with_captions and self._captioned(rows):
            captions = self.retrieval.captions(sorted({r["source_id"] for r in rows}), start, end)
            plan.notes = caption_lines(rows, captions, set(), s.plan_caption_lines, format_span)
            plan.notes_title = WINDOW_NOTES
        return plan

    def _captioned(self, rows: list[dict]) -> bool:
        """Whether any of the rows is captioned (then the retrieval index holds captions to read)."""
        return self.retrieval is not None and self.settings.plan_caption_lines > 0 \
            and len(self.captions.uncaptioned(rows, self.caption_model_id)) < len(rows)

    def _evidence(self, row: dict) -> dict:
        """One segment the answer looked at: times, tier, and the start of each tube when only some were seen."""
        entry = {"source": row["source_id"], "segment_id": row["segment_id"], "t0": row["t0"], "t1": row["t1"],
                 "tier": row.get("tier", "full")}
        if "tubes" in row:
            entry["tubes"] = [round(float(ts), 3) for ts in row["tube_ts"]]
        return with_times(entry, self.settings.time_zone)

    def _fit_budget(self, question: str, rows: list[dict], start, end) -> list[dict]:
        """The best-scoring rows whose tokens fit ask_token_budget, in time order."""
        budget = self.settings.ask_token_budget
        chosen, used = [], 0
        for row, _score in self._ranked(question, rows, start, end)[0]:
            if used + int(row["n_tokens"]) <= budget:
                chosen.append(row)
                used += int(row["n_tokens"])
        if not chosen:
            smallest = min(int(r["n_tokens"]) for r in rows)
            raise ValueError(f"ask_token_budget ({budget} visual tokens) is smaller than any segment of the window "
                             f"(the smallest holds {smallest}); raise the budget")
        chosen.sort(key=lambda r: (r["t0"], r["source_id"]))
        return chosen

    # ---- model work --------------------------------------------------------------------------------------------------
    def _segment_tokens(self, segment_id: str) -> torch.Tensor:
        return self.index.tokens(segment_id, self.model_id)                    # fp16 (n, D)

    def _plan_tokens(self, plan: PromptPlan) -> torch.Tensor | None:
        """Stored visual tokens of the plan's rows in prompt order, (n_visual, D) in the model dtype (None without
        footage): a long-tier row reads the segment's long tier and keeps the tubes the plan chose."""
        if not plan.segments:
            return None
        parts = []
        for r in plan.segments:
            if r.get("tier") != "long":
                parts.append(self._segment_tokens(r["segment_id"]))
                continue
            tokens = self.long_tier.tokens({**r, "grid_thw": r["index_grid_thw"]}, self.model_id)
            if "tubes" in r:
                per_tube = tokens.shape[0] // int(r["index_grid_thw"][0])
                tokens = tokens.view(-1, per_tube, tokens.shape[1])[r["tubes"]].reshape(-1, tokens.shape[1])
            parts.append(tokens)
        return torch.cat(parts).to(self.device, self.dtype)

    def _prefill_prefix(self, plan: PromptPlan, embeds: torch.Tensor | None):
        """KV of the vision prefix (images, then footage), without any output layer (nothing reads its logits)."""
        images = torch.cat([im.tokens for im in plan.images]) if plan.images else None
        return prefill_kv(self.model, torch.tensor([plan.prefix_ids], device=self.device), embeds,
                          plan.prefix_positions.to(self.device), plan.prefix_rope_deltas.to(self.device), images)

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[name] += n
