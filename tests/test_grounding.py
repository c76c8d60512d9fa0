"""Grounding markup parsed from generated text (qwen2vl/grounding.py, docs/model.md §15): well-formed and malformed."""
from __future__ import annotations

import pytest

from qwen2vl.grounding import BOX_END, BOX_START, REF_END, REF_START, GroundedBox, parse_corners, parse_grounding


def ref(label: str) -> str:
    return f"{REF_START}{label}{REF_END}"


def box(content: str) -> str:
    return f"{BOX_START}{content}{BOX_END}"


def test_a_labelled_box_shows_its_label_and_keeps_its_place():
    g = parse_grounding(f"At 0:03 {ref('a red car')}{box('(120,340),(560,780)')} enters.")
    assert g.text == "At 0:03 a red car enters."
    assert g.boxes == [GroundedBox("a red car", 120, 340, 560, 780, offset=len("At 0:03 a red car"))]


def test_several_boxes_per_reference_and_a_box_without_one():
    text = f"{ref('person')}{box('(1,2),(3,4),(10,20),(30,40)')}{box('(5,5),(6,6)')} and {box('(0,0),(1000,1000)')}"
    g = parse_grounding(text)
    assert g.text == "person and "
    assert [(b.label, b.x1, b.y1, b.x2, b.y2) for b in g.boxes] == [
        ("person", 1, 2, 3, 4), ("person", 10, 20, 30, 40), ("person", 5, 5, 6, 6), (None, 0, 0, 1000, 1000)]


@pytest.mark.parametrize("content, expected", [
    ("(1200,-5),(30.5,40)", [(30.5, 0.0, 1000.0, 40.0)]),       # clamped to 0..1000, corners ordered
    (" ( 7 , 8 ) , ( 9 , 10 ) ", [(7, 8, 9, 10)]),              # spaces allowed
    ("(1,2)", None),                                            # half a box
    ("(1,2),(3,4),(5,6)", None),                                # an odd number of corners
    ("(1,2),(3,four)", None),                                   # not a number
    ("(1,2),(3,4),", None),                                     # trailing comma
    ("(1,2)(3,4)", None),                                       # no comma between corners
    ("", None),
    ("(nan,1),(2,3)", None),
])
def test_parse_corners(content, expected):
    assert parse_corners(content) == expected


def test_malformed_box_content_stays_in_the_text():
    g = parse_grounding(f"a {ref('dog')}{box('(12,abc)')} runs")
    assert g.text == "a dog(12,abc) runs" and g.boxes == []


def test_an_unclosed_box_is_no_box_and_its_content_is_kept_when_final():
    text = f"a {ref('dog')}{BOX_START}(1,2),(3,4"
    assert parse_grounding(text).text == "a dog(1,2),(3,4" and parse_grounding(text).boxes == []
    held = parse_grounding(text, final=False)
    assert held.text == "a dog" and held.boxes == []         # still being written: held back


def test_a_marker_inside_a_box_breaks_it():
    g = parse_grounding(f"{BOX_START}(1,2),{ref('cat')}{box('(1,2),(3,4)')}")
    assert g.text == "(1,2),cat" and [(b.label, b.x2) for b in g.boxes] == [("cat", 3)]


def test_unclosed_reference_and_stray_end_markers():
    assert parse_grounding(f"{REF_START}a cat sits").text == "a cat sits"
    g = parse_grounding(f"x{REF_END}{BOX_END}y{box('(1,1),(2,2)')}")
    assert g.text == "xy" and g.boxes[0].label is None


def test_words_between_a_reference_and_a_box_end_its_reach():
    g = parse_grounding(f"{ref('car')} is near {box('(1,1),(2,2)')}")
    assert g.text == "car is near " and g.boxes[0].label is None


def test_text_without_markup_is_unchanged():
    text = "Nothing happens (1,2),(3,4) here."
    assert parse_grounding(text).text == text and parse_grounding(text).boxes == []


def test_streamed_text_only_grows():
    """Every prefix of the markup, parsed as text still being written, is a prefix of the final clean text."""
    full = f"At 0:03 {ref('a red car')}{box('(120,340),(560,780)')} enters {BOX_START}(1,x){BOX_END} and leaves."
    parts = [p for p in __import__("re").split(r"(<\|[a-z_]+\|>|.)", full) if p]
    final = parse_grounding(full).text
    shown = ""
    for k in range(1, len(parts) + 1):
        now = parse_grounding("".join(parts[:k]), final=False).text
        assert now.startswith(shown) and final.startswith(now)
        shown = now
    assert final == "At 0:03 a red car enters (1,x) and leaves."


def test_not_text_is_an_error():
    with pytest.raises(ValueError):
        parse_grounding(None)
