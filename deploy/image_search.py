"""Search by image: the segments whose footage looks most like an uploaded image (docs/architecture.md, "Images").

score(segment) = cosine(pooled visual tokens of the image, pooled visual tokens of the segment), pooled as
pipeline.captions.pooled_visual defines it. Both are outputs of the same vision tower and merger, so the pooled
vectors live in one space; no text model runs. Which segments are compared:
- captioned segments: the retrieval index keeps each one's pooled vector beside its caption, so every captioned
  segment of the window is considered: its nearest `candidates` are compared exactly, by the vectors it returns;
- the rest (not captioned yet, or every segment with captions off or a retrieval table written before it kept
  pooled vectors): all of them while they number at most `max_segments`, else that many spread evenly in time.
The coverage says which way each part went (`retrieval`, `compared`, `sampled`). Pooled vectors of the second kind
are kept in a bounded LRU, so a second search over the same footage reads no tokens.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch

from deploy.search import evenly_spaced
from pipeline.captions import pooled_visual

VECTOR_ENTRIES = 16_384          # pooled segment vectors kept (D floats each)


class ImageRanker:
    def __init__(self, read_tokens: Callable[[str], torch.Tensor], model_id: str, max_segments: int,
                 retrieval=None, candidates: int = 32):
        """retrieval: the RetrievalIndex (None with captions off); candidates: its nearest rows compared per search."""
        self.read_tokens, self.model_id, self.max_segments = read_tokens, model_id, max_segments
        self.retrieval, self.candidates = retrieval, candidates
        self._vectors: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def rank(self, image_tokens: torch.Tensor, rows: list[dict], pending: list[dict] | None = None,
             start: float | None = None, end: float | None = None) -> tuple[list[tuple[dict, float]], dict]:
        """Rows ranked by similarity to the image (best first), and the coverage. `rows`: the window's segments
        (in [start, end)); `pending`: those of them not captioned yet (None: all of them)."""
        pending = rows if pending is None else pending
        query = torch.from_numpy(pooled_visual(image_tokens))
        coverage = {"segments": len(rows), "captioned": len(rows) - len(pending), "retrieval": False}
        if self.retrieval is None or len(pending) == len(rows) or not self.retrieval.has_visual():
            picked = [rows[i] for i in evenly_spaced(len(rows), self.max_segments)]
            vectors = [self._vector(r["segment_id"]) for r in picked]
            sampled = len(picked) < len(rows)
        else:
            picked, vectors = self._nearest(query, rows, start, end)
            sample = [pending[i] for i in evenly_spaced(len(pending), self.max_segments)]
            picked += sample
            vectors += [self._vector(r["segment_id"]) for r in sample]
            sampled = len(sample) < len(pending)
            coverage["retrieval"] = True
        scores = (torch.stack(vectors) @ query).tolist()
        ranked = sorted(zip(picked, scores), key=lambda pair: (-pair[1], pair[0]["t0"], pair[0]["source_id"]))
        coverage.update(compared=len(picked), sampled=sampled, by="image")
        return ranked, coverage

    def _nearest(self, query: torch.Tensor, rows: list[dict], start, end) -> tuple[list[dict], list[torch.Tensor]]:
        """The window's captioned rows whose pooled vectors are nearest the image's (with their captions), and those
        vectors, as the retrieval index holds them."""
        hits = self.retrieval.nearest_visual(query.numpy(), sources=sorted({r["source_id"] for r in rows}),
                                             start=start, end=end, limit=self.candidates)
        by_id = {r["segment_id"]: r for r in rows}
        found = [h for h in hits if h["segment_id"] in by_id]
        return ([{**by_id[h["segment_id"]], "caption": h["caption"]} for h in found],
                [torch.from_numpy(h["visual"]) for h in found])

    def _vector(self, segment_id: str) -> torch.Tensor:
        key = (segment_id, self.model_id)
        with self._lock:
            vector = self._vectors.get(key)
            if vector is not None:
                self._vectors.move_to_end(key)
                return vector
        vector = torch.from_numpy(pooled_visual(self.read_tokens(segment_id)))
        with self._lock:
            self._vectors[key] = vector
            while len(self._vectors) > VECTOR_ENTRIES:
                self._vectors.popitem(last=False)
        return vector
