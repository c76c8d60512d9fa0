"""Qwen2 text decoder with M-RoPE (docs/model.md §6, §7). Module names match the checkpoint's `model.*` tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .rope import apply_rotary, mrope_cos_sin, rope_inv_freq


class KVCache:
    """Per-layer keys/values (B, kv_heads, S, head_dim) of one batch of sequences, plus what decoding needs next:
    the key padding mask (B, S) and rope_deltas (B, 1). Grows in place; clone() it to keep a prefix for reuse."""

    def __init__(self, num_layers: int):
        self._keys: list[torch.Tensor | None] = [None] * num_layers     # buffers with spare capacity on dim 2
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.key_mask: torch.Tensor | None = None                       # (B, S) bool, None = no padding
        self.rope_deltas: torch.Tensor | None = None                    # (B, 1) long

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> "KVCache":
        """An empty cache that writes into the given per-layer buffers (B, kv_heads, capacity, head_dim), e.g. views
        of one row of a larger store, until it outgrows them (then it moves to buffers of its own)."""
        out = cls(len(keys))
        out._keys, out._values = list(keys), list(values)
        return out

    @property
    def seq_len(self) -> int:
        return self.lengths[0]

    @property
    def batch_size(self) -> int | None:
        return None if self._keys[0] is None else self._keys[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer i, each (B, kv_heads, seq_len, head_dim) (views, not copies)."""
        n = self.lengths[i]
        return self._keys[i][:, :, :n], self._values[i][:, :, :n]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k/v (B, kv_heads, S_new, hd) to layer i; returns all keys/values of that layer so far."""
        n, new = self.lengths[i], k.shape[2]
        if self._keys[i] is None or n + new > self._keys[i].shape[2]:
            capacity = max(n + new, 2 * n, 64)                          # doubling keeps appends amortised O(1)
            grown_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if n:
                grown_k[:, :, :n] = self._keys[i][:, :, :n]
                grown_v[:, :, :n] = self._values[i][:, :, :n]
            self._keys[i], self._values[i] = grown_k, grown_v
        self._keys[i][:, :, n:n + new] = k
        self._values[i][:, :, n:n + new] = v
        self.lengths[i] = n + new
        return self.layer(i)

    def clone(self, spare: int = 0, into: "KVCache | None" = None) -> "KVCache":
        """An independent copy; `spare` extra positions of capacity let it grow that far without another copy.

        into: a cache whose buffers may be reused when large enough (same layout); it is overwritten and returned.
        A long-lived scratch cache saves allocating (and page-faulting) fresh buffers for every copy."""
        out = KVCache(len(self._keys)) if into is None else into
        if out.num_layers != self.num_layers:
            raise ValueError(f"cannot clone a {self.num_layers}-layer cache into a {out.num_layers}-layer one")
        for i in range(len(self._keys)):
            out.lengths[i] = 0
            if self._keys[i] is None:
                out._keys[i] = out._values[i] = None
                continue
            k, v = self.layer(i)
            n = self.lengths[i]
            if not _fits(out._keys[i], k, n + spare) or not _fits(out._values[i], v, n + spare):
                out._keys[i] = k.new_empty(k.shape[0], k.shape[1], n + spare, k.shape[3])
                out._values[i] = v.new_empty(v.shape[0], v.shape[1], n + spare, v.shape[3])
            out._keys[i][:, :, :n] = k
            out._values[i][:, :, :n] = v
            out.lengths[i] = n
        out.key_mask = None if self.key_mask is None else self.key_mask.clone()
        out.rope_deltas = None if self.rope_deltas is None else self.rope_deltas.clone()
        return out

    def repeat(self, n: int) -> "KVCache":
        """A new cache with each sequence repeated n times (one cached prefix, n questions): batch B -> B*n."""
        out = KVCache(len(self._keys))
        for i in range(len(self._keys)):
            if self._keys[i] is not None:
                k, v = self.layer(i)
                out._keys[i], out._values[i] = k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)
                out.lengths[i] = self.lengths[i]
        if self.key_mask is not None:
            out.key_mask = self.key_mask.repeat_interleave(n, 0)
        if self.rope_deltas is not None:
            out.rope_deltas = self.rope_deltas.repeat_interleave(n, 0)
        return out

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (e.g. drop an answer, keep the prefix).

        rope_deltas are kept: right when the dropped tokens were text (which never changes the delta)."""
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"crop length {length} outside [0, {self.seq_len}]")
        self.lengths = [min(n, length) for n in self.lengths]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :length]


def _fits(buffer: torch.Tensor | None, like: torch.Tensor, capacity: int) -> bool:
    """True when `buffer` can hold `capacity` positions of tensors shaped like `like` (B, heads, S, hd)."""
    return (buffer is not None and buffer.dtype == like.dtype and buffer.device == like.device
            and buffer.shape[:2] == like.shape[:2] and buffer.shape[3] == like.shape[3]
            and buffer.shape[2] >= capacity)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back BEFORE the weight multiply, as the reference does (docs/model.md §6).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class TextMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"text hidden_act {cfg.hidden_act!r} is not supported (expected 'silu')")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TextAttention(nn.Module):
    """GQA self-attention; biases on q/k/v only."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, S, hd)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, S, hd)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)                                          # (B, KV, past+S, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal,
                                             enable_gqa=self.num_heads != self.num_kv_heads)   # (B, H, S, hd)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TextAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = TextMLP(cfg)

    def forward(self, x, cos, sin, attn_bias, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_bias, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextDecoder(nn.Module):
    """embed_tokens -> layers -> norm. Returns the final normed hidden states; the output layer lives in Qwen2VL."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # {first layer of a range on another device: that device}, set by qwen2vl/placement.py; empty on one device
        self.split_points: dict[int, torch.device] = {}

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """inputs_embeds (B, S, D); position_ids (3, B, S); key_mask (B, past+S) bool, True = real token or None."""
        batch, seq, _ = inputs_embeds.shape
        past = cache.seq_len if cache is not None else 0
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=inputs_embeds.device)
        cos, sin = mrope_cos_sin(position_ids, inv_freq, self.cfg.mrope_section, inputs_embeds.dtype)
        attn_bias, is_causal = attention_bias(key_mask, batch, seq, past, inputs_embeds.dtype, inputs_embeds.device)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            device = self.split_points.get(i)
            if device is not None:          # a range on another device begins: carry what its layers read
                x, cos, sin = x.to(device), cos.to(device), sin.to(device)
                attn_bias = None if attn_bias is None else attn_bias.to(device)
            x = layer(x, cos, sin, attn_bias, is_causal, cache)
        return self.norm(x.to(self.norm.weight.device))


def attention_bias(key_mask: torch.Tensor | None, batch: int, seq: int, past: int, dtype: torch.dtype,
                   device) -> tuple[torch.Tensor | None, bool]:
    """Additive (B, 1, S, past+S) bias for causal + padding masking, or (None, is_causal) when no bias is needed.

    Masked entries get the dtype's minimum (not -inf) so a fully padded query row stays finite, like the reference.
    """
    if key_mask is None or bool(key_mask.all()):
        if seq == 1:
            return None, False
        if past == 0:
            return None, True
    total = past + seq
    q_pos = torch.arange(past, total, device=device).view(seq, 1)
    allowed = torch.arange(total, device=device).view(1, total) <= q_pos                # (S, past+S)
    allowed = allowed.view(1, 1, seq, total)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=device, dtype=torch.bool).view(batch, 1, 1, total)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min), False
