"""Captions and embedding vectors of indexed segments from their stored visual tokens (Ray-free, batched).

See docs/architecture.md, "Captions". The vision tower never runs: the decoder reads the tokens the index stores.
Per segment ONE video prefix (system turn, user header, one video block of the stored tokens) is prefilled, and its
KV serves two prompts that continue it, each ending where the assistant's answer starts (chat template,
docs/model.md §9):
  embedding  "\\nSummarize the above video in one word:"; the vector is the final hidden state (final norm applied,
             no output layer) at the last prompt token, L2-normalised (E5-V style). It runs first, and the cache is
             then cropped back to the prefix.
  caption    "\\nDescribe what happens in this video in one sentence."; greedy, at most max_new_tokens, the
             checkpoint's stop ids (generation_config.json).
`embed_query` puts a search query through the matching text-only prompt, so query and segment vectors compare by
dot product.

A segment is one contiguous clip, so its positions are exactly the reference get_rope_index's (temporal ids
0..t-1, docs/model.md §7, §8); tube_ts is only checked.

Batching: segments are sorted by token count and cut into batches of batch_size. Within a batch, segments of equal
prefix length are prefilled together (no padding, no mask); prefixes of different lengths are then stacked with
left padding (pipeline.kv.stack_caches: padded keys masked, rope_deltas shifted by the pad so every row continues
at its own next position). The embedding prompt, the caption prompt and every decode step then run once for the
whole batch; rows stop independently (generate feeds finished rows the pad id; their tokens are cut at the first
stop id). Results equal one-segment-at-a-time runs: the same captions token for token, vectors to ~1e-6 (fp32
summation order changes with the batch shape and with the masked attention kernel; tests bound it by 1e-5).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoints import model_id as checkpoint_model_id
from pipeline.kv import prefill_kv, split_cache, stack_caches, suffix_hidden
from qwen2vl.checkpoint import load_pretrained
from qwen2vl.dtypes import resolve_dtype
from qwen2vl.generate import generate
from qwen2vl.onednn_linear import use_onednn_linears_
from qwen2vl.processor import Processor
from qwen2vl.rope import get_rope_index

CAPTION_PROMPT = "Describe what happens in this video in one sentence."
EMBED_PROMPT = "Summarize the above video in one word:"
QUERY_PROMPT = "{query}\nSummarize the above sentence in one word:"


class Captioner:
    """describe(items) -> [(caption, unit vector [D] float32)]; embed_query(text) -> unit vector [D] float32."""

    def __init__(self, model_path: str | Path, dtype: str | torch.dtype = "auto", device=None,
                 max_new_tokens: int = 32, batch_size: int = 16):
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = Path(model_path)
        self.model_id = checkpoint_model_id(self.model_path)     # recorded beside every caption
        self.model = load_pretrained(self.model_path, dtype=self.dtype, device=self.device)
        self.model.visual = None          # captions come from stored tokens only; frees the tower's memory
        self.model.argmax_head()          # built now (fp32 only), not inside the first batch
        use_onednn_linears_(self.model.model.layers)    # exact fp32 CPU fast path (docs/model.md §14)
        self.processor = Processor.from_pretrained(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.hidden_size = self.model.config.text.hidden_size
        self.merge = self.model.config.vision.spatial_merge_size
        self.stop_ids = set(self.model.generation_config.eos_token_id or [])
        head, tail, self.caption_suffix = self._split_prompt(CAPTION_PROMPT)
        same_prefix = self._split_prompt(EMBED_PROMPT)
        if same_prefix[:2] != (head, tail):
            raise ValueError("the caption and embedding prompts must share the video prefix")
        self.prefix_head, self.prefix_tail, self.embed_suffix = same_prefix
        self.prefills = 0                 # prefill forwards run (a test checks each prefix runs once)

    # ---- public -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def describe(self, items) -> list[tuple[str, np.ndarray]]:
        """(caption, L2-normalised float32 vector [D]) per item, in input order.

        An item is (tokens [n, D] fp16/float torch or numpy, grid_thw (t, h, w) in patches, tube_ts or None), or
        an IndexedSegment. ValueError names the first bad item.
        """
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"items must be a list of (tokens, grid_thw, tube_ts), got {type(items).__name__}")
        segments = [self._check_item(k, item) for k, item in enumerate(items)]
        order = sorted(range(len(segments)), key=lambda k: segments[k][0].shape[0])   # similar lengths batch up
        out: list = [None] * len(segments)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            for k, result in zip(chunk, self._describe_batch([segments[k] for k in chunk])):
                out[k] = result
        return out

    def embed_query(self, text: str) -> np.ndarray:
        """L2-normalised float32 vector [D] of a search query (text-only prompt, same last-hidden-state rule)."""
        return embed_query(self.model, self.processor, text)

    # ---- prompts --------------------------------------------------------------------------------------------------
    def _split_prompt(self, instruction: str) -> tuple[list[int], list[int], list[int]]:
        """Ids of the prompt with one video then `instruction`: (prefix before the video pads, prefix after them,
        suffix). Special tokens split BPE, so head + pads + tail + suffix equal the ids of the whole text."""
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\n" + instruction}]}],
            add_generation_prompt=True)
        vision_end = self.tokenizer.id_to_token(self.tokenizer.vision_end_id)
        cut = text.rindex(vision_end) + len(vision_end)
        ids = self.processor.encode_with_grids(text[:cut], video_grid_thw=[(1, self.merge, self.merge)],
                                               return_tensors=None)["input_ids"][0]          # exactly one pad
        pad = ids.index(self.processor.video_token_id)
        return ids[:pad], ids[pad + 1:], self.tokenizer.encode(text[cut:])

    def _check_item(self, k: int, item) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if hasattr(item, "tokens") and hasattr(item, "grid_thw"):          # an IndexedSegment
            item = (item.tokens, item.grid_thw, getattr(item, "tube_ts", None))
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"item {k}: expected (tokens, grid_thw, tube_ts or None), got {type(item).__name__}")
        tokens, grid, tube_ts = item
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(np.array(tokens))       # a copy: stored tokens are read-only buffers
        if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point() or tokens.ndim != 2:
            raise ValueError(f"item {k}: tokens must be a float [n, D] tensor or array, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[1] != self.hidden_size:
            raise ValueError(f"item {k}: tokens are {tokens.shape[1]} wide but this model's hidden size is "
                             f"{self.hidden_size} (tokens of another checkpoint?)")
        try:
            t, h, w = (int(x) for x in grid)
        except (TypeError, ValueError):
            raise ValueError(f"item {k}: grid_thw must be three ints (t, h, w), got {grid!r}") from None
        if min(t, h, w) <= 0 or h % self.merge or w % self.merge:
            raise ValueError(f"item {k}: grid_thw must be positive with even h and w, got {(t, h, w)}")
        n = t * h * w // self.merge ** 2
        if tokens.shape[0] != n:
            raise ValueError(f"item {k}: grid_thw {(t, h, w)} holds {n} visual tokens (t*h*w/4) but "
                             f"{tokens.shape[0]} were given")
        if tube_ts is not None:
            ts = [float(x) for x in tube_ts]
            if len(ts) != t or not all(math.isfinite(x) for x in ts) or any(b < a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"item {k}: tube_ts must hold {t} finite, non-decreasing start times, got {ts}")
        if not bool(torch.isfinite(tokens).all()):
            raise ValueError(f"item {k}: tokens hold NaN or infinite values")
        return tokens, (t, h, w)

    # ---- model work ---------------------------------------------------------------------------------------------
    def _describe_batch(self, segments) -> list[tuple[str, np.ndarray]]:
        cache = self._prefill(segments)                                 # (B, ...) video prefixes, left padded
        prefix_len, batch = cache.seq_len, len(segments)
        ids = torch.tensor([self.embed_suffix] * batch, device=self.device)
        vectors = _unit(suffix_hidden(self.model, ids, cache))           # (B, D)
        cache.crop(prefix_len)          # the caption continues the video, not the embedding prompt
        ids = torch.tensor([self.caption_suffix] * batch, device=self.device)
        new = generate(self.model, ids, past_key_values=cache, max_new_tokens=self.max_new_tokens)
        return [(self._caption(row), vector) for row, vector in zip(new.tolist(), vectors)]

    def _prefill(self, segments):
        """One KV cache over the prefixes of `segments`: equal lengths prefill as one batch, then stack (left pad)."""
        groups: dict[int, list[int]] = {}
        for i, (tokens, _grid) in enumerate(segments):
            groups.setdefault(tokens.shape[0], []).append(i)
        caches: list = [None] * len(segments)
        for n, members in groups.items():
            ids = torch.tensor([self.prefix_head + [self.processor.video_token_id] * n + self.prefix_tail]
                               * len(members))
            grids = torch.tensor([segments[i][1] for i in members])
            positions, deltas = get_rope_index(ids, None, grids, config=self.model.config)
            embeds = torch.cat([segments[i][0] for i in members]).to(self.device, self.dtype)
            cache = prefill_kv(self.model, ids.to(self.device), embeds, positions.to(self.device),
                               deltas.to(self.device))
            self.prefills += 1
            if len(groups) == 1:
                return cache
            for i, one in zip(members, split_cache(cache)):
                caches[i] = one
        return stack_caches(caches)

    def _caption(self, ids: list[int]) -> str:
        kept = []
        for token in ids:
            if token in self.stop_ids:
                break
            kept.append(token)
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()


@torch.no_grad()
def embed_query(model, processor, text: str) -> np.ndarray:
    """L2-normalised float32 vector [D] of a search query through QUERY_PROMPT: the final hidden state at the last
    prompt token, as for segments, so the two compare by dot product. Any Qwen2-VL text model of the captioner's
    checkpoint will do (the decoder embeds queries with its own copy)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the query must be a non-empty string, got {text!r}")
    tokenizer = processor.tokenizer
    for name in tokenizer.special_ids:
        if f"<|{name}|>" in text:
            raise ValueError(f"the query must not contain the special token <|{name}|>")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": QUERY_PROMPT.format(query=text.strip())}], add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    hidden = model(ids, logits_to_keep=1, compute_logits=False).hidden[:, -1]      # (1, D), text positions
    return _unit(hidden)[0]


def _unit(hidden: torch.Tensor) -> np.ndarray:
    """Rows L2-normalised in fp32, as numpy float32 (B, D)."""
    vectors = hidden.float()
    return (vectors / vectors.norm(dim=-1, keepdim=True)).cpu().numpy()
