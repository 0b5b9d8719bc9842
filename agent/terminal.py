"""Pure text for a person at a terminal: aligned tables, short spans of time, UTC times and
printable user-supplied text. Shared by the sysadmin's CLI (``agent.admin``) and the control
plane's (``agent.ctl``), so both print alike; performs no I/O."""

from __future__ import annotations

import datetime as dt
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
