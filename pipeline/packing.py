"""Token-budget packing of tubes into encoder batches.

The vision tower attends within each temporal slice (one tube = 2 frames) and merges 2x2 blocks inside a slice, so a
segment's grid (t, h, w) can be cut into t tubes of grid (1, h, w) and encoded in any batch: the merged tokens of the
pieces, concatenated in order, equal those of the whole segment. Packing at tube granularity fills batches tightly
without padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TubeRef:
    item: int          # index of the segment in the caller's list
    tube: int          # temporal index inside that segment
    h: int             # grid height in patches
    w: int             # grid width in patches

    @property
    def patches(self) -> int:
        return self.h * self.w


@dataclass
class PackedBatch:
    tubes: list[TubeRef] = field(default_factory=list)
    patches: int = 0

    def fill_ratio(self, budget: int) -> float:
        return self.patches / budget


def pack_tubes(grids: list[tuple[int, int, int]], budget: int) -> list[PackedBatch]:
    """Greedy in-order packing of every tube of every grid into batches of at most `budget` patches.

    In-order keeps a segment's tubes together (their rows are contiguous, so gathering is a slice), and all but the last
    batch are full to within one tube. A single tube larger than the budget gets a batch of its own.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    batches: list[PackedBatch] = []
    cur = PackedBatch()
    for item, (t, h, w) in enumerate(grids):
        for k in range(int(t)):
            n = int(h) * int(w)
            if cur.tubes and cur.patches + n > budget:
                batches.append(cur)
                cur = PackedBatch()
            cur.tubes.append(TubeRef(item, k, int(h), int(w)))
            cur.patches += n
    if cur.tubes:
        batches.append(cur)
    return batches


def gather_batch(batch: PackedBatch, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel rows (patches, 1176) and per-tube grid_thw (tubes, 3) of one packed batch.

    rows[i] is segment i's pixel rows in the model's row order (t-major, docs/model.md §2), so tube k is a contiguous slice.
    Consecutive tubes of one segment are taken as one slice and one grid row (t>1), which the tower treats identically.
    """
    pieces, grid_rows = [], []
    i = 0
    while i < len(batch.tubes):
        ref = batch.tubes[i]
        j = i
        while j + 1 < len(batch.tubes) and batch.tubes[j + 1].item == ref.item and batch.tubes[j + 1].tube == batch.tubes[j].tube + 1:
            j += 1
        n_t = j - i + 1
        pieces.append(rows[ref.item][ref.tube * ref.patches:(ref.tube + n_t) * ref.patches])
        grid_rows.append((n_t, ref.h, ref.w))
        i = j + 1
    pixel_rows = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return pixel_rows, torch.tensor(grid_rows, dtype=torch.long)


def split_tokens(batch: PackedBatch, tokens: torch.Tensor, merge: int = 4) -> list[tuple[TubeRef, torch.Tensor]]:
    """Cut a batch's merged tokens back into per-tube pieces: (tube ref, tokens (patches/merge, D))."""
    out, offset = [], 0
    for ref in batch.tubes:
        n = ref.patches // merge
        out.append((ref, tokens[offset:offset + n]))
        offset += n
    if offset != tokens.shape[0]:
        raise ValueError(f"encoder returned {tokens.shape[0]} tokens, batch needs {offset}")
    return out
