"""Continuous batching's KV store: many sequences of different lengths decoding together, one slot (row) each.

Per layer one keys and one values buffer (rows, kv_heads, capacity, head_dim). Active sequences sit packed in rows
0..n-1, each with its own length and rope_delta; a decode step writes every row's new key and value at that row's
own length and attends over the buffers up to the longest row + 1, with a key mask hiding each row's unused tail.
Positions are explicit: (row length + rope_delta) on all three M-RoPE axes, what a sequence decoding alone gets
(docs/model.md §7). A sequence is prefilled on its own through `row_cache` (a batch-1 KVCache whose buffers are its
row's), so prompts of any length join without padding. Leaving swaps the last row into the freed one.
Capacity grows by doubling for all rows; rows are allocated as sequences join, up to max_rows.

Pure PyTorch: the scheduler that decides who joins and leaves lives in deploy/batching.py.
"""
from __future__ import annotations

import torch

from .text import KVCache


class SlotCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_rows: int, dtype: torch.dtype,
                 device: torch.device | str, layer_devices: list[torch.device] | None = None):
        """device: where positions and the key mask go (the embeddings'); layer_devices: each layer's buffers (a
        model split over devices, qwen2vl/placement.py), all on `device` when None."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_rows, self.dtype, self.device = max_rows, dtype, torch.device(device)
        self.layer_devices = [torch.device(d) for d in layer_devices] if layer_devices else [self.device] * num_layers
        if len(self.layer_devices) != num_layers:
            raise ValueError(f"{len(self.layer_devices)} layer devices for {num_layers} layers")
        self._keys: list[torch.Tensor] = []         # per layer (allocated rows, kv_heads, capacity, head_dim)
        self._values: list[torch.Tensor] = []
        self.lengths: list[int] = []                # per active row
        self.rope_deltas: list[int] = []
        self._write_at: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] | None = None  # this step's (row ids,
        # positions) on each layer device

    @classmethod
    def for_model(cls, model, max_rows: int) -> "SlotCache":
        cfg = model.config.text
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_rows, model.lm_head.weight.dtype,
                   model.input_device, [layer.self_attn.k_proj.weight.device for layer in model.model.layers])

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self._keys[0].shape[2] if self._keys else 0

    @property
    def seq_len(self) -> int:
        """The longest active row: what a decode step's attention calls the past."""
        return max(self.lengths, default=0)

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions (both grow by doubling; data of active rows kept)."""
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows asked of a cache of {self.max_rows}")
        have_rows = self._keys[0].shape[0] if self._keys else 0
        if rows <= have_rows and length <= self.capacity:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))
        capacity = max(length, 2 * self.capacity, 64) if length > self.capacity else self.capacity
        for store in (self._keys, self._values):
            for i in range(self.num_layers):
                # zeros, not empty: a masked key or value still enters the attention products (times a zero
                # weight), and uninitialised memory may hold NaN, which survives that
                grown = torch.zeros(new_rows, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                                    device=self.layer_devices[i])
                if store and self.rows:
                    n = self.seq_len
                    grown[:self.rows, :, :n] = store[i][:self.rows, :, :n]
                if len(store) > i:
                    store[i] = grown
                else:
                    store.append(grown)

    # ---- joining and leaving ----------------------------------------------------------------------------------
    def add_row(self, length: int) -> tuple[int, KVCache]:
        """A new row with room for `length` positions, and a batch-1 KVCache writing into it for its prefill;
        `adopt` the cache afterwards."""
        if self.rows >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are taken")
        self.reserve(self.rows + 1, length)
        row = self.rows
        self.lengths.append(0)
        self.rope_deltas.append(0)
        keys = [k[row:row + 1] for k in self._keys]
        values = [v[row:row + 1] for v in self._values]
        return row, KVCache.over(keys, values)

    def adopt(self, row: int, cache: KVCache) -> None:
        """Take over a row's prefilled batch-1 cache (copied in when it outgrew the row's buffers)."""
        if cache.batch_size != 1 or (cache.key_mask is not None and not bool(cache.key_mask.all())):
            raise ValueError("a row adopts an unpadded batch-1 cache")
        n = cache.seq_len
        self.reserve(self.rows, n + 1)
        for i in range(self.num_layers):
            k, v = cache.layer(i)
            if k.data_ptr() != self._keys[i][row].data_ptr():
                self._keys[i][row, :, :n] = k[0]
                self._values[i][row, :, :n] = v[0]
        self.lengths[row] = n
        self.rope_deltas[row] = 0 if cache.rope_deltas is None else int(cache.rope_deltas.view(-1)[0])

    def remove_row(self, row: int) -> int | None:
        """Free a row: the last row moves into it (returns the row that moved there, None when none did)."""
        last = self.rows - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            for store in (self._keys, self._values):
                for i in range(self.num_layers):
                    store[i][row, :, :n] = store[i][last, :, :n]
            self.lengths[row], self.rope_deltas[row] = n, self.rope_deltas[last]
            moved = last
        self.lengths.pop()
        self.rope_deltas.pop()
        return moved

    # ---- one decode step (TextDecoder's cache interface: seq_len, append) ----------------------------------------
    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Before a decode step of every active row: position_ids (3, rows, 1) and the key mask (rows, seq_len + 1),
        None when every row has the same length."""
        self.reserve(self.rows, self.seq_len + 1)
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        write_at = (torch.arange(self.rows, device=self.device), lengths)
        self._write_at = {d: tuple(t.to(d) for t in write_at) for d in set(self.layer_devices)}
        positions = (lengths + torch.tensor(self.rope_deltas, dtype=torch.long, device=self.device))
        positions = positions.view(1, -1, 1).expand(3, -1, 1)
        if min(self.lengths) == self.seq_len:
            return positions, None
        key_mask = torch.arange(self.seq_len + 1, device=self.device).view(1, -1) <= lengths.view(-1, 1)
        return positions, key_mask

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer i's new k/v (rows, kv_heads, 1, hd) at each row's own length; all rows' keys/values up to the
        longest + 1 (views)."""
        if self._write_at is None or k.shape[0] != self.rows or k.shape[2] != 1:
            raise RuntimeError("append is for one decode step of every active row, after begin_step")
        rows, at = self._write_at[self.layer_devices[i]]
        self._keys[i][rows, :, at] = k[:, :, 0]
        self._values[i][rows, :, at] = v[:, :, 0]
        n = self.seq_len + 1
        return self._keys[i][:self.rows, :, :n], self._values[i][:self.rows, :, :n]

    def end_step(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]
        self._write_at = None

    def abort_step(self) -> None:
        """A step that failed commits nothing: every row keeps its length (what it wrote past it is unused)."""
        self._write_at = None


@torch.no_grad()
def decode_step(model, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token for every active row of `cache`: tokens (rows,) -> final hidden states (rows, D); the cache grows
    by one position per row."""
    if tokens.shape != (cache.rows,):
        raise ValueError(f"one token per active row: expected ({cache.rows},), got {tuple(tokens.shape)}")
    positions, key_mask = cache.begin_step()
    try:
        embeds = model.embed(tokens.view(-1, 1), prefill=False)                           # (rows, 1, D)
        hidden = model.model(embeds, positions, key_mask, cache)
    except BaseException:
        cache.abort_step()
        raise
    cache.end_step()
    return hidden[:, -1].to(model.output_device)
