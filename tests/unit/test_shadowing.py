"""Shadowing judged by the one evaluator of foreign chains (agent.rules.foreign, which ``why``
uses too): jumps followed, negations and port ranges understood as ``why`` understands them.
The basic cases (policy drop, final reject, ours, earlier priority): test_lifecycle_pure.py."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import PortRange
from agent.rules.shadowing import find_shadowing

SIP, SIPS = PortRange("udp", 5060, 5060), PortRange("tcp", 5061, 5061)
RANGE = PortRange("udp", 5060, 5070)
ACCEPT, DROP, REJECT = {"accept": None}, {"drop": None}, {"reject": None}


def chain(name: str, policy: str = "accept", *, base: bool = True) -> dict[str, Any]:
    c: dict[str, Any] = {"family": "inet", "table": "fw", "name": name}
    if base:
        c |= {"type": "filter", "hook": "input", "prio": 0, "policy": policy}
    return {"chain": c}


def rule(chain_name: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "inet", "table": "fw", "chain": chain_name, "expr": list(expr)}}


def dport(proto: str, right: Any, op: str = "==") -> dict[str, Any]:
    left = {"payload": {"protocol": proto, "field": "dport"}}
    return {"match": {"op": op, "left": left, "right": right}}


def shadowed(items: list[dict[str, Any]], *protected: PortRange) -> dict[str, str]:
    found = find_shadowing(items, own_table="vicifast", own_priority=-10, protected=protected)
    return {port: s.why for s in found for port in s.ports}


def test_a_zone_jumped_to_that_rejects_shadows_what_it_does_not_open() -> None:
    items = [
        chain("input"),
        chain("zone_public", base=False),
        rule("input", {"jump": {"target": "zone_public"}}),
        rule("zone_public", dport("udp", 5060), ACCEPT),
        rule("zone_public", REJECT),
    ]

    assert shadowed(items, SIP, SIPS) == {"5061/tcp": "rule drops"}


def test_a_negated_port_match_drops_every_other_port_of_its_protocol() -> None:
    items = [chain("input"), rule("input", dport("tcp", 22, "!="), DROP)]

    assert shadowed(items, SIP, SIPS) == {"5061/tcp": "rule drops"}


@pytest.mark.parametrize(
    ("opened", "expected"),
    [
        ([{"range": [5060, 5065]}, {"range": [5066, 5070]}], {}),  # opened in two pieces
        ([{"range": [5060, 5065]}], {"5060-5070/udp": "policy drop"}),  # 5066-5070 left shut
        ([{"set": [5060, {"range": [5062, 5070]}]}], {"5060-5070/udp": "policy drop"}),  # 5061
    ],
    ids=["whole", "first-part", "one-port-missing"],
)
def test_a_protected_range_is_judged_port_by_port(
    opened: list[Any], expected: dict[str, str]
) -> None:
    items = [chain("input", "drop"), *(rule("input", dport("udp", o), ACCEPT) for o in opened)]

    assert shadowed(items, RANGE) == expected


def test_an_ipv4_only_opening_leaves_ipv6_dropped() -> None:
    nfproto = {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}
    items = [chain("input", "drop"), rule("input", nfproto, dport("udp", 5060), ACCEPT)]

    assert shadowed(items, SIP) == {"5060/udp": "policy drop"}


def test_rules_on_source_addresses_are_not_held_against_every_source() -> None:
    banned = {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
            "right": "@addr-set-sip",
        }
    }
    items = [chain("input"), rule("input", dport("udp", 5060), banned, REJECT)]

    assert shadowed(items, SIP, SIPS) == {}
