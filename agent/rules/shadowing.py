"""Coexistence: other tables' input base chains that would drop what the agent allows.

Owns the judgement "does another table shadow our allow entries?" (RULESET.md: an accept in one
base chain never overrides a drop in another). ``find_shadowing`` is pure and conservative: a
chain shadows a protected port when, for a packet from an arbitrary allowed source, it reaches
an unconditional drop/reject (or its drop policy) without first meeting an accept that matches
only on protocol and destination port. Rules that also match on anything else (addresses,
interfaces, conntrack state, jumps) are conditional and skipped, so the report names chains that
will drop at least some allowed traffic. Never changes another table: ``read_shadowing`` lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import PortRange
from agent.rules.nft import NftAdapter

FAMILIES = ("inet", "ip", "ip6")
_PORT_FIELDS = {("th", "dport"), ("tcp", "dport"), ("udp", "dport")}


@dataclass(frozen=True, slots=True)
class Shadow:
    """One foreign base chain on the input hook that drops protected ports the agent allows."""

    family: str
    table: str
    chain: str
    priority: int
    ports: tuple[str, ...]  # protected port ranges it drops, e.g. "5060/udp"
    why: str  # "policy drop" or "rule drops"

    def describe(self) -> str:
        return (
            f"{self.family} {self.table} chain {self.chain} (priority {self.priority}) "
            f"drops {', '.join(self.ports)} ({self.why})"
        )


def _ports_of(right: Any) -> list[tuple[int, int]] | None:
    if isinstance(right, int):
        return [(right, right)]
    if isinstance(right, dict):
        if "range" in right:
            lo, hi = right["range"]
            return [(int(lo), int(hi))] if isinstance(lo, int) and isinstance(hi, int) else None
        if "set" in right:
            out: list[tuple[int, int]] = []
            for item in right["set"]:
                got = _ports_of(item)
                if got is None:
                    return None
                out += got
            return out
    return None


@dataclass(frozen=True, slots=True)
class _RuleMatch:
    """A rule reduced to what this analysis understands; ``None`` fields match anything."""

    protocol: str | None
    ports: list[tuple[int, int]] | None
    verdict: str


def _reduce(expr: Sequence[dict[str, Any]]) -> _RuleMatch | None:
    """The rule as (protocol, ports, verdict), or None when it has other conditions."""
    protocol: str | None = None
    ports: list[tuple[int, int]] | None = None
    verdict = ""
    for e in expr:
        if "match" in e:
            m = e["match"]
            if m.get("op", "==") not in ("==", "in"):
                return None
            left, right = m.get("left", {}), m.get("right")
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            meta = left.get("meta", {}) if isinstance(left, dict) else {}
            if (payload.get("protocol"), payload.get("field")) in _PORT_FIELDS:
                ports = _ports_of(right)
                if ports is None:
                    return None
                if payload.get("protocol") in ("tcp", "udp"):
                    protocol = payload["protocol"]
            elif right in ("tcp", "udp") and (
                meta.get("key") == "l4proto" or payload.get("field") in ("protocol", "nexthdr")
            ):
                protocol = right
            else:
                return None
        elif any(k in e for k in ("accept", "drop", "reject")):
            verdict = next(k for k in ("accept", "drop", "reject") if k in e)
        elif any(k in e for k in ("jump", "goto", "return", "queue")) or "limit" in e:
            return None
    return _RuleMatch(protocol, ports, verdict) if verdict else None


def _covers(rule: _RuleMatch, port: PortRange) -> bool:
    if rule.protocol is not None and rule.protocol != port.protocol:
        return False
    if rule.ports is None:
        return True
    return any(lo <= port.first and port.last <= hi for lo, hi in rule.ports)


def find_shadowing(
    items: Iterable[dict[str, Any]],
    *,
    own_table: str,
    own_priority: int,
    protected: Sequence[PortRange],
) -> list[Shadow]:
    """Pure: shadowing chains in a libnftables JSON listing (chains and their rules)."""
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    rules: dict[tuple[str, str, str], list[list[dict[str, Any]]]] = {}
    for item in items:
        if "chain" in item:
            c = item["chain"]
            key = (c["family"], c["table"], c["name"])
            chains[key] = c
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r.get("expr", []))
    out: list[Shadow] = []
    for key, c in sorted(chains.items()):
        family, table, name = key
        if c.get("hook") != "input" or family not in FAMILIES or c.get("type") != "filter":
            continue
        if (family == "inet" and table == own_table) or int(c.get("prio", 0)) < own_priority:
            continue  # ours, or runs before ours: a drop there is not about our allow entries
        dropped = _dropped_ports(rules.get(key, []), c.get("policy") == "drop", protected)
        if dropped:
            out.append(
                Shadow(
                    family,
                    table,
                    name,
                    int(c.get("prio", 0)),
                    tuple(str(p) for p in sorted(dropped)),
                    " and ".join(sorted(set(dropped.values()))),
                )
            )
    return out


def _dropped_ports(
    rules: list[list[dict[str, Any]]], policy_drop: bool, protected: Sequence[PortRange]
) -> dict[PortRange, str]:
    """Protected ports a chain drops for an arbitrary source, with why."""
    open_ports: set[PortRange] = set()
    dropped: dict[PortRange, str] = {}
    for expr in rules:
        reduced = _reduce(expr)
        if reduced is None:
            continue
        for port in protected:
            if port in open_ports or port in dropped or not _covers(reduced, port):
                continue
            if reduced.verdict == "accept":
                open_ports.add(port)
            else:
                dropped[port] = "rule drops"
    if policy_drop:
        for port in protected:
            if port not in open_ports and port not in dropped:
                dropped[port] = "policy drop"
    return dropped


def read_shadowing(
    nft: NftAdapter, *, own_table: str, own_priority: int, protected: Sequence[PortRange]
) -> list[Shadow]:
    """List other tables' input base chains (and, for those, their tables) and judge them.

    Only tables that have an input base chain running after ours are listed in full, so the
    agent's own large sets are never fetched.
    """
    chains = nft.query({"list": {"chains": {}}})
    items: list[dict[str, Any]] = list(chains)
    wanted = {
        (c["chain"]["family"], c["chain"]["table"])
        for c in chains
        if "chain" in c
        and c["chain"].get("hook") == "input"
        and c["chain"]["family"] in FAMILIES
        and not (c["chain"]["family"] == "inet" and c["chain"]["table"] == own_table)
        and int(c["chain"].get("prio", 0)) >= own_priority
    }
    for family, table in sorted(wanted):
        listed = nft.query({"list": {"table": {"family": family, "name": table}}}, terse=True)
        items += [i for i in listed if "rule" in i]
    return find_shadowing(
        items, own_table=own_table, own_priority=own_priority, protected=protected
    )
