"""Search by image: the segments whose footage looks most like an uploaded image (docs/architecture.md, "Images").

score(segment) = cosine(mean of the image's visual tokens, mean of the segment's stored visual tokens). Both are
outputs of the same vision tower and merger, so the pooled vectors live in one space; no text model runs. Every
segment of the window is compared while the window holds at most `max_segments`; a longer window is compared on
`max_segments` segments spread evenly over it, and the coverage says so (`sampled`). Pooled segment vectors are kept
in a bounded LRU, so a second search over the same footage reads no tokens.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch

from deploy.search import evenly_spaced

VECTOR_ENTRIES = 16_384          # pooled segment vectors kept (D floats each)


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of visual tokens (n, D), in fp32 on the CPU."""
    mean = tokens.float().mean(dim=0).cpu()
    return mean / mean.norm().clamp_min(1e-12)


class ImageRanker:
    def __init__(self, read_tokens: Callable[[str], torch.Tensor], model_id: str, max_segments: int):
        self.read_tokens, self.model_id, self.max_segments = read_tokens, model_id, max_segments
        self._vectors: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def rank(self, image_tokens: torch.Tensor, rows: list[dict]) -> tuple[list[tuple[dict, float]], dict]:
        """Rows ranked by similarity to the image (best first), and the coverage: segments of the window, how many
        were compared, and whether they were a sample."""
        picked = [rows[i] for i in evenly_spaced(len(rows), self.max_segments)]
        query = pooled(image_tokens)
        vectors = torch.stack([self._vector(r["segment_id"]) for r in picked])
        scores = (vectors @ query).tolist()
        ranked = sorted(zip(picked, scores), key=lambda pair: -pair[1])
        coverage = {"segments": len(rows), "compared": len(picked), "sampled": len(picked) < len(rows),
                    "by": "image"}
        return ranked, coverage

    def _vector(self, segment_id: str) -> torch.Tensor:
        key = (segment_id, self.model_id)
        with self._lock:
            vector = self._vectors.get(key)
            if vector is not None:
                self._vectors.move_to_end(key)
                return vector
        vector = pooled(self.read_tokens(segment_id))
        with self._lock:
            self._vectors[key] = vector
            while len(self._vectors) > VECTOR_ENTRIES:
                self._vectors.popitem(last=False)
        return vector
