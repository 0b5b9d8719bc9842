"""Pure text for a person at a terminal: aligned tables, short spans of time, UTC times and
printable user-supplied text. Shared by the sysadmin's CLI (``agent.admin``) and the control
plane's (``agent.ctl``), so both print alike; performs no I/O."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence


def span(seconds: int) -> str:
    """``3725`` -> ``1h 2m``: the two largest units, for a human glancing at a table."""
    if seconds < 60:
        return f"{seconds}s"
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    rest = seconds
    for name, size in units:
        if rest >= size or parts:
            parts.append(f"{rest // size}{name}")
            rest %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def utc_iso(ms: int) -> str:
    """``1700000000000`` -> ``2023-11-14T22:13:20Z`` (one token: columns stay aligned)."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def when(ms: int, now_ms: int) -> str:
    """``2025-01-02T03:04:05Z (in 9m 59s)`` / ``(... ago)``; ``-`` for 0 (no time)."""
    if ms <= 0:
        return "-"
    delta = (ms - now_ms) // 1000 if ms >= now_ms else -((now_ms - ms) // 1000)
    rel = "now" if delta == 0 else f"in {span(delta)}" if delta > 0 else f"{span(-delta)} ago"
    return f"{utc_iso(ms)} ({rel})"


def counted(n: int, singular: str, plural: str) -> str:
    """``1 entry``, ``2 entries``, ``0 entries``."""
    return f"{n} {singular if n == 1 else plural}"


_DURATION_PART = re.compile(r"([0-9]+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """Seconds from what a sysadmin types: ``3600``, ``90s``, ``90m``, ``1h``, ``2d``, ``1w``,
    or parts of them in a row (``1h30m``). ``ValueError`` for anything else (no sign, no
    fractions, no spaces: a mistyped duration must not become a different one)."""
    if text.isascii() and text.isdigit():
        return int(text)
    parts = _DURATION_PART.findall(text) if text.isascii() else []
    if not parts or "".join(n + unit for n, unit in parts) != text:
        raise ValueError(
            f"{text!r} is not a duration: give seconds (3600) or a number with a unit,"
            " s, m, h, d or w (90m, 1h, 2d, 1h30m)"
        )
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in parts)


def printable(text: str) -> str:
    """``text`` with anything unprintable escaped, ``-`` if empty. The agent refuses control
    characters in subjects; escape anyway, never trust a terminal."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )
