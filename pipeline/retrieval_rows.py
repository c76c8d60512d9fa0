"""The rows and filters of the retrieval table (pipeline/retrieval.py): its schema, row validation, and the source
and window prefilter. Kept apart so the engine module holds only what talks to LanceDB."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa

from pipeline.index import check_number
from pipeline.records import source_of

MAX_CAPTION_CHARS = 10_000
MAX_QUERY_CHARS = 2000
MAX_LIMIT = 1000


def table_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("segment_id", pa.string()),
        ("source_id", pa.string()),
        ("t0", pa.float64()),
        ("t1", pa.float64()),
        ("caption", pa.string()),
        ("vector", pa.list_(pa.float32(), dim)),      # L2-normalised
        ("model_id", pa.string()),                    # the checkpoint that wrote the caption and vector
        ("visual", pa.list_(pa.float32(), dim)),      # the segment's pooled visual tokens (captions.pooled_visual)
    ])


def check_query_text(text) -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError(f"query_text must be a str or None, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("query_text is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(f"query_text has {len(text)} characters, at most {MAX_QUERY_CHARS}")


def check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an int in [1, {MAX_LIMIT}], got {limit!r}")
    return int(limit)


def check_window(start, end) -> tuple[float | None, float | None]:
    start, end = check_number("start", start), check_number("end", end)
    if start is not None and end is not None and end < start:
        raise ValueError(f"window end ({end}) must be >= start ({start})")
    return start, end


def unit_vector(name: str, vector, dim: int | None) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a 1-D vector, got shape {v.shape}")
    if dim is not None and v.size != dim:
        raise ValueError(f"{name} has {v.size} dimensions, the retrieval table has {dim}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has non-finite values")
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError(f"{name} is all zeros: it has no direction")
    return v / norm



def scope_filter(sources, start, end, *, sources_required: bool):
    """The prefilter: sources as a list of ids, and the window overlap rule of SegmentIndex.list."""
    from lancedb.expr import col, lit

    clauses = []
    if sources is None:
        if sources_required:
            raise ValueError("sources is required: the list of source ids a search may return")
    else:
        if isinstance(sources, str) or not isinstance(sources, Iterable):
            raise ValueError(f"sources must be a list of source ids, got {sources!r}")
        sources = list(dict.fromkeys(sources))
        if not sources:
            raise ValueError("sources must not be empty")
        for s in sources:
            if not isinstance(s, str) or not s:
                raise ValueError(f"every source must be a non-empty str, got {s!r}")
        clauses.append(col("source_id").isin(sources))
    start, end = check_window(start, end)
    if start is not None and end is not None and start == end:     # a point: the segments that contain it
        clauses += [col("t0") <= lit(start), col("t1") > lit(start)]
    else:
        if start is not None:
            clauses.append(col("t1") > lit(start))
        if end is not None:
            clauses.append(col("t0") < lit(end))
    if not clauses:
        return None
    out = clauses[0]
    for c in clauses[1:]:
        out = out & c
    return out


def rows_table(rows: Iterable[Mapping], dim: int) -> pa.Table:
    """Validated rows as an Arrow table; a segment_id given twice keeps its last row."""
    by_id: dict[str, Mapping] = {}
    for r in rows:
        if not isinstance(r, Mapping):
            raise ValueError(f"rows must be mappings, got {type(r).__name__}")
        sid = r.get("segment_id")
        if source_of(sid) != r.get("source_id"):
            raise ValueError(f"segment {sid!r} does not belong to source {r.get('source_id')!r}")
        t0, t1 = check_number("t0", r.get("t0")), check_number("t1", r.get("t1"))
        if t0 is None or t1 is None or t1 <= t0:
            raise ValueError(f"segment {sid!r} needs t0 < t1, got {r.get('t0')!r}, {r.get('t1')!r}")
        caption, model_id = r.get("caption"), r.get("model_id")
        if not isinstance(caption, str) or len(caption) > MAX_CAPTION_CHARS:
            raise ValueError(f"segment {sid!r}: caption must be a str of at most {MAX_CAPTION_CHARS} chars")
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"segment {sid!r}: model_id must be a non-empty str")
        by_id.pop(sid, None)
        by_id[sid] = r
    n = len(by_id)
    vectors = np.empty((n, dim), dtype=np.float32)
    visuals = np.empty((n, dim), dtype=np.float32)
    for i, (sid, r) in enumerate(by_id.items()):
        vectors[i] = unit_vector(f"vector of {sid!r}", r.get("vector"), dim)
        if r.get("visual") is None:
            raise ValueError(f"segment {sid!r}: visual (its pooled visual tokens) is missing")
        visuals[i] = unit_vector(f"visual of {sid!r}", r["visual"], dim)
    vals = list(by_id.values())
    return pa.table({
        "segment_id": pa.array(list(by_id), pa.string()),
        "source_id": pa.array([r["source_id"] for r in vals], pa.string()),
        "t0": pa.array([float(r["t0"]) for r in vals], pa.float64()),
        "t1": pa.array([float(r["t1"]) for r in vals], pa.float64()),
        "caption": pa.array([r["caption"] for r in vals], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        "model_id": pa.array([r["model_id"] for r in vals], pa.string()),
        "visual": pa.FixedSizeListArray.from_arrays(pa.array(visuals.reshape(-1), pa.float32()), dim),
    }, schema=table_schema(dim))
