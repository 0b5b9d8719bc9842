"""Pure: parse libnftables' JSON listings into observed elements, counters and structure.

Owns the interpretation of what the kernel reports; never talks to the kernel itself.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.model import IPV4_NORMAL, Address, EntryKey, ObservedElement

_ALLOW_SET = re.compile(r"allow(?P<family>[46])_(?P<profile>[a-z][a-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class CounterValue:
    name: str
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class TableShape:
    """The table's structure as listed tersely (no elements): what reconcile compares."""

    sets: frozenset[tuple[str, str, int, tuple[str, ...]]]  # name, type, size, flags
    chains: frozenset[str]
    rules: tuple[tuple[str, str], ...]  # (chain, canonical expr json), in order
    counters: frozenset[str]


def parse_allow_set_name(name: str) -> tuple[str, int] | None:
    """``allow4_agent`` -> ("agent", 4); anything else -> None."""
    m = _ALLOW_SET.fullmatch(name)
    return (m["profile"], int(m["family"])) if m else None


def _element_address(val: Any, family: int, ipv6_prefix: int) -> Address | None:
    if not isinstance(val, str):
        return None  # prefixes/ranges never appear in allow sets; ignore what is not ours
    if family == 4 and IPV4_NORMAL.fullmatch(val):
        return Address.trusted(val)  # nft prints IPv4 in normal form: 100,000 of them at start
    try:
        ip = ipaddress.ip_address(val)
    except ValueError:
        return None
    if ip.version != family:
        return None
    if family == 6 and ipv6_prefix == 64:
        return Address(ipaddress.ip_network((ip, 64), strict=False).compressed)
    return Address(str(ip))


def parse_set_elements(
    items: Iterable[dict[str, Any]], ipv6_prefix: int
) -> Iterator[ObservedElement]:
    """Every element of the allow sets in a ``list set``/``list table`` answer."""
    for item in items:
        s = item.get("set")
        if not s:
            continue
        parsed = parse_allow_set_name(s.get("name", ""))
        if parsed is None:
            continue
        profile, family = parsed
        for raw in s.get("elem", ()):
            elem = raw.get("elem", raw) if isinstance(raw, dict) else {"val": raw}
            addr = _element_address(elem.get("val"), family, ipv6_prefix)
            if addr is None:
                continue
            yield ObservedElement(
                key=EntryKey(profile, addr),
                timeout_s=int(elem.get("timeout", 0)),
                expires_s=int(elem.get("expires", 0)),
                comment=str(elem.get("comment", "")),
            )


def _listed_value(raw: Any) -> str:
    elem = raw.get("elem", raw) if isinstance(raw, dict) else {"val": raw}
    val = elem.get("val") if isinstance(elem, dict) else elem
    return val if isinstance(val, str) else json.dumps(val, sort_keys=True)


def repeated_values(items: Iterable[dict[str, Any]]) -> int:
    """How many elements a listing names a second time within the same set.

    A set never holds a value twice, so any repeat means the dump was torn: the kernel walks a
    hash set afresh for every netlink message of a dump and skips by count, and a resize of the
    hash table in between (rhashtable grows in a deferred worker, e.g. right after a large
    batch) reorders it, so some elements come twice and as many others not at all. The kernel
    raises no NLM_F_DUMP_INTR for that (the ruleset generation did not change), so the only
    sign is in the listing itself.
    """
    repeats = 0
    for item in items:
        s = item.get("set")
        if not s:
            continue
        seen: set[str] = set()
        for raw in s.get("elem", ()):
            value = _listed_value(raw)
            if value in seen:
                repeats += 1
            else:
                seen.add(value)
    return repeats


def parse_counters(items: Iterable[dict[str, Any]]) -> dict[str, CounterValue]:
    out: dict[str, CounterValue] = {}
    for item in items:
        c = item.get("counter")
        if c and "name" in c:
            out[c["name"]] = CounterValue(c["name"], int(c["packets"]), int(c["bytes"]))
    return out


def _canonical(expr: Any) -> str:
    return json.dumps(expr, sort_keys=True, separators=(",", ":"))


def parse_table_shape(items: Iterable[dict[str, Any]]) -> TableShape:
    """Structure of a tersely listed table; handles and element contents are ignored."""
    sets, chains, rules, counters = set(), set(), [], set()
    for item in items:
        if "set" in item:
            s = item["set"]
            sets.add(
                (
                    s["name"],
                    str(s["type"]),
                    int(s.get("size", 0)),
                    tuple(sorted(s.get("flags", ()))),
                )
            )
        elif "chain" in item:
            chains.add(item["chain"]["name"])
        elif "rule" in item:
            r = item["rule"]
            rules.append((r["chain"], _canonical(r["expr"])))
        elif "counter" in item:
            counters.add(item["counter"]["name"])
    return TableShape(frozenset(sets), frozenset(chains), tuple(rules), frozenset(counters))
