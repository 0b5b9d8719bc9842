"""Coexistence: other tables' input base chains that would drop what the agent allows.

Owns the judgement "does another table shadow our allow entries?" (RULESET.md: an accept in one
base chain never overrides a drop in another). ``find_shadowing`` is pure and conservative: it
asks the one evaluator of foreign chains (``agent.rules.foreign``, which ``why`` uses too) what a
chain does with a new packet from an arbitrary allowed source to each protected port, when none
of the rules it cannot judge for such a source match (rules on source addresses, interfaces
other than lo, limits, xt matches). A chain that then drops (a drop/reject rule, or its drop
policy) shadows that port: it will drop at least some allowed traffic. Never changes another
table: ``read_shadowing`` lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import PortRange
from agent.rules.foreign import (
    BaseChain,
    ChainRef,
    Packet,
    RulesetView,
    evaluate_chain,
    rules_by_chain,
)
from agent.rules.nft import NftAdapter

FAMILIES = ("inet", "ip", "ip6")
_IP_VERSIONS = {"inet": (4, 6), "ip": (4,), "ip6": (6,)}


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


def find_shadowing(
    items: Iterable[dict[str, Any]],
    *,
    own_table: str,
    own_priority: int,
    protected: Sequence[PortRange],
) -> list[Shadow]:
    """Pure: shadowing chains in a libnftables JSON listing (chains and their rules)."""
    listed = list(items)
    view = RulesetView(rules=rules_by_chain(listed))
    chains = {
        (c["family"], c["table"], c["name"]): c
        for c in (i["chain"] for i in listed if "chain" in i)
    }
    out: list[Shadow] = []
    for key, c in sorted(chains.items()):
        family, table, name = key
        if c.get("hook") != "input" or family not in FAMILIES or c.get("type") != "filter":
            continue
        if (family == "inet" and table == own_table) or int(c.get("prio", 0)) < own_priority:
            continue  # ours, or runs before ours: a drop there is not about our allow entries
        chain = BaseChain(
            ChainRef(family, table, name), "input", int(c.get("prio", 0)), c.get("policy", "accept")
        )
        dropped = _dropped_ports(view, chain, protected)
        if dropped:
            out.append(
                Shadow(
                    family,
                    table,
                    name,
                    chain.priority,
                    tuple(str(p) for p in sorted(dropped)),
                    " and ".join(sorted(set(dropped.values()))),
                )
            )
    return out


def _dropped_ports(
    view: RulesetView, chain: BaseChain, protected: Sequence[PortRange]
) -> dict[PortRange, str]:
    """Protected ports the chain drops for an arbitrary source, with why. A range is probed at
    its ends and wherever a port match of the chain's table starts or stops holding within it,
    so every stretch of ports the rules treat alike is judged once."""
    bounds = _port_bounds(view, chain.ref)
    dropped: dict[PortRange, str] = {}
    for port in protected:
        probes = sorted(
            {port.first, port.last} | {b for b in bounds if port.first <= b <= port.last}
        )
        for version in _IP_VERSIONS[chain.ref.family]:
            for number in probes:
                finding = evaluate_chain(view, chain, Packet(version, number, port.protocol))
                if finding.settled == "drop":
                    dropped[port] = "policy drop" if finding.by_policy else "rule drops"
                    break
            if port in dropped:
                break
    return dropped


def _port_bounds(view: RulesetView, ref: ChainRef) -> set[int]:
    """Every port where a destination-port match of ``ref``'s table starts or stops holding."""
    bounds: set[int] = set()
    for chain, rules in view.rules.items():
        if (chain.family, chain.table) != (ref.family, ref.table):
            continue
        for _, exprs in rules:
            for e in exprs:
                match = e.get("match") if isinstance(e, Mapping) else None
                if not isinstance(match, Mapping):
                    continue
                left = match.get("left")
                if isinstance(left, Mapping) and left.get("payload", {}).get("field") == "dport":
                    _collect_bounds(match.get("right"), bounds)
    return bounds


def _collect_bounds(right: Any, bounds: set[int]) -> None:
    if isinstance(right, int):
        bounds |= {right, right + 1}
    elif isinstance(right, list):
        for item in right:
            _collect_bounds(item, bounds)
    elif isinstance(right, Mapping) and "set" in right:
        _collect_bounds(right["set"], bounds)
    elif isinstance(right, Mapping) and "range" in right:
        lo, hi = right["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            bounds |= {lo, hi + 1}


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
