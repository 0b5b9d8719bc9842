"""The cheap structure check of the agent's table: chains, sets and rule counts, no elements.

Owns "is the table's skeleton intact?" for periodic verification. Listing the table, a chain or
``tables`` makes nft 1.0.6 fetch every set element (~1 s of CPU at 100,000 entries); ``list
chains``, a terse ``list sets`` and a netlink rule dump do not, so those three are what is read.
A rule edited in place (same count) is not seen here: notifications and the rare full check
catch that. Never changes the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.config import FirewallConfig
from agent.rules import render
from agent.rules.monitor import count_rules
from agent.rules.nft import NftAdapter


@dataclass(frozen=True, slots=True)
class Structure:
    chains: frozenset[tuple[str, str, int, str]]  # name, hook ("" for regular), prio, policy
    sets: frozenset[tuple[str, str, int, tuple[str, ...]]]  # name, type, size, flags
    rules: frozenset[tuple[str, int]]  # chain, number of rules

    def allow_sets(self) -> frozenset[str]:
        return frozenset(s[0] for s in self.sets if s[0].startswith("allow"))

    def missing_from(self, observed: Structure) -> list[str]:
        """What of this (expected) structure ``observed`` lacks or has differently."""
        out = [f"chain {c[0]}" for c in sorted(self.chains - observed.chains)]
        out += [f"set {s[0]}" for s in sorted(self.sets - observed.sets)]
        out += [f"rules of {r[0]}" for r in sorted(self.rules - observed.rules)]
        return out


def _chain(c: dict[str, Any]) -> tuple[str, str, int, str]:
    return (str(c["name"]), str(c.get("hook", "")), int(c.get("prio", 0)), str(c.get("policy", "")))


def _set(s: dict[str, Any]) -> tuple[str, str, int, tuple[str, ...]]:
    return (
        str(s["name"]),
        str(s["type"]),
        int(s.get("size", 0)),
        tuple(sorted(s.get("flags", ()))),
    )


def expected_structure(cfg: FirewallConfig) -> Structure:
    """Pure: the structure ``render_table(cfg)`` creates."""
    chains, sets, rules = set(), set(), dict[str, int]()
    for cmd in render.render_table(cfg):
        add = cmd.get("add", {})
        if "chain" in add:
            chains.add(_chain(add["chain"]))
            rules.setdefault(add["chain"]["name"], 0)
        elif "set" in add:
            sets.add(_set(add["set"]))
        elif "rule" in add:
            rules[add["rule"]["chain"]] = rules.get(add["rule"]["chain"], 0) + 1
    return Structure(frozenset(chains), frozenset(sets), frozenset(rules.items()))


def observed_structure(
    items: Iterable[dict[str, Any]], table: str, rule_counts: dict[str, int]
) -> Structure:
    """Pure: the structure of ``inet <table>`` from ``list chains`` + terse ``list sets`` items."""
    chains, sets = set(), set()
    for item in items:
        for kind, obj in item.items():
            if obj.get("family") != render.FAMILY or obj.get("table") != table:
                continue
            if kind == "chain":
                chains.add(_chain(obj))
            elif kind == "set":
                sets.add(_set(obj))
    rules = {c[0]: rule_counts.get(c[0], 0) for c in chains}
    return Structure(frozenset(chains), frozenset(sets), frozenset(rules.items()))


def read_structure(nft: NftAdapter, table: str) -> Structure:
    """The live structure of ``inet <table>`` (empty when the table is absent)."""
    items = nft.query({"list": {"chains": {"family": render.FAMILY}}})
    items += nft.query({"list": {"sets": {"family": render.FAMILY}}}, terse=True)
    return observed_structure(items, table, count_rules(table))
