"""What both CLIs print for people: spans, UTC times, tables, escaped user text."""

from __future__ import annotations

import pytest

from agent.terminal import printable, span, table, utc_iso


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (60, "1m 0s"),
        (3599, "59m 59s"),
        (3600, "1h 0m"),
        (3725, "1h 2m"),
        (86400, "1d 0h"),
        (90061, "1d 1h"),
    ],
)
def test_spans_show_the_two_largest_units(seconds: int, text: str) -> None:
    assert span(seconds) == text


def test_tables_align_columns_and_trim_trailing_space() -> None:
    assert table(["A", "LONG"], [["xyz", ""], ["1", "22"]]).splitlines() == [
        "A    LONG",
        "xyz",
        "1    22",
    ]
    assert table(("A", "BB"), [("xyz", "1"), ("q", "")]) == "A    BB\nxyz  1\nq"


def test_times_are_one_utc_token() -> None:
    assert utc_iso(1_700_000_000_999) == "2023-11-14T22:13:20Z"


@pytest.mark.parametrize(
    ("text", "shown"),
    [("alice", "alice"), ("", "-"), ("a\x1b[2Jb", "a\\u001b[2Jb"), ("x\u202ey", "x\\u202ey")],
)
def test_user_text_cannot_drive_the_terminal(text: str, shown: str) -> None:
    assert printable(text) == shown
