"""Qwen2-VL vision tower (docs/model.md §5): patch embed, 2D-rotary ViT blocks, 2x2 patch merger.

One call encodes a packed batch of many images and video tubes of different sizes. Attention stays inside each
temporal slice (cu_seqlens); nothing is padded and no mask over the batch is ever built.

Speed (inference only; forward runs under no_grad and updates the hidden state in place):
- the batch is walked in row tiles made of whole temporal slices, so every intermediate of a block is a few MiB.
  On CPU that keeps elementwise work in cache and, more importantly, below glibc's mmap threshold: large
  temporaries are otherwise mmapped and page-faulted afresh on every op. On GPU there is one tile.
- inside a tile, contiguous slices of equal length go to SDPA as one batch (a view, no copy); on GPU with
  flash-attn installed the whole tile is one varlen call.
- quick_gelu(u) = silu(1.702 u) / 1.702: both scalings ride on the GEMMs' alpha/beta, leaving one in-place silu
  over the widest activation. Each branch output is rounded once and added to the residual in place, which in
  bf16 rounds exactly as often as the reference does.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2vl.config import VisionConfig

try:  # the GPU varlen kernel; optional (not installed on CPU machines)
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a flash-attn built against another CUDA/torch
    flash_attn_varlen_func = None

LN_EPS = 1e-6
ROPE_THETA = 10000.0
QUICK_GELU_SCALE = 1.702          # quick_gelu(x) = x * sigmoid(1.702 x)
CPU_TILE_BYTES = 28 * 2**20       # widest per-tile intermediate on CPU: under glibc's 32 MiB mmap ceiling


# ---- grids, segments, positions -------------------------------------------------------------------------------

def grid_list(grid_thw, spatial_merge_size: int = 2) -> list[tuple[int, int, int]]:
    """Validate grid_thw ([n_items, 3] integer rows (t, h, w) in patch units) and return it as Python tuples."""
    grid = torch.as_tensor(grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n_items, 3] (t, h, w), got {tuple(grid.shape)}")
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise ValueError(f"grid_thw must be an integer tensor, got {grid.dtype}")
    rows = [tuple(r) for r in grid.tolist()]
    for i, (t, h, w) in enumerate(rows):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: every extent must be >= 1")
        if h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: h and w must be divisible by "
                             f"spatial_merge_size={spatial_merge_size}")
    return rows


def vision_cu_seqlens(grid_thw) -> Tensor:
    """Attention segment boundaries: one segment per temporal slice (h*w patches), int32 [n_slices + 1]."""
    grid = torch.as_tensor(grid_thw)
    grid_list(grid, spatial_merge_size=1)                     # shape / dtype / positivity checks
    seqlens = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


@lru_cache(maxsize=512)
def _grid_pos_ids(h: int, w: int, merge: int) -> Tensor:
    """(h_id, w_id) of each patch of one h x w slice, in pixel-row order (merge blocks in raster order). (h*w, 2)"""
    h_ids = torch.arange(h, device="cpu").view(h // merge, 1, merge, 1).expand(h // merge, w // merge, merge, merge)
    w_ids = torch.arange(w, device="cpu").view(1, w // merge, 1, merge).expand(h // merge, w // merge, merge, merge)
    return torch.stack([h_ids.reshape(-1), w_ids.reshape(-1)], dim=-1)


def vision_rotary_pos_ids(grid_thw, spatial_merge_size: int = 2) -> Tensor:
    """2D rotary position ids of every patch of a packed batch (docs/model.md §5), LongTensor [N, 2] (h_id, w_id)."""
    grid = grid_list(grid_thw, spatial_merge_size)
    if not grid:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.cat([_grid_pos_ids(h, w, spatial_merge_size).repeat(t, 1) for t, h, w in grid])


class VisionRotary:
    """fp32 2D rotary for the ViT: a frequency table grown on demand and cos/sin cached per (h, w) slice shape."""

    def __init__(self, head_dim: int, spatial_merge_size: int, theta: float = ROPE_THETA, max_cached_grids: int = 64):
        if head_dim % 4:
            raise ValueError(f"vision head_dim must be divisible by 4 for the 2D rotary, got {head_dim}")
        dim = head_dim // 2      # each of the h and w axes gets head_dim/4 frequencies
        # Tables live on the CPU whatever torch's default device was when the tower was built (load_pretrained
        # builds under `with torch.device(...)`); cos_sin copies each slice's result to the device once.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        self.merge = spatial_merge_size
        self.max_cached_grids = max_cached_grids
        self._table = torch.zeros(0, dim // 2, device="cpu")
        self._cos_sin: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

    def table(self, n_positions: int) -> Tensor:
        """angles p * inv_freq for p < n_positions, (>= n_positions, head_dim/4) fp32; grows by doubling."""
        if n_positions > self._table.shape[0]:
            size = max(n_positions, 2 * self._table.shape[0])
            self._table = torch.outer(torch.arange(size, dtype=torch.float, device="cpu"), self.inv_freq)
        return self._table

    def cos_sin(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of one slice's angles, each (h*w, head_dim/2) fp32 (first half height, second half width)."""
        key = (h, w, device)
        hit = self._cos_sin.get(key)
        if hit is not None:
            self._cos_sin.move_to_end(key)
            return hit
        pos = _grid_pos_ids(h, w, self.merge)                     # (h*w, 2)
        angles = self.table(max(h, w))[pos].flatten(1)            # (h*w, head_dim/2)
        hit = (angles.cos().to(device), angles.sin().to(device))
        self._cos_sin[key] = hit
        if len(self._cos_sin) > self.max_cached_grids:
            self._cos_sin.popitem(last=False)
        return hit

    def for_batch(self, grid: list[tuple[int, int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin for every patch of a packed batch, each (N, head_dim/2) fp32."""
        pairs = [self.cos_sin(h, w, device) for _, h, w in grid]
        cos = torch.cat([c for (t, _, _), (c, _) in zip(grid, pairs) for _ in range(t)])
        sin = torch.cat([s for (t, _, _), (_, s) in zip(grid, pairs) for _ in range(t)])
        return cos, sin


# ---- the packing plan: tiles of whole slices ------------------------------------------------------------------

@dataclass
class Tile:
    start: int                               # first row in the packed batch
    stop: int
    runs: list[tuple[int, int, int]]         # (start, stop, seq_len) tile-relative: contiguous equal-length slices
    cu_seqlens: Tensor | None = None         # tile-relative int32, only for flash-attn varlen
    max_seqlen: int = 0


def plan_tiles(grid: list[tuple[int, int, int]], tile_rows: int) -> list[Tile]:
    """Cut the packed batch into tiles of whole slices, each <= tile_rows rows (a longer slice gets its own tile)."""
    tiles: list[Tile] = []
    start = row = 0
    runs: list[list[int]] = []
    for t, h, w in grid:
        seq_len = h * w
        for _ in range(t):
            if row > start and row + seq_len - start > tile_rows:
                tiles.append(Tile(start, row, [tuple(r) for r in runs]))
                start, runs = row, []
            if runs and runs[-1][2] == seq_len:
                runs[-1][1] = row - start + seq_len               # extend the run of equal-length slices
            else:
                runs.append([row - start, row - start + seq_len, seq_len])
            row += seq_len
    if row > start:
        tiles.append(Tile(start, row, [tuple(r) for r in runs]))
    return tiles


def _add_varlen_info(tiles: list[Tile], device: torch.device) -> None:
    for tile in tiles:
        lens = [L for s, e, L in tile.runs for _ in range((e - s) // L)]
        tile.cu_seqlens = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)
        tile.max_seqlen = max(lens)


# ---- modules --------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over (2, 14, 14) tubes, computed as one matmul against the [E, 1176] view."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Only .weight is used ([E, C, T, P, P], the checkpoint's shape); the Conv3d forward never runs.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_rows: Tensor) -> Tensor:
        weight = self.proj.weight                                           # (E, C, T, P, P)
        return F.linear(pixel_rows.to(weight.dtype), weight.view(weight.shape[0], -1))   # (N, E)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim, bias=True)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim, bias=True)


_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "gelu_pytorch_tanh": lambda u: F.gelu(u, approximate="tanh")}


def apply_vision_rotary(qk: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> Tensor:
    """Rotate q and k (rotate_half convention) with fp32 math and write them, in qk's dtype, to out.

    qk, out: (R, 2, heads, head_dim) (out contiguous); cos, sin: (R, head_dim/2) fp32.
    """
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half], qk[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]          # broadcast over (q|k, heads)
    if qk.dtype == torch.float32:
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)      # x1 cos - x2 sin
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin)                  # x2 cos + x1 sin
    else:                                                             # bf16/fp16: fp32 temporaries, one rounding
        o1.copy_(torch.mul(x1, cos).addcmul_(x2, sin, value=-1.0))
        o2.copy_(torch.mul(x2, cos).addcmul_(x1, sin))
    return out


def tile_attention(q: Tensor, k: Tensor, v: Tensor, tile: Tile) -> Tensor:
    """Non-causal attention within each slice of a tile. q, k, v: (R, heads, head_dim) views -> (R, heads*head_dim)."""
    rows, heads, head_dim = q.shape
    scale = head_dim ** -0.5
    if tile.cu_seqlens is not None:
        out = flash_attn_varlen_func(q, k, v, tile.cu_seqlens, tile.cu_seqlens, tile.max_seqlen, tile.max_seqlen,
                                     dropout_p=0.0, softmax_scale=scale, causal=False)   # (R, heads, head_dim)
        return out.reshape(rows, heads * head_dim)

    def run_sdpa(start: int, stop: int, seq_len: int) -> Tensor:      # -> (B, heads, L, head_dim)
        b = (stop - start) // seq_len
        qb, kb, vb = (x[start:stop].view(b, seq_len, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb, scale=scale)

    if len(tile.runs) == 1:
        return run_sdpa(*tile.runs[0]).transpose(1, 2).reshape(rows, heads * head_dim)
    out = q.new_empty(rows, heads, head_dim)
    for start, stop, seq_len in tile.runs:
        b = (stop - start) // seq_len
        out[start:stop].view(b, seq_len, heads, head_dim).copy_(run_sdpa(start, stop, seq_len).transpose(1, 2))
    return out.view(rows, heads * head_dim)


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x += proj(attn(rope(qkv(ln1 x)))); x += fc2(act(fc1(ln2 x))). Updates x in place."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)
        if cfg.hidden_act != "quick_gelu" and cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {cfg.hidden_act!r}; expected quick_gelu or one of "
                             f"{sorted(_ACTIVATIONS)}")
        self.hidden_act = cfg.hidden_act

    def forward(self, x: Tensor, tiles: list[Tile], cos: Tensor, sin: Tensor, mlp_rows: int) -> Tensor:
        for tile in tiles:
            rows = slice(tile.start, tile.stop)
            self._attention(x[rows], tile, cos[rows], sin[rows])
            x_tile = x[rows]
            for r in range(0, x_tile.shape[0], mlp_rows):              # a long slice's MLP in bounded chunks
                self._mlp(x_tile[r:r + mlp_rows])
        return x

    def _attention(self, x: Tensor, tile: Tile, cos: Tensor, sin: Tensor) -> None:
        attn = self.attn
        rows = x.shape[0]
        h = F.layer_norm(x, x.shape[-1:], self.norm1.weight, self.norm1.bias, LN_EPS)
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(rows, 3, attn.num_heads, attn.head_dim)
        qk = apply_vision_rotary(qkv[:, :2], cos, sin, out=torch.empty_like(qkv[:, :2]))   # (R, 2, heads, hd)
        o = tile_attention(qk[:, 0], qk[:, 1], qkv[:, 2], tile)                             # (R, E)
        x.add_(torch.addmm(attn.proj.bias, o, attn.proj.weight.t()))   # branch rounded once, then the residual

    def _mlp(self, x: Tensor) -> None:
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        h = F.layer_norm(x, x.shape[-1:], self.norm2.weight, self.norm2.bias, LN_EPS)
        if self.hidden_act == "quick_gelu":
            # u = 1.702 (h W1^T + b1); quick_gelu = silu(u) / 1.702, the 1/1.702 going into fc2's alpha.
            u = torch.addmm(fc1.bias, h, fc1.weight.t(), beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)
            F.silu(u, inplace=True)
            x.add_(torch.addmm(fc2.bias, u, fc2.weight.t(), alpha=1.0 / QUICK_GELU_SCALE))
        else:
            u = _ACTIVATIONS[self.hidden_act](F.linear(h, fc1.weight, fc1.bias))
            x.add_(F.linear(u, fc2.weight, fc2.bias))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 block (4 consecutive rows) -> Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.group_dim = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.group_dim, self.group_dim), nn.GELU(),
                                 nn.Linear(self.group_dim, cfg.hidden_size))

    def forward(self, x: Tensor, chunk_tokens: int) -> Tensor:
        group = self.group_dim // x.shape[1]                      # patches per output token (4)
        n_tokens = x.shape[0] // group
        lin0, lin2 = self.mlp[0], self.mlp[2]
        out = x.new_empty(n_tokens, lin2.weight.shape[0])          # (N/4, hidden)
        for s in range(0, n_tokens, chunk_tokens):
            e = min(s + chunk_tokens, n_tokens)
            y = F.layer_norm(x[s * group:e * group], x.shape[-1:], self.ln_q.weight, self.ln_q.bias, LN_EPS)
            y = F.gelu(F.linear(y.view(e - s, self.group_dim), lin0.weight, lin0.bias))
            torch.addmm(lin2.bias, y, lin2.weight.t(), out=out[s:e])
        return out


class VisionTransformer(nn.Module):
    """pixel rows [N, patch_dim] + grid_thw [n_items, 3] -> merged visual tokens [N / merge^2, hidden_size].

    Parameter names match the checkpoint's `visual.*` tensors without the prefix. Inference only.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"vision embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)
        self.rotary = VisionRotary(cfg.head_dim, cfg.spatial_merge_size)
        self.tile_rows: int | None = None      # override for the tile size (tests, tuning); None = by device

    def _tile_rows(self, dtype: torch.dtype, device: torch.device) -> int:
        if self.tile_rows is not None:
            return self.tile_rows
        if device.type != "cpu":
            return 2**62                        # one tile: GPU kernels want the whole batch
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return max(64, CPU_TILE_BYTES // (max(self.cfg.mlp_dim, 3 * self.cfg.embed_dim) * itemsize))

    @torch.no_grad()
    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        cfg = self.cfg
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must have shape [N, {cfg.patch_dim}] (C*T*P*P = {cfg.in_channels}*"
                             f"{cfg.temporal_patch_size}*{cfg.patch_size}*{cfg.patch_size}), "
                             f"got {tuple(pixel_values.shape)}")
        grid = grid_list(grid_thw, cfg.spatial_merge_size)
        n_rows = sum(t * h * w for t, h, w in grid)
        if n_rows != pixel_values.shape[0]:
            raise ValueError(f"grid_thw describes {n_rows} patches (sum of t*h*w) but pixel_values has "
                             f"{pixel_values.shape[0]} rows")
        weight = self.patch_embed.proj.weight
        device, dtype = weight.device, weight.dtype
        if n_rows == 0:
            return torch.zeros(0, cfg.hidden_size, dtype=dtype, device=device)

        tile_rows = self._tile_rows(dtype, device)
        tiles = plan_tiles(grid, tile_rows)
        if flash_attn_varlen_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            _add_varlen_info(tiles, device)
        cos, sin = self.rotary.for_batch(grid, device)                 # (N, head_dim/2) fp32 each

        x = self.patch_embed(pixel_values.to(device))                  # (N, E), ours to update in place
        for block in self.blocks:
            block(x, tiles, cos, sin, mlp_rows=tile_rows)
        merge = cfg.spatial_merge_size ** 2
        return self.merger(x, chunk_tokens=max(1, tile_rows // merge))  # (N / 4, hidden)
