"""KV-cache helpers over cached video prefixes: prefill without the output layer, batch stacking with left
padding, splitting, and the final hidden state after a text suffix (positions: docs/model.md §7).

Model-level and Ray-free: the decoder and search (deploy/) and the captioner (pipeline/) share them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen2vl.text import KVCache


def stack_caches(caches: list[KVCache]) -> KVCache:
    """One batch cache from batch-1 caches of possibly different lengths: shorter ones are padded on the LEFT.

    Padded keys are masked through key_mask; rope_deltas shift by -pad so the next token of every row continues
    at (its own last position + 1), the same rule get_rope_index uses for left-padded batches.
    """
    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    if any(c.batch_size != 1 for c in caches):
        raise ValueError("stack_caches takes batch-1 caches")
    longest = max(c.seq_len for c in caches)
    out = KVCache(caches[0].num_layers)
    for i in range(out.num_layers):
        keys, values = [], []
        for c in caches:
            k, v = c.layer(i)                                                   # (1, kv_heads, len, head_dim)
            pad = longest - k.shape[2]
            keys.append(F.pad(k, (0, 0, pad, 0)) if pad else k)
            values.append(F.pad(v, (0, 0, pad, 0)) if pad else v)
        out.append(i, torch.cat(keys), torch.cat(values))                       # (B, kv_heads, longest, head_dim)
    device = out.layer(0)[0].device
    masks, deltas = [], []
    for c in caches:
        pad = longest - c.seq_len
        own = c.key_mask if c.key_mask is not None else torch.ones(1, c.seq_len, dtype=torch.bool, device=device)
        masks.append(torch.cat([torch.zeros(1, pad, dtype=torch.bool, device=device), own.to(device)], dim=1))
        deltas.append(c.rope_deltas.view(1, 1).to(device) - pad)
    mask = torch.cat(masks)                                                      # (B, longest)
    out.key_mask = None if bool(mask.all()) else mask
    out.rope_deltas = torch.cat(deltas)                                          # (B, 1)
    return out


def split_cache(cache: KVCache) -> list[KVCache]:
    """Batch-B cache (no padding) -> B independent batch-1 copies."""
    if cache.key_mask is not None and not bool(cache.key_mask.all()):
        raise ValueError("split_cache takes an unpadded cache")
    out = []
    for b in range(cache.batch_size):
        one = KVCache(cache.num_layers)
        for i in range(cache.num_layers):
            k, v = cache.layer(i)
            one.append(i, k[b:b + 1].clone(), v[b:b + 1].clone())
        one.rope_deltas = cache.rope_deltas[b:b + 1].clone()
        out.append(one)
    return out


@torch.no_grad()
def prefill_kv(model, input_ids: torch.Tensor, video_embeds: torch.Tensor | None, position_ids: torch.Tensor,
               rope_deltas: torch.Tensor, image_embeds: torch.Tensor | None = None) -> KVCache:
    """KV cache of a prompt prefix (B, S) with its video (and image) tokens, skipping the output layer entirely:
    nothing reads the prefix's logits, and at a 152k vocabulary they would cost more than the decoder layers of small
    models."""
    cache = model.new_cache()
    inputs_embeds = model.embed(input_ids, video_embeds=video_embeds, image_embeds=image_embeds)   # (B, S, D)
    model.model(inputs_embeds, position_ids, None, cache)                             # fills the cache
    cache.key_mask, cache.rope_deltas = None, rope_deltas
    return cache


@torch.no_grad()
def suffix_hidden(model, input_ids: torch.Tensor, cache: KVCache, pads: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden state (B, D) at the last position of text `input_ids` (B, S) appended to `cache` (extended).

    Positions continue the cached prefix as in decoding: (cache length + rope_delta + arange(S)) on all 3 axes.
    pads (B,): left padding tokens at the start of each row of input_ids, so suffixes of different lengths run as
    one batch; they are masked out as keys and each row's own tokens keep the positions they would have alone.
    """
    batch, seq = input_ids.shape
    past = cache.seq_len
    device = input_ids.device
    steps = torch.arange(seq, device=device).view(1, 1, seq)
    shift = cache.rope_deltas.view(1, batch, 1).to(device)
    own = None
    if pads is not None and bool(pads.any()):
        pads = pads.to(device).view(batch)
        shift = shift - pads.view(1, batch, 1)
        own = steps.view(1, seq) >= pads.view(batch, 1)                             # (B, S): False on padding
    position_ids = (shift + past + steps).expand(3, -1, -1)
    key_mask = None
    if cache.key_mask is not None or own is not None:
        prior = cache.key_mask if cache.key_mask is not None else torch.ones(batch, past, dtype=torch.bool)
        own = own if own is not None else torch.ones(batch, seq, dtype=torch.bool)
        key_mask = torch.cat([prior.to(device), own.to(device)], dim=1)
    hidden = model.model(model.embed(input_ids, prefill=False), position_ids, key_mask, cache)   # (B, S, D)
    cache.key_mask = key_mask
    return hidden[:, -1]
