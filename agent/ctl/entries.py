"""A ``ctl sync``'s entries from JSON lines or CSV, checked field by field before sending."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

from agent.ctl import CtlError
from agent.rpc.client import Entry

_SYNC_FIELDS = ("address", "ttl_seconds", "subject", "profile")


def parse_sync_entries(text: str, fmt: str) -> list[Entry]:
    """Entries from JSON lines (``jsonl``: one object per line) or ``csv`` (header row).

    Fields: ``address`` (required), ``ttl_seconds`` (0 or absent: the agent's default),
    ``subject``, ``profile``; other fields are refused. Blank lines are skipped.
    """
    if fmt == "jsonl":
        return [_entry(row, f"line {n}") for n, row in _json_lines(text)]
    if fmt == "csv":
        return _csv_entries(text)
    raise ValueError(f"unknown format {fmt!r}")


def _json_lines(text: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CtlError("bad_input", f"line {n}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise CtlError("bad_input", f"line {n}: expected a JSON object")
        yield n, row


def _csv_entries(text: str) -> list[Entry]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    unknown = [f for f in header if f not in _SYNC_FIELDS]
    if unknown or "address" not in header:
        raise CtlError(
            "bad_input",
            f"CSV header must name address and optionally {', '.join(_SYNC_FIELDS[1:])};"
            f" got {','.join(header)}",
        )
    entries = []
    for row in reader:
        values = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        if None in row:
            raise CtlError("bad_input", f"line {reader.line_num}: more cells than the header")
        if values:
            entries.append(_entry(values, f"line {reader.line_num}"))
    return entries


def _entry(row: Mapping[str, Any], where: str) -> Entry:
    unknown = sorted(set(row) - set(_SYNC_FIELDS))
    if unknown:
        raise CtlError("bad_input", f"{where}: unknown field {unknown[0]!r}")
    address, subject, profile = (row.get(k, "") for k in ("address", "subject", "profile"))
    if not isinstance(address, str) or not address:
        raise CtlError("bad_input", f"{where}: address is required")
    if not isinstance(subject, str) or not isinstance(profile, str):
        raise CtlError("bad_input", f"{where}: subject and profile must be strings")
    ttl = row.get("ttl_seconds", 0)
    if isinstance(ttl, str) and ttl.isdigit():
        ttl = int(ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl < 2**32:
        raise CtlError("bad_input", f"{where}: ttl_seconds must be a whole number of seconds")
    return Entry(address, ttl, subject, profile)
