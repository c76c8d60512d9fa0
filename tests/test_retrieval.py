"""RetrievalIndex on real LanceDB tables in temp folders: needles among thousands of segments (text, vector,
hybrid), source scope and windows as prefilters, idempotent upserts, deletes and rebuilds, a missing or corrupt
folder, bad queries, one writer beside many readers; and that the footage index ignores the `_retrieval` folder."""
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.index import SegmentIndex
from pipeline.records import segment_id_for
from pipeline.retrieval import FOLDER, RetrievalIndex, RetrievalUnavailable
from pipeline.retrieval_rows import MAX_QUERY_CHARS
from tests.test_index import make_segment

DIM = 64                                   # the tiny test model's hidden size
MODEL = "tiny-qwen2vl@0123abcd"
T0 = 1_700_000_000.0                       # live feeds use epoch seconds
N = 5_000
NEEDLE = "a red forklift crossing the loading dock"
QUERY = "red forklift crossing the loading dock"


def vocabulary(rng, n=400) -> list[str]:
    """Pronounceable nonsense words: none is a query word, so only planted captions match."""
    cons, vows = list("bdfgklmnprstvz"), list("aeiou")
    words = {"".join(rng.choice(cons) + rng.choice(vows) for _ in range(3)) for _ in range(n * 2)}
    return sorted(words)[:n]


def unit(rng, n, dim=DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows_for(source: str, n: int, seed: int, t_base: float = T0, dim: int = DIM) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    vectors, visuals = unit(rng, n, dim), unit(rng, n, dim)
    out = []
    for i in range(n):
        t0 = t_base + 8.0 * i
        caption = " ".join(rng.choice(words, size=int(rng.integers(6, 14))))
        if i % 97 == 5:                    # distractors: some query words, never all of them
            caption += " red truck near the dock"
        elif i % 89 == 7:
            caption += " a forklift parked by the wall"
        out.append({"segment_id": segment_id_for(source, t0), "source_id": source, "t0": t0, "t1": t0 + 8.0,
                    "caption": caption, "vector": vectors[i], "model_id": MODEL, "visual": visuals[i]})
    return out


def make_index(root: Path, dim: int = DIM) -> RetrievalIndex:
    SegmentIndex(root)                     # the footage index the retrieval table sits beside
    return RetrievalIndex(root, dim=dim, create=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """5,000 segments of cam-a (one window), 1,000 of cam-b whose rows match the needle query better."""
    root = tmp_path_factory.mktemp("retrieval")
    ix = make_index(root)
    a = rows_for("cam-a", N, seed=1)
    b = rows_for("cam-b", 1_000, seed=2)
    for r in b[::10]:
        r["caption"] = NEEDLE + " " + NEEDLE                 # a better BM25 match than any cam-a row
    ix.upsert(a[:2_500])
    ix.upsert(a[2_500:])
    ix.upsert(b)
    return ix, a, b


def plant(ix, rows, i, caption=NEEDLE, vector=None) -> dict:
    r = dict(rows[i], caption=caption)
    if vector is not None:
        r["vector"] = vector
    ix.upsert([r])
    return r


# ---- needles ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_text_needle_is_found_first_anywhere_in_the_window(big, where):
    ix, a, _ = big
    i = {"start": 0, "middle": N // 2, "end": N - 1}[where]
    needle = plant(ix, a, i)
    try:
        start, end = a[0]["t0"], a[-1]["t1"]
        hits = ix.search(QUERY, sources=["cam-a"], start=start, end=end, limit=10)
        assert hits[0]["segment_id"] == needle["segment_id"]
        assert hits[0]["caption"] == NEEDLE and hits[0]["score"] > hits[1]["score"]
        assert {h["source_id"] for h in hits} == {"cam-a"}
        # hybrid with a query vector near the needle's (as a text encoder would give): still first
        rng = np.random.default_rng(i)
        q = needle["vector"] + 0.3 * unit(rng, 1)[0]
        hits = ix.search(QUERY, q, sources=["cam-a"], start=start, end=end, limit=10)
        assert hits[0]["segment_id"] == needle["segment_id"]
    finally:
        ix.upsert([a[i]])                                    # the original caption back: one needle at a time


@pytest.mark.parametrize("i", [0, N // 2, N - 1])
def test_vector_needle_is_found_first(big, i):
    ix, a, _ = big
    rng = np.random.default_rng(100 + i)
    planted = unit(rng, 1)[0]
    needle = plant(ix, a, i, caption=a[i]["caption"], vector=planted)
    try:
        q = planted + 0.5 * unit(rng, 1)[0]                   # a noisy query, cosine ~0.9 to the needle
        hits = ix.search(None, q, sources=["cam-a"], start=a[0]["t0"], end=a[-1]["t1"], limit=5)
        assert hits[0]["segment_id"] == needle["segment_id"]
        assert hits[0]["score"] == pytest.approx(float(np.dot(planted, q / np.linalg.norm(q))), abs=1e-4)
        assert hits[0]["score"] > hits[1]["score"]
    finally:
        ix.upsert([a[i]])


# ---- scope and windows --------------------------------------------------------------------------------------------
def test_a_source_scope_is_a_prefilter_other_sources_never_appear_or_crowd(big):
    ix, a, b = big
    needle = plant(ix, a, 1234)
    try:
        b_vec = b[0]["vector"]                               # a query vector that is exactly one of cam-b's rows
        for text, vec in [(QUERY, None), (None, b_vec), (QUERY, b_vec)]:
            hits = ix.search(text, vec, sources=["cam-a"], limit=1)     # cam-b holds 100 better text matches
            assert [h["source_id"] for h in hits] == ["cam-a"]
            hits = ix.search(text, vec, sources=["cam-a"], limit=50)
            assert len(hits) == 50 and {h["source_id"] for h in hits} == {"cam-a"}
        assert ix.search(QUERY, sources=["cam-a"], limit=1)[0]["segment_id"] == needle["segment_id"]
        both = ix.search(QUERY, sources=["cam-a", "cam-b"], limit=20)
        assert {h["source_id"] for h in both} == {"cam-b"}   # the better matches, once cam-b is in scope
        assert ix.search(None, b_vec, sources=["cam-b"], limit=1)[0]["segment_id"] == b[0]["segment_id"]
        assert ix.search(QUERY, sources=["cam-nobody"]) == []
        assert ix.count(["cam-a"]) == N and ix.count(["cam-b"]) == 1_000 and ix.count() == N + 1_000
        assert ix.count(["cam-a", "cam-b", "cam-nobody"]) == N + 1_000
    finally:
        ix.upsert([a[1234]])


def test_window_filter_uses_overlap_and_point_rules(big):
    ix, a, _ = big
    start, end = a[100]["t0"] + 4.0, a[110]["t0"]           # mid-segment 100 up to the start of segment 110
    assert ix.count(["cam-a"], start, end) == 10            # segments 100..109 overlap [start, end)
    assert ix.count(["cam-a"], a[100]["t1"], a[100]["t1"]) == 1      # a point: the one segment containing it
    assert ix.count(["cam-a"], start=a[-1]["t0"]) == 1 and ix.count(["cam-a"], end=a[0]["t1"]) == 1
    assert ix.count(["cam-a"], start=a[-1]["t1"]) == 0
    rng = np.random.default_rng(5)
    for text, vec in [(QUERY, None), ("forklift dock", unit(rng, 1)[0]), (None, unit(rng, 1)[0])]:
        hits = ix.search(text, vec, sources=["cam-a"], start=start, end=end, limit=100)
        assert hits and all(h["t1"] > start and h["t0"] < end for h in hits)
    hits = ix.search(None, unit(rng, 1)[0], sources=["cam-a"], start=start, end=end, limit=100)
    assert sorted(h["segment_id"] for h in hits) == sorted(r["segment_id"] for r in a[100:110])


def test_odd_source_ids_and_query_characters_are_data_not_syntax(tmp_path):
    ix = make_index(tmp_path)
    odd = ["o'brien\\cam", "lot/a b", "x') OR ('1'='1", "日本:cam"]
    for k, s in enumerate(odd):
        ix.upsert(rows_for(s, 20, seed=k))
    for s in odd:
        assert ix.count([s]) == 20
        hits = ix.search("truck", unit(np.random.default_rng(0), 1)[0], sources=[s], limit=50)
        assert len(hits) == 20 and {h["source_id"] for h in hits} == {s}
    for q in ['forklift" OR 1=1 --', "(((", "AND OR NOT", "*", "caption:red", "the a of"]:
        ix.search(q, sources=odd)                           # no error; words that match nothing find nothing
    assert ix.count(["x"]) == 0 and ix.delete_source("x') OR ('1'='1") == 20 and ix.count() == 60


# ---- writes -------------------------------------------------------------------------------------------------------
def test_upsert_is_idempotent_and_a_recaption_replaces(tmp_path):
    ix = make_index(tmp_path)
    rows = rows_for("cam", 50, seed=3)
    assert ix.upsert(rows) == 50 and ix.upsert(rows) == 50
    assert ix.count() == 50
    r = dict(rows[7], caption="a blue van at the gate", model_id="other@1")
    ix.upsert([dict(rows[7], caption="something else entirely"), r])       # the same id twice: the last wins
    assert ix.count() == 50
    hits = ix.search("blue van gate", sources=["cam"])
    assert [h["segment_id"] for h in hits] == [r["segment_id"]] and hits[0]["caption"] == r["caption"]
    assert ix.search("something entirely", sources=["cam"]) == []          # the replaced caption is gone
    assert ix.upsert([]) == 0


def test_writes_validate_rows(tmp_path):
    ix = make_index(tmp_path)
    good = rows_for("cam", 1, seed=4)[0]
    bad = [dict(good, source_id="other"), dict(good, t1=good["t0"]), dict(good, t0=float("nan")),
           dict(good, caption=None), dict(good, model_id=""), dict(good, vector=np.zeros(DIM)),
           dict(good, vector=np.ones(DIM + 1)), dict(good, segment_id="no-colon"), dict(good, visual=None),
           dict(good, visual=np.ones(DIM + 1)), "not a row"]
    for r in bad:
        with pytest.raises(ValueError):
            ix.upsert([good, r])
    assert ix.count() == 0                                  # a bad row writes nothing of its batch
    ix.upsert([dict(good, vector=good["vector"] * 3.0)])    # a vector is stored at unit length
    assert ix.search(None, good["vector"], sources=["cam"])[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_delete_then_rebuild_from_the_truth_gives_the_same_results(tmp_path):
    ix = make_index(tmp_path)
    a, b = rows_for("cam-a", 1_500, seed=6), rows_for("cam-b", 500, seed=7)
    a[700] = dict(a[700], caption=NEEDLE)
    ix.upsert(a)
    ix.upsert(b)
    assert ix.delete([a[3]["segment_id"], a[4]["segment_id"], "cam-a:1"]) == 2
    assert ix.delete_source("cam-b", before=b[99]["t1"]) == 100
    assert ix.count() == 1_500 + 500 - 102 and ix.count(["cam-b"]) == 400
    rng = np.random.default_rng(8)
    queries = [(QUERY, None), ("forklift wall", None), (None, unit(rng, 1)[0]), (QUERY, a[700]["vector"])]

    def results():
        out = []
        for text, vec in queries:
            hits = ix.search(text, vec, sources=["cam-a", "cam-b"], limit=20)
            out.append([(h["segment_id"], round(h["score"], 4)) for h in hits])
        return out

    before = results()
    assert before[0][0][0] == a[700]["segment_id"] and before[3][0][0] == a[700]["segment_id"]
    truth = [r for r in a if r["segment_id"] not in (a[3]["segment_id"], a[4]["segment_id"])] + b[100:]
    seen = []
    assert ix.rebuild(iter(truth), batch_size=500, progress=seen.append) == len(truth)
    assert seen == [500, 1000, 1500, 1898]
    after = results()
    assert ix.count() == len(truth)
    # vector search is exact: identical. BM25 counts documents deleted since the full-text index was built in its
    # corpus statistics until they are compacted away, so text scores may drift slightly (here < 2%) and equal
    # scores may swap places; the ranking is otherwise the same.
    assert after[2] == before[2]
    assert after[0][0][0] == after[3][0][0] == a[700]["segment_id"]          # the needle is still found first
    for old, new in zip(before, after):
        assert [s for _, s in new] == pytest.approx([s for _, s in old], rel=3e-2)
        assert len({i for i, _ in old} & {i for i, _ in new}) >= 15
    assert ix.delete_source("cam-b") == 400 and ix.count(["cam-b"]) == 0 and ix.count() == 1_498


# ---- unavailable and invalid ---------------------------------------------------------------------------------------
def test_a_missing_or_corrupt_folder_is_unavailable_until_rebuilt(tmp_path):
    footage = SegmentIndex(tmp_path)
    footage.add([make_segment("cam", 0.0)])
    ix = RetrievalIndex(tmp_path, dim=DIM, create=True)
    rows = rows_for("cam", 30, seed=9)
    ix.upsert(rows)
    assert len(ix.search("truck", sources=["cam"])) >= 0
    folder = tmp_path / FOLDER

    def unavailable(index, count=True):
        # count reads only the manifests: with corrupt data files and intact manifests it may still answer
        calls = [lambda: index.search("red truck", sources=["cam"]),
                 lambda: index.search(None, rows[0]["vector"], sources=["cam"]), lambda: index.upsert(rows[:1])]
        for call in calls + ([lambda: index.count()] if count else []):
            with pytest.raises(RetrievalUnavailable):
                call()

    shutil.rmtree(folder)                                   # deleted under a live instance
    unavailable(ix)
    unavailable(RetrievalIndex(tmp_path))                   # and for a new one (services never create)
    assert not folder.exists()
    ix.rebuild(rows)
    assert ix.search(None, rows[5]["vector"], sources=["cam"])[0]["segment_id"] == rows[5]["segment_id"]

    for kind in ("manifests", "data"):
        for p in (folder / "segments.lance").rglob("*"):
            if p.is_file() and (kind == "data" and p.suffix == ".lance" and p.parent.name == "data"
                                or kind == "manifests" and p.parent.name == "_versions"):
                p.write_bytes(b"not lance" * 10)
        unavailable(ix, count=kind == "manifests")
        unavailable(RetrievalIndex(tmp_path), count=kind == "manifests")
        ix.rebuild(rows)
        assert ix.count() == 30
    assert [s["segment_id"] for s in footage.list("cam")] == ["cam:0"]     # the truth is untouched


def test_create_only_beside_a_footage_index(tmp_path):
    with pytest.raises(RetrievalUnavailable):
        RetrievalIndex(tmp_path / "unmounted", dim=DIM, create=True)
    assert not (tmp_path / "unmounted").exists()
    with pytest.raises(ValueError):
        RetrievalIndex(tmp_path, create=True)               # create needs the dimension
    ix = make_index(tmp_path)
    assert ix.count() == 0 and ix.search("anything", sources=["cam"]) == []
    assert ix.search(None, np.ones(DIM), sources=["cam"]) == []
    assert RetrievalIndex(tmp_path).dim == DIM
    with pytest.raises(ValueError):
        RetrievalIndex(tmp_path, dim=DIM * 2).count()      # another model's dimension: rebuild, not mix


def test_bad_queries_are_value_errors(big):
    ix, a, _ = big
    v = a[0]["vector"]
    bad = [dict(query_text=""), dict(query_text="   \n"), dict(query_text="x" * (MAX_QUERY_CHARS + 1)),
           dict(query_text=42), dict(), dict(query_text="ok", sources=[]), dict(query_text="ok", sources=None),
           dict(query_text="ok", sources="cam-a"), dict(query_text="ok", sources=[""]),
           dict(query_text="ok", start=10.0, end=5.0), dict(query_text="ok", start=float("inf")),
           dict(query_text="ok", limit=0), dict(query_text="ok", limit=10_000), dict(query_text="ok", limit=True),
           dict(query_vector=v[:10]), dict(query_vector=np.zeros(DIM)), dict(query_vector=np.full(DIM, np.nan)),
           dict(query_vector=[[1.0] * DIM])]
    for kw in bad:
        kw = {"sources": ["cam-a"], **kw}
        with pytest.raises(ValueError):
            ix.search(**kw)
    with pytest.raises(ValueError):
        ix.count(["cam-a"], start=3.0, end=2.0)


# ---- concurrency --------------------------------------------------------------------------------------------------
def test_one_writer_and_many_readers_in_one_process(tmp_path):
    ix = make_index(tmp_path)
    rows = rows_for("cam", 2_000, seed=10)
    ix.upsert(rows[:200])
    other = RetrievalIndex(tmp_path)                        # another connection: sees new versions on read
    errors, counts = [], []
    done = threading.Event()

    def reader(index):
        rng = np.random.default_rng(threading.get_ident() % 2**32)
        try:
            last = 0
            while not done.is_set():
                n = index.count(["cam"])
                assert n >= last                            # versions only move forward
                last = n
                hits = index.search("truck dock", unit(rng, 1)[0], sources=["cam"], limit=10)
                assert all(h["source_id"] == "cam" for h in hits)
            counts.append(last)
        except Exception as e:                              # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in (ix, ix, other)]
    for t in threads:
        t.start()
    try:
        for k in range(200, 2_000, 100):                    # 18 writes: re-captions and new rows
            ix.upsert([dict(r, caption=r["caption"] + " again") for r in rows[k - 50:k]] + rows[k:k + 100])
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert ix.count() == 2_000 and other.count() == 2_000
    assert other.search(None, rows[1_999]["vector"], sources=["cam"])[0]["segment_id"] == rows[1_999]["segment_id"]


# ---- beside the footage index -------------------------------------------------------------------------------------
def test_the_footage_index_ignores_the_retrieval_folder(tmp_path):
    footage = SegmentIndex(tmp_path)
    footage.add([make_segment("cam", 0.0), make_segment("cam", 8.0)])
    ix = RetrievalIndex(tmp_path, dim=DIM, create=True)
    ix.upsert(rows_for("cam", 10, seed=11))
    assert (tmp_path / FOLDER).is_dir()
    assert footage.sources() == [{"source_id": "cam", "segments": 2, "bytes": footage.sizes()["cam"]}]
    assert footage.sweep(max_age_s=0.0, now=10**10) == 2   # retention walks sources only
    assert (tmp_path / FOLDER).is_dir() and ix.count() == 10
    footage.add([make_segment("cam", 16.0)])
    ds = pads.dataset(tmp_path, format="parquet", partitioning="hive")
    assert all(FOLDER not in f and ".lance" not in f for f in ds.files)
    assert ds.to_table(columns=["segment_id"]).column(0).to_pylist() == ["cam:16000"]
    assert os.path.isfile(tmp_path / "_tubescope_index")


def test_past_the_ann_threshold_vectors_are_indexed_and_still_found(tmp_path, monkeypatch):
    import pipeline.retrieval as retrieval

    monkeypatch.setattr(retrieval, "ANN_MIN_ROWS", 600)
    ix = make_index(tmp_path)
    rows = rows_for("cam", 800, seed=12)
    ix.rebuild(rows)
    ann = {c for i in ix._open().list_indices() if i.index_type.upper().startswith("IVF") for c in i.columns}
    assert ann == {"vector", "visual"}                         # caption vectors and pooled visual vectors
    assert ix.optimize()["built"] == []                        # built once, not again
    for k in (0, 399, 799):                                   # a row's own vector finds it first, anywhere
        assert ix.search(None, rows[k]["vector"], sources=["cam"], limit=5)[0]["segment_id"] == rows[k]["segment_id"]
        hit = ix.nearest_visual(rows[k]["visual"], sources=["cam"], limit=5)[0]
        assert hit["segment_id"] == rows[k]["segment_id"] and np.allclose(hit["visual"], rows[k]["visual"], atol=1e-6)
    narrow = ix.search(None, rows[0]["vector"], sources=["cam"], start=rows[500]["t0"], end=rows[503]["t1"], limit=10)
    assert [h["segment_id"] for h in narrow] and all(rows[500]["t0"] <= h["t0"] < rows[503]["t1"] for h in narrow)
    assert len(narrow) == 4                                   # a narrow window still returns all it holds
