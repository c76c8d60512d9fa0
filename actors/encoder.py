"""VisionEncoder: runs the Qwen2-VL vision tower over packed, variable-resolution batches of tubes.

Used two ways with the same code: called on numpy batches of segment rows by the archive encoder actors
(pipeline.encoder_pool), and as a plain object inside the live indexer.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import metrics
from pipeline.checkpoints import model_id as checkpoint_model_id
from pipeline.checkpoints import pixel_norm
from pipeline.long_tier import needs_long_file
from pipeline.packing import gather_batch, pack_tubes, split_tokens
from pipeline.tubes import long_grid, resize_rows

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EncodeStats:
    batches: int = 0
    tubes: int = 0
    patches: int = 0
    fill_sum: float = 0.0        # sum of per-batch fill ratios (packed patches / budget)
    seconds: float = 0.0

    @property
    def mean_fill(self) -> float:
        return self.fill_sum / self.batches if self.batches else 0.0


class VisionEncoder:
    def __init__(self, model_path: str, token_budget: int = 16384, dtype: str = "float32", device: str | None = None,
                 on_batch=None, pipeline: str = "archive", threads: int | None = None, long_pixels: int = 0):
        """threads: torch intra-op threads; None keeps the process default (Ray sets 1 for a fractional CPU).
        long_pixels: also encode every tube at this area per frame (the long-video tier; 0: off)."""
        import qwen2vl

        if pipeline not in metrics.PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(metrics.PIPELINES)}, got {pipeline!r}")
        self.pipeline = pipeline                                         # metrics label: live or archive

        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _DTYPES[dtype]
        self.token_budget = int(token_budget)
        self.long_pixels = int(long_pixels)
        self.visual = qwen2vl.load_vision(model_path, dtype=self.dtype, device=self.device)
        vcfg = self.visual.cfg
        self.merge = vcfg.spatial_merge_size ** 2
        self.model_id = checkpoint_model_id(model_path)
        mean, std = pixel_norm(model_path)
        per_channel = vcfg.patch_dim // len(mean)
        # uint8 rows are normalised here, per column: row layout is (channel, tp, py, px) (docs/model.md §2)
        std_t = torch.tensor(std, dtype=torch.float32).repeat_interleave(per_channel)
        mean_t = torch.tensor(mean, dtype=torch.float32).repeat_interleave(per_channel)
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)          # (1176,)
        self._shift = (-mean_t / std_t).to(self.device)                  # (1176,)
        self._input_buffer = torch.empty(0, dtype=torch.float32)        # reused by _normalize_in_buffer
        self.stats = EncodeStats()
        self.on_batch = on_batch                                         # callback(fill_ratio, seconds, patches)

    def _rows_to_input(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.uint8 and torch.device(self.device).type == "cpu":
            return self._normalize_in_buffer(rows).to(self.dtype)
        rows = rows.to(self.device)
        if rows.dtype == torch.uint8:
            rows = torch.addcmul(self._shift, rows.float(), self._scale)
        return rows.to(self.dtype)

    def _normalize_in_buffer(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 rows -> normalised fp32 rows in a buffer kept between batches.

        On CPU a fresh tensor of a full batch (~77 MB) is page-faulted in on every batch, which costs 7x the
        arithmetic; the same addcmul written in place gives bit-identical values. Valid until the next call, so one
        encode at a time per encoder (Ray Data actors and the live indexer's loop both call it sequentially).
        """
        n = rows.numel()
        if self._input_buffer.numel() < n:
            self._input_buffer = torch.empty(n, dtype=torch.float32)
        out = self._input_buffer[:n].view(rows.shape)
        out.copy_(rows)
        return torch.addcmul(self._shift, out, self._scale, out=out)

    @torch.inference_mode()
    def encode(self, rows: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Merged visual tokens (fp16, on CPU) for each item: rows[i] (patches, 1176) with grid grids[i] = (t, h, w)."""
        for r, (t, h, w) in zip(rows, grids):
            if r.shape[0] != t * h * w:
                raise ValueError(f"pixel rows {tuple(r.shape)} do not match grid {(t, h, w)}")
        pieces: list[list[tuple[int, torch.Tensor]]] = [[] for _ in rows]
        for batch in pack_tubes(grids, self.token_budget):
            t0 = time.perf_counter()
            pixel_rows, grid_thw = gather_batch(batch, rows)
            tokens = self.visual(self._rows_to_input(pixel_rows), grid_thw.to(self.device))
            tokens = tokens.to("cpu", torch.float16)
            for ref, tok in split_tokens(batch, tokens, self.merge):
                pieces[ref.item].append((ref.tube, tok))
            dt = time.perf_counter() - t0
            fill = batch.fill_ratio(self.token_budget)
            self.stats.batches += 1
            self.stats.tubes += len(batch.tubes)
            self.stats.patches += batch.patches
            self.stats.fill_sum += fill
            self.stats.seconds += dt
            metrics.record_encoder_batch(fill, dt, batch.patches, len(batch.tubes), tokens=int(tokens.shape[0]),
                                         pipeline=self.pipeline)
            if self.on_batch is not None:
                self.on_batch(fill, dt, batch.patches)
        return [torch.cat([tok for _, tok in sorted(p, key=lambda x: x[0])]) for p in pieces]

    def encode_tiers(self, rows: list[torch.Tensor], grids: list[tuple[int, int, int]],
                     need_full: list[bool] | None = None, need_long: list[bool] | None = None
                     ) -> tuple[list, list, list]:
        """Both tiers in one packed encode: (full tokens or None where need_full is False, long-tier tokens or None
        where the segment needs no long file or need_long is False, long grids). Rows are uint8 pixel rows of the
        index resolution."""
        need_full = [True] * len(rows) if need_full is None else list(need_full)
        need_long = [True] * len(rows) if need_long is None else list(need_long)
        rows = [r.to(self.device) for r in rows]          # one device for every piece a packed batch gathers
        long_grids = [long_grid(g, self.long_pixels) for g in grids]
        want_long = [needs_long_file(g, self.long_pixels) and wanted for g, wanted in zip(grids, need_long)]
        items, item_grids = [], []
        for r, g, full in zip(rows, grids, need_full):
            if full:
                items.append(r)
                item_grids.append(g)
        for r, g, lg, want in zip(rows, grids, long_grids, want_long):
            if want:
                items.append(resize_rows(r, g, lg))
                item_grids.append(lg)
        tokens = iter(self.encode(items, item_grids) if items else [])
        full_tokens = [next(tokens) if full else None for full in need_full]
        long_tokens = [next(tokens) if want else None for want in want_long]
        return full_tokens, long_tokens, long_grids

    # ---- archive adapter: a batch of segment rows (Ray Data numpy format) -> the same rows plus tokens -------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["segment_id"])
        ok = [i for i in range(n) if not batch["error"][i] and batch["segment_id"][i]]   # skip error and empty rows
        with warnings.catch_warnings():   # Ray hands read-only object-store memory; rows are only ever read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            rows = [torch.from_numpy(np.asarray(batch["pixel_rows"][i])) for i in ok]
        grids = [tuple(int(x) for x in batch["grid_thw"][i]) for i in ok]
        need_full = [bool(batch["need_full"][i]) for i in ok] if "need_full" in batch else None
        need_long = [bool(batch["need_long"][i]) for i in ok] if "need_long" in batch else None
        full, low, low_grids = self.encode_tiers(rows, grids, need_full, need_long) if ok else ([], [], [])
        result = {k: v for k, v in batch.items() if k != "pixel_rows"}
        result.update(_token_columns(n, ok, full, ""))
        result.update(_token_columns(n, ok, low, "long_"))
        long_grid_col = np.zeros((n, 3), np.int64)
        for i, g in zip(ok, low_grids):
            long_grid_col[i] = g
        result["long_grid_thw"] = long_grid_col
        result["model_id"] = np.array([self.model_id] * n, dtype=object)
        return result


def _token_columns(n: int, ok: list[int], tokens: list, prefix: str) -> dict[str, np.ndarray]:
    """`tokens`, `token_dim`, `n_tokens` columns (with a prefix) of n rows; rows without tokens get b"" and 0."""
    out_tokens, dims = [b""] * n, [0] * n
    for i, tok in zip(ok, tokens):
        if tok is not None:
            out_tokens[i] = tok.numpy().tobytes()
            dims[i] = tok.shape[1]
    return {f"{prefix}tokens": np.array(out_tokens, dtype=object),
            f"{prefix}token_dim": np.array(dims, dtype=np.int64),
            f"{prefix}n_tokens": np.array([len(t) // (2 * d) if d else 0 for t, d in zip(out_tokens, dims)],
                                          dtype=np.int64)}
