"""``why``'s pure evaluation: the agent's own table, then other tables' input chains."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.config import parse_config
from agent.errors import InvalidArgument
from agent.why import (
    Admission,
    BaseChain,
    ChainOutcome,
    ChainRef,
    Packet,
    RulesetView,
    agent_verdict,
    evaluate_chain,
    input_base_chains,
    jump_targets,
    parse_packet,
    rules_by_chain,
)

CFG = parse_config(
    """
agent_id = "a1"
[firewall]
permit_test_ranges = true
[static_sources]
agent = ["198.19.5.0/24", "2001:db8:ff::/48"]
[api]
control_plane_sources = ["198.51.100.0/24"]
"""
).firewall


@pytest.mark.parametrize(
    ("address", "port", "in_set", "admission", "entry"),
    [
        ("198.18.0.7", "5060/udp", True, Admission.ALLOWED, "198.18.0.7"),
        ("2001:db8:1:2::99", "5061/tcp", True, Admission.ALLOWED, "2001:db8:1:2::/64"),
        ("198.19.5.9", "5060/udp", False, Admission.STATIC, ""),
        ("2001:db8:ff:1::1", "443/tcp", False, Admission.STATIC, ""),
        ("198.18.0.8", "5060/udp", False, Admission.DROPPED, ""),
        ("198.18.0.8", "8089/tcp", False, Admission.DROPPED, ""),
        ("198.18.0.8", "80/tcp", False, Admission.UNPROTECTED, ""),
        ("198.18.0.8", "10000/udp", False, Admission.UNPROTECTED, ""),
        ("198.51.100.3", "7443/tcp", False, Admission.GUARD_ALLOWED, ""),
        ("198.18.0.8", "7443/tcp", False, Admission.GUARD_DROPPED, ""),
        ("127.0.0.1", "5060/udp", False, Admission.LOOPBACK, ""),
        ("::ffff:198.18.0.7", "5060/udp", True, Admission.ALLOWED, "198.18.0.7"),
    ],
)
def test_agent_verdict_follows_the_rendered_chain(
    address: str, port: str, in_set: bool, admission: Admission, entry: str
) -> None:
    verdict = agent_verdict(CFG, parse_packet(address, port), in_dynamic_set=in_set)
    assert verdict.admission is admission
    assert verdict.entry == entry
    assert verdict.explanation


def test_a_missing_table_drops_nothing_on_protected_ports() -> None:
    packet = parse_packet("198.18.0.8", "5060/udp")
    verdict = agent_verdict(CFG, packet, in_dynamic_set=False, table_present=False)
    assert verdict.admission is Admission.NO_TABLE
    assert verdict.admission.admitted


@pytest.mark.parametrize(
    ("address", "port", "reason"),
    [
        ("198.18.0.300", "5060/udp", "invalid_address"),
        ("not-an-ip", "5060/udp", "invalid_address"),
        ("198.18.0.1", "5060", "invalid_port"),
        ("198.18.0.1", "0/udp", "invalid_port"),
        ("198.18.0.1", "70000/tcp", "invalid_port"),
        ("198.18.0.1", "5060/icmp", "invalid_port"),
    ],
)
def test_bad_packets_are_refused_with_a_reason(address: str, port: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_packet(address, port)
    assert err.value.reason == reason


# --- other tables' chains -------------------------------------------------------------------


def _m(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _dport(proto: str, right: Any, op: str = "==") -> dict[str, Any]:
    return _m({"payload": {"protocol": proto, "field": "dport"}}, right, op)


def _saddr(right: Any) -> dict[str, Any]:
    return _m({"payload": {"protocol": "ip", "field": "saddr"}}, right)


ACCEPT, DROP = {"accept": None}, {"drop": None}
REJECT = {"reject": {"type": "icmp", "expr": "port-unreachable"}}
INPUT = ChainRef("ip", "filter", "input")


def _view(policy: str, *rules: list[Any], extra: dict[ChainRef, list[list[Any]]] | None = None):
    chain = BaseChain(INPUT, "input", 0, policy)
    table = {INPUT: tuple((i + 1, tuple(r)) for i, r in enumerate(rules))}
    for ref, rs in (extra or {}).items():
        table[ref] = tuple((100 + i, tuple(r)) for i, r in enumerate(rs))
    return RulesetView((chain,), table), chain


SIP = Packet(4, 5060, "udp", ipaddress.ip_address("198.18.0.7"))
ANY_SIP = Packet(4, 5060, "udp")


@pytest.mark.parametrize(
    ("policy", "rules", "packet", "outcome"),
    [
        ("accept", [], SIP, ChainOutcome.ACCEPTS),
        ("drop", [], SIP, ChainOutcome.DROPS),
        ("drop", [[_dport("udp", 5060), ACCEPT]], SIP, ChainOutcome.ACCEPTS),
        ("drop", [[_dport("udp", {"set": [5060, 5061]}), ACCEPT]], SIP, ChainOutcome.ACCEPTS),
        ("drop", [[_dport("udp", {"range": [5000, 5100]}), ACCEPT]], SIP, ChainOutcome.ACCEPTS),
        ("drop", [[_dport("tcp", 5060), ACCEPT]], SIP, ChainOutcome.DROPS),
        ("accept", [[_dport("tcp", 22, "!="), DROP]], SIP, ChainOutcome.ACCEPTS),
        ("accept", [[_dport("udp", 5060), {"counter": None}, REJECT]], SIP, ChainOutcome.DROPS),
        (
            "drop",
            [[_saddr({"prefix": {"addr": "198.18.0.0", "len": 16}}), ACCEPT]],
            SIP,
            ChainOutcome.ACCEPTS,
        ),
        ("drop", [[_saddr("203.0.113.1"), ACCEPT]], SIP, ChainOutcome.DROPS),
        # An unknown source might be the one a source rule admits.
        ("drop", [[_saddr("203.0.113.1"), ACCEPT]], ANY_SIP, ChainOutcome.MAY_DROP),
        # A new packet is neither established nor arrives on lo.
        (
            "drop",
            [[_m({"ct": {"key": "state"}}, ["established", "related"]), ACCEPT]],
            SIP,
            ChainOutcome.DROPS,
        ),
        ("drop", [[_m({"meta": {"key": "iifname"}}, "lo"), ACCEPT]], SIP, ChainOutcome.DROPS),
        ("accept", [[_m({"ct": {"key": "state"}}, "invalid"), DROP]], SIP, ChainOutcome.ACCEPTS),
        ("accept", [[_m({"meta": {"key": "l4proto"}}, "udp"), REJECT]], SIP, ChainOutcome.DROPS),
        # Named sets that were not read and xt matches cannot be judged: the answer says "may".
        ("accept", [[_dport("udp", "@blocked"), DROP]], SIP, ChainOutcome.MAY_DROP),
        (
            "drop",
            [[{"xt": {"type": "match", "name": "conntrack"}}, ACCEPT]],
            SIP,
            ChainOutcome.MAY_DROP,
        ),
    ],
)
def test_other_chain_outcome(
    policy: str, rules: list[list[Any]], packet: Packet, outcome: ChainOutcome
) -> None:
    view, chain = _view(policy, *rules)
    finding = evaluate_chain(view, chain, packet)
    assert finding.outcome is outcome, finding.reason


def test_jumps_are_followed_into_the_chains_they_name() -> None:
    zone = ChainRef("ip", "filter", "zone_public")
    view, chain = _view(
        "accept",
        [{"jump": {"target": "zone_public"}}],
        extra={zone: [[_dport("udp", 5060), ACCEPT], [REJECT]]},
    )
    assert evaluate_chain(view, chain, SIP).outcome is ChainOutcome.ACCEPTS
    tcp = Packet(4, 5061, "tcp", SIP.source)
    finding = evaluate_chain(view, chain, tcp)
    assert finding.outcome is ChainOutcome.DROPS
    assert "zone_public" in finding.reason


def test_a_chain_that_was_not_read_makes_the_answer_uncertain() -> None:
    view, chain = _view("accept", [{"jump": {"target": "unread"}}])
    assert evaluate_chain(view, chain, SIP).outcome is ChainOutcome.MAY_DROP


def test_listings_are_parsed_into_base_chains_rules_and_jump_targets() -> None:
    listing = [
        {
            "chain": {
                "family": "inet",
                "table": "vicifast",
                "name": "input",
                "hook": "input",
                "prio": -10,
                "policy": "accept",
            }
        },
        {
            "chain": {
                "family": "ip",
                "table": "filter",
                "name": "INPUT",
                "hook": "input",
                "prio": 0,
                "policy": "drop",
            }
        },
        {
            "chain": {
                "family": "inet",
                "table": "fw",
                "name": "fwd",
                "hook": "forward",
                "prio": 0,
                "policy": "drop",
            }
        },
        {"chain": {"family": "ip", "table": "filter", "name": "ufw"}},
        {
            "rule": {
                "family": "ip",
                "table": "filter",
                "chain": "INPUT",
                "handle": 4,
                "expr": [{"jump": {"target": "ufw"}}],
            }
        },
    ]
    base = input_base_chains(listing, "vicifast")
    assert [str(b.ref) for b in base] == ["ip filter INPUT"]
    rules = rules_by_chain(listing)
    assert rules[ChainRef("ip", "filter", "INPUT")] == ((4, ({"jump": {"target": "ufw"}},)),)
    assert rules[ChainRef("ip", "filter", "ufw")] == ()
    assert jump_targets(rules[ChainRef("ip", "filter", "INPUT")]) == {"ufw"}
