"""Times as people write them (pipeline.times): every accepted form, bad times naming their field, times shown back."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pipeline.settings import load_settings
from pipeline.times import format_time, parse_time, with_times

# 2026-12-06 10:30:00 UTC, a Sunday; Berlin is UTC+1 in December
NOW = datetime(2026, 12, 6, 10, 30, tzinfo=timezone.utc).timestamp()


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("text,tz,expected", [
    (1765000000, "UTC", 1765000000.0),
    (12.5, "UTC", 12.5),
    ("1765000000", "UTC", 1765000000.0),
    (" 8 ", "UTC", 8.0),
    ("2026-12-06T14:00:00+01:00", "UTC", utc(2026, 12, 6, 13)),
    ("2026-12-06T14:00:00Z", "Europe/Berlin", utc(2026, 12, 6, 14)),
    ("2026-12-06 14:00", "Europe/Berlin", utc(2026, 12, 6, 13)),          # no offset: the configured zone
    ("now", "UTC", NOW),
    ("-2h", "UTC", NOW - 7200),
    ("-90m", "UTC", NOW - 5400),
    ("-30s", "UTC", NOW - 30),
    ("-1.5d", "UTC", NOW - 1.5 * 86400),
    ("-1w", "UTC", NOW - 7 * 86400),
    ("today", "UTC", utc(2026, 12, 6)),
    ("today", "Europe/Berlin", utc(2026, 12, 5, 23)),                      # Berlin's midnight
    ("yesterday", "UTC", utc(2026, 12, 5)),
    ("yesterday 14:00", "UTC", utc(2026, 12, 5, 14)),
    ("Yesterday 14:00:30", "Europe/Berlin", utc(2026, 12, 5, 13, 0, 30)),
    ("14:00", "UTC", utc(2026, 12, 6, 14)),
    ("+1:30", "UTC", 90.0),
    ("+1:02:03", "UTC", 3723.0),
    (None, "UTC", None),
])
def test_accepted_forms(text, tz, expected):
    assert parse_time(text, "start", tz=tz, now=NOW) == pytest.approx(expected) if expected is not None \
        else parse_time(text, "start", tz=tz, now=NOW) is None


@pytest.mark.parametrize("bad", ["soon", "", "-2x", "25:00", "yesterday 7", "2026-13-01", float("nan"),
                                 float("inf"), "1e400", True, [1], "x" * 100])
def test_bad_times_name_their_field(bad):
    with pytest.raises(ValueError, match="^end"):
        parse_time(bad, "end", now=NOW)


def test_shown_back_as_iso_or_media_time():
    assert format_time(utc(2026, 12, 6, 13), "Europe/Berlin") == "2026-12-06T14:00:00+01:00"
    assert format_time(utc(2026, 12, 6, 13) + 0.25) == "2026-12-06T13:00:00.250+00:00"
    assert format_time(8.0) == "0:08" and format_time(754.9) == "12:34" and format_time(3723.0) == "1:02:03"
    row = with_times({"t0": 8.0, "t1": 16.0, "segment_id": "a:8000"})
    assert (row["start"], row["end"], row["segment_id"]) == ("0:08", "0:16", "a:8000")
    # what is shown reads back to the same second
    assert parse_time(format_time(utc(2026, 12, 6, 13), "Asia/Tokyo"), now=NOW) == utc(2026, 12, 6, 13)


def test_the_time_zone_setting_is_checked():
    assert load_settings(time_zone="Europe/Berlin").time_zone == "Europe/Berlin"
    with pytest.raises(ValueError, match="unknown time zone"):
        load_settings(time_zone="Mars/Olympus")
