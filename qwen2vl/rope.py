"""Text-side rotary embedding: M-RoPE and the 3-axis position ids (get_rope_index); docs/model.md §7.

M-RoPE gives every token three position ids (temporal, height, width). The head_dim/2 frequency slots are split
into mrope_section = [t, h, w] consecutive groups; group i rotates by the position on axis i. For text all three
ids are equal, which makes it plain 1D RoPE.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import Qwen2VLConfig

_DEFAULT_IDS = Qwen2VLConfig.__dataclass_fields__  # field defaults hold the released special token ids


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """inv_freq[k] = theta^(-2k/head_dim), k < head_dim/2; fp32 (head_dim/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3, B, S) -> cos, sin (B, S, head_dim) in `dtype`, each slot taking its section's axis.

    Computed in fp32 and cast at the end, as the reference does (docs/model.md §7).
    """
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be (3, batch, seq), got {tuple(position_ids.shape)}")
    if sum(mrope_section) != inv_freq.shape[0]:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {inv_freq.shape[0]}")
    freqs = position_ids[..., None].float() * inv_freq.float()          # (3, B, S, head_dim/2)
    chunks = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([chunk[axis % 3] for axis, chunk in enumerate(chunks)], dim=-1)  # (B, S, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)                              # (B, S, head_dim): dims d, d+half share a slot
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX pairing: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, S, head_dim); cos/sin (B, S, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# ---- position ids --------------------------------------------------------------------------------------------

def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    config: Qwen2VLConfig | None = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    spatial_merge_size: int = 2,
    video_temporal_ids: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis M-RoPE positions (3, B, S) and rope_deltas (B, 1), transformers 4.57.6 semantics.

    Padded slots (attention_mask == 0) get position 1; rope_delta = max position + 1 - padded length, so decode
    step positions are (cache length + rope_delta) on all axes. `video_temporal_ids[k]` (LongTensor (gt,)) replaces
    arange(gt) as the temporal offsets of video k (global order, as video_grid_thw rows) inside its block.
    """
    if config is not None:
        image_token_id = config.image_token_id if image_token_id is None else image_token_id
        video_token_id = config.video_token_id if video_token_id is None else video_token_id
        vision_start_token_id = config.vision_start_token_id if vision_start_token_id is None else vision_start_token_id
        spatial_merge_size = config.vision.spatial_merge_size
    image_token_id = _DEFAULT_IDS["image_token_id"].default if image_token_id is None else image_token_id
    video_token_id = _DEFAULT_IDS["video_token_id"].default if video_token_id is None else video_token_id
    if vision_start_token_id is None:
        vision_start_token_id = _DEFAULT_IDS["vision_start_token_id"].default
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if video_temporal_ids is not None:
        _check_temporal_ids(video_temporal_ids, video_grid_thw)

    if image_grid_thw is None and video_grid_thw is None:
        return _text_rope_index(input_ids, attention_mask)

    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.to(input_ids.device) == 1
    position_ids = torch.ones(3, batch, seq, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    cursor = {"image": 0, "video": 0}   # next row of image_grid_thw / video_grid_thw (shared across the batch)
    for b in range(batch):
        tokens = input_ids[b][keep[b]].tolist()
        positions = _row_positions(tokens, image_grid_thw, video_grid_thw, cursor, image_token_id, video_token_id,
                                   vision_start_token_id, spatial_merge_size, video_temporal_ids)  # (3, n_real)
        position_ids[:, b, keep[b]] = positions.to(position_ids.device, position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - seq if positions.numel() else 1 - seq)
    rope_deltas = torch.tensor(deltas, dtype=torch.long, device=input_ids.device).unsqueeze(1)  # (B, 1)
    return position_ids, rope_deltas


def _text_rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq = input_ids.shape
    if attention_mask is None:
        position_ids = torch.arange(seq, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)
        return position_ids, torch.zeros(batch, 1, dtype=input_ids.dtype, device=input_ids.device)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    rope_deltas = position_ids.max(0)[0].max(-1, keepdim=True)[0] + 1 - seq
    return position_ids, rope_deltas


def _row_positions(tokens: list[int], image_grid_thw, video_grid_thw, cursor: dict, image_token_id: int,
                   video_token_id: int, vision_start_token_id: int, merge: int, video_temporal_ids) -> torch.Tensor:
    """Positions (3, len(tokens)) of one unpadded row; advances cursor over the grid rows it consumes."""
    n_tokens = len(tokens)
    kinds = [tokens[i + 1] for i, tok in enumerate(tokens[:-1]) if tok == vision_start_token_id]
    remaining = {"image": kinds.count(image_token_id), "video": kinds.count(video_token_id)}
    pad_id = {"image": image_token_id, "video": video_token_id}
    grids = {"image": image_grid_thw, "video": video_grid_thw}
    chunks: list[torch.Tensor] = []
    st = 0
    for _ in range(remaining["image"] + remaining["video"]):
        # The next item is whichever placeholder comes first from st (the reference scans pad tokens, not starts).
        found = {k: _index_or_end(tokens, pad_id[k], st) if remaining[k] > 0 else n_tokens + 1 for k in pad_id}
        kind = "image" if found["image"] < found["video"] else "video"
        ed = found[kind]
        if ed > n_tokens:
            raise ValueError(f"a <|vision_start|> announces a {kind} but no {kind} placeholder token follows it")
        grid = grids[kind]
        if grid is None or cursor[kind] >= grid.shape[0]:
            raise ValueError(f"the prompt has more {kind}s than rows in {kind}_grid_thw "
                             f"({0 if grid is None else grid.shape[0]})")
        t, h, w = (int(v) for v in grid[cursor[kind]])
        gt, gh, gw = t, h // merge, w // merge
        if kind == "video" and video_temporal_ids is not None:
            t_offsets = video_temporal_ids[cursor[kind]].long().cpu()
        else:
            t_offsets = torch.arange(gt)
        cursor[kind] += 1
        remaining[kind] -= 1

        start = int(chunks[-1].max()) + 1 if chunks else 0
        text_len = ed - st
        chunks.append(torch.arange(text_len).view(1, -1).expand(3, -1) + start)
        t_index = t_offsets.view(-1, 1).expand(-1, gh * gw).flatten()          # (gt*gh*gw,)
        h_index = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten()
        w_index = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten()
        chunks.append(torch.stack([t_index, h_index, w_index]) + start + text_len)
        st = ed + gt * gh * gw
    if st < n_tokens:
        start = int(chunks[-1].max()) + 1 if chunks else 0
        chunks.append(torch.arange(n_tokens - st).view(1, -1).expand(3, -1) + start)
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long)
    positions = torch.cat(chunks, dim=1)
    if positions.shape[1] != n_tokens:
        raise ValueError(f"visual grids cover {positions.shape[1]} positions but the row has {n_tokens} tokens: "
                         "placeholder counts do not match grid_thw (expected t*h*w/merge^2 pads per item)")
    return positions


def _index_or_end(tokens: list[int], token: int, start: int) -> int:
    try:
        return tokens.index(token, start)
    except ValueError:
        return len(tokens) + 1


def _check_temporal_ids(video_temporal_ids, video_grid_thw) -> None:
    if video_grid_thw is None:
        raise ValueError("video_temporal_ids given without video_grid_thw")
    if len(video_temporal_ids) != video_grid_thw.shape[0]:
        raise ValueError(f"video_temporal_ids has {len(video_temporal_ids)} entries, expected one per video "
                         f"({video_grid_thw.shape[0]})")
    for k, (ids, grid) in enumerate(zip(video_temporal_ids, video_grid_thw)):
        if ids.ndim != 1 or ids.shape[0] != int(grid[0]):
            raise ValueError(f"video_temporal_ids[{k}] must be a 1-D tensor of length grid_t={int(grid[0])}, "
                             f"got shape {tuple(ids.shape)}")
