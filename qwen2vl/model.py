"""Qwen2VL: vision tower + text decoder + output layer; scatters visual tokens into the prompt (docs/model.md §6).

Module tree equals the original checkpoint names (`visual.*`, `model.*`, `lm_head.*`), so those state dicts load as is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .argmax_head import ArgmaxHead
from .config import Qwen2VLConfig
from .rope import get_rope_index
from .text import KVCache, TextDecoder
from .vision import VisionTransformer


@dataclass
class GenerationDefaults:
    """What generation_config.json says about stopping and sampling (docs/model.md §10); filled by load_pretrained.
    The sampling fields are the checkpoint's advice for answers; generate() itself takes them as arguments."""
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # 0: off
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None


@dataclass
class Qwen2VLOutput:
    logits: torch.Tensor | None             # (B, S or logits_to_keep, vocab); None when compute_logits=False
    past_key_values: KVCache | None
    rope_deltas: torch.Tensor               # (B, 1)
    hidden: torch.Tensor | None = None      # (B, S or logits_to_keep, D) final normed states, when compute_logits=False


class Qwen2VL(nn.Module):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = TextDecoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_config = GenerationDefaults()
        self._argmax_head: tuple[tuple, ArgmaxHead | None] | None = None    # (weight version, head)

    def argmax_head(self) -> ArgmaxHead | None:
        """The screened greedy head of an fp32 output layer (built once; rebuilt when the weights change in place or
        move). None for other dtypes, whose output layer is read at its own width anyway, and for weights outside
        the fp16 range."""
        weight = self.lm_head.weight
        if weight.dtype != torch.float32:
            return None
        version = (id(weight), weight.data_ptr(), weight._version)
        if self._argmax_head is None or self._argmax_head[0] != version:
            try:
                head = ArgmaxHead(weight.detach())
            except ValueError:
                head = None
            self._argmax_head = (version, head)
        return self._argmax_head[1]

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embeddings' device)."""
        return self.model.embed_tokens.weight.device

    @property
    def output_device(self) -> torch.device:
        """Where logits and final hidden states come out (the output layer's device)."""
        return self.lm_head.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.config.text.num_hidden_layers)

    # ---- inputs -> embeddings ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, image_embeds=None, video_embeds=None, prefill: bool = True) -> torch.Tensor:
        """Token embeddings (B, S, D) with image/video placeholder rows replaced by visual tokens, in prompt order.

        In a prefill, placeholders without visual inputs are an error; in decode steps a sampled token may be one.
        """
        inputs_embeds = self.model.embed_tokens(input_ids)
        for kind, token_id, pixels, grid, embeds in (
                ("image", self.config.image_token_id, pixel_values, image_grid_thw, image_embeds),
                ("video", self.config.video_token_id, pixel_values_videos, video_grid_thw, video_embeds)):
            if pixels is not None and embeds is not None:
                raise ValueError(f"pass either {kind} pixels or {kind}_embeds, not both")
            if pixels is not None:
                if grid is None:
                    raise ValueError(f"{kind} pixels given without {kind}_grid_thw")
                embeds = self.encode_visual(pixels, grid)
            mask = input_ids == token_id                                          # (B, S)
            if embeds is None:
                if grid is not None:
                    raise ValueError(f"{kind}_grid_thw given without {kind} pixels or {kind}_embeds")
                if prefill and bool(mask.any()):
                    raise ValueError(f"input_ids hold {int(mask.sum())} <{kind} pad> tokens (id {token_id}) but "
                                     f"no {kind} pixels or {kind}_embeds were given")
                continue
            n_placeholders, n_tokens = int(mask.sum()), embeds.shape[0]
            if embeds.ndim != 2 or embeds.shape[1] != inputs_embeds.shape[-1]:
                raise ValueError(f"{kind} visual tokens must be (n, {inputs_embeds.shape[-1]}), "
                                 f"got {tuple(embeds.shape)}")
            if n_placeholders != n_tokens:
                raise ValueError(f"{kind} visual tokens and placeholders do not match: {n_tokens} visual tokens "
                                 f"but {n_placeholders} <{kind} pad> tokens (id {token_id}) in input_ids")
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], embeds.to(inputs_embeds))
        return inputs_embeds

    def encode_visual(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Pixel rows (N, patch_dim) -> merged visual tokens (N/merge^2, D)."""
        weight = next(self.visual.parameters())
        return self.visual(pixel_values.to(weight.device, weight.dtype), grid_thw.to(weight.device))

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, position_ids=None, image_embeds=None,
                video_embeds=None, past_key_values: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int = 0, rope_deltas: torch.Tensor | None = None,
                compute_logits: bool = True) -> Qwen2VLOutput:
        """compute_logits=False skips the output layer and returns the final hidden states instead.

        attention_mask covers the new tokens (B, S) or the cache plus them (B, past+S); 1 = real, 0 = padding.

        Without position_ids, positions follow the reference get_rope_index; after a cache they continue from
        (cache length + rope_delta). A given cache is extended in place.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        cache = past_key_values if past_key_values is not None else (self.new_cache() if use_cache else None)
        batch, seq = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        if cache is not None and past and cache.batch_size != batch:
            raise ValueError(f"cache holds batch {cache.batch_size} but input_ids has batch {batch}")

        key_mask = _key_mask(attention_mask, cache, batch, seq, past, input_ids.device)
        inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                   image_embeds, video_embeds, prefill=past == 0)
        position_ids, rope_deltas = self._positions(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                                    position_ids, rope_deltas, cache, past)
        hidden = self.model(inputs_embeds, position_ids, key_mask, cache).to(self.output_device)   # (B, S, D)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]                                            # output layer only where asked
        if cache is not None:
            cache.key_mask, cache.rope_deltas = key_mask, rope_deltas
        if not compute_logits:
            return Qwen2VLOutput(logits=None, past_key_values=cache, rope_deltas=rope_deltas, hidden=hidden)
        return Qwen2VLOutput(logits=self.lm_head(hidden), past_key_values=cache, rope_deltas=rope_deltas)

    def _positions(self, input_ids, attention_mask, image_grid_thw, video_grid_thw, position_ids, rope_deltas,
                   cache, past) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq = input_ids.shape
        cached_deltas = cache.rope_deltas if cache is not None and past else None
        if position_ids is not None:
            if position_ids.ndim == 2:
                position_ids = position_ids[None].expand(3, -1, -1)
            if position_ids.shape != (3, batch, seq):
                raise ValueError(f"position_ids must be (3, {batch}, {seq}) or ({batch}, {seq}), "
                                 f"got {tuple(position_ids.shape)}")
            if rope_deltas is None:   # the reference definition; after a cache it equals continuing the old one
                rope_deltas = position_ids.amax(dim=(0, 2)).view(batch, 1) + 1 - (past + seq)
            return position_ids, rope_deltas
        if past == 0:
            mask = attention_mask if attention_mask is not None and attention_mask.shape[-1] == seq else None
            return get_rope_index(input_ids, image_grid_thw, video_grid_thw, mask, config=self.config)
        # Continuing after a cache: the new chunk's own positions, shifted to start where the cache left off.
        base = rope_deltas if rope_deltas is not None else cached_deltas
        if base is None:
            base = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
        chunk_positions, chunk_deltas = get_rope_index(input_ids, image_grid_thw, video_grid_thw, config=self.config)
        offset = (base + past).to(chunk_positions.device).view(1, batch, 1)
        return chunk_positions + offset, base + chunk_deltas

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        """New tokens (B, n); see qwen2vl.generate.generate for the arguments."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, **kwargs)


def _key_mask(attention_mask, cache, batch, seq, past, device) -> torch.Tensor | None:
    """(B, past+S) bool key mask from the caller's mask and the cache's stored one; None when nothing is padded."""
    cached = cache.key_mask if cache is not None and past else None
    if attention_mask is None:
        new = None
    elif attention_mask.shape == (batch, past + seq):
        return attention_mask.to(device) != 0
    elif attention_mask.shape == (batch, seq):
        new = attention_mask.to(device) != 0
    else:
        raise ValueError(f"attention_mask must be ({batch}, {seq}) or ({batch}, {past + seq}), "
                         f"got {tuple(attention_mask.shape)}")
    if cached is None and new is None:
        return None
    if cached is None:
        cached = torch.ones(batch, past, dtype=torch.bool, device=device)
    if new is None:
        new = torch.ones(batch, seq, dtype=torch.bool, device=device)
    return torch.cat([cached.to(device), new], dim=1)
