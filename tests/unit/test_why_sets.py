"""``why``'s look-ups in other tables' named sets, pure: what libnftables lists for a set
(plain elements, prefixes, ranges, elements with timeouts) and how a rule's ``@set`` reads it.
The same against the real kernel: tests/kernel/test_why_foreign_sets.py."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.why import (
    BaseChain,
    ChainOutcome,
    ChainRef,
    NamedSet,
    Packet,
    RulesetView,
    SetElement,
    evaluate_chain,
    named_set,
    set_references,
)

READ_AT = 1_800_000_000.0
CHAIN = ChainRef("inet", "f2b-table", "f2b-chain")
BANNED = ChainRef("inet", "f2b-table", "addr-set-sshd")
# `nft -j list set inet f2b-table addr-set-sshd`, as libnftables 1.0.6 answers it
LISTED: dict[str, Any] = {
    "set": {
        "family": "inet",
        "name": "addr-set-sshd",
        "table": "f2b-table",
        "type": "ipv4_addr",
        "flags": ["interval", "timeout"],
        "elem": [
            {"elem": {"val": "198.18.0.5", "timeout": 600, "expires": 599}},
            "198.18.0.6",
            {"prefix": {"addr": "198.18.1.0", "len": 24}},
            {"range": ["198.18.2.1", "198.18.2.9"]},
            {"elem": {"val": {"prefix": {"addr": "198.18.3.0", "len": 24}}, "expires": 0}},
        ],
    }
}
DROP_BANNED = (
    {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
            "right": "@addr-set-sshd",
        }
    },
    {"drop": None},
)


def view(*sets: NamedSet) -> tuple[RulesetView, BaseChain]:
    chain = BaseChain(CHAIN, "input", -1, "accept")
    return RulesetView(
        (chain,), {CHAIN: ((1, DROP_BANNED),)}, {s.ref: s for s in sets}, READ_AT
    ), chain


def packet(source: str) -> Packet:
    return Packet(4, 22, "tcp", ipaddress.ip_address(source))


def test_a_listed_set_keeps_its_elements_and_their_ends() -> None:
    parsed = named_set(LISTED, READ_AT)

    assert parsed.ref == BANNED
    assert parsed.elements == (
        SetElement("198.18.0.5", READ_AT + 600),  # 599 whole seconds left, so less than 600
        SetElement("198.18.0.6"),
        SetElement({"prefix": {"addr": "198.18.1.0", "len": 24}}),
        SetElement({"range": ["198.18.2.1", "198.18.2.9"]}),
        SetElement({"prefix": {"addr": "198.18.3.0", "len": 24}}, READ_AT + 1),
    )


@pytest.mark.parametrize(
    ("source", "outcome"),
    [
        ("198.18.0.5", ChainOutcome.DROPS),
        ("198.18.0.6", ChainOutcome.DROPS),
        ("198.18.1.200", ChainOutcome.DROPS),
        ("198.18.2.9", ChainOutcome.DROPS),
        ("198.18.2.10", ChainOutcome.ACCEPTS),
        ("198.18.3.3", ChainOutcome.DROPS),  # under a second left, but listed: still live
        ("198.18.0.7", ChainOutcome.ACCEPTS),
    ],
)
def test_a_source_is_looked_up_in_the_set(source: str, outcome: ChainOutcome) -> None:
    v, chain = view(named_set(LISTED, READ_AT))

    assert evaluate_chain(v, chain, packet(source)).outcome is outcome


@pytest.mark.parametrize(
    ("source", "later_s", "outcome"),
    [
        ("198.18.0.5", 599, ChainOutcome.DROPS),
        ("198.18.0.5", 600, ChainOutcome.ACCEPTS),  # the ban timed out
        ("198.18.0.6", 10**6, ChainOutcome.DROPS),  # no timeout: banned until removed
    ],
)
def test_an_element_counts_until_it_times_out(
    source: str, later_s: float, outcome: ChainOutcome
) -> None:
    v, chain = view(named_set(LISTED, READ_AT))

    finding = evaluate_chain(v, chain, packet(source), now_s=READ_AT + later_s)

    assert finding.outcome is outcome


def test_a_set_is_looked_up_in_the_rules_own_table_only() -> None:
    elsewhere = NamedSet(ChainRef("inet", "other", "addr-set-sshd"), (SetElement("198.18.0.7"),))
    v, chain = view(elsewhere)

    finding = evaluate_chain(v, chain, packet("198.18.0.7"))

    assert finding.outcome is ChainOutcome.MAY_DROP  # its own table's set was not read


def test_an_unknown_source_may_be_in_the_set() -> None:
    v, chain = view(named_set(LISTED, READ_AT))

    assert evaluate_chain(v, chain, Packet(4, 22, "tcp")).outcome is ChainOutcome.MAY_DROP


def test_an_empty_set_matches_nothing() -> None:
    v, chain = view(NamedSet(BANNED))

    assert evaluate_chain(v, chain, packet("198.18.0.5")).outcome is ChainOutcome.ACCEPTS


def test_set_references_name_the_sets_matches_look_up() -> None:
    rules = ((1, DROP_BANNED), (2, ({"jump": {"target": "@not-a-set"}},)))

    assert set_references(rules) == {"addr-set-sshd"}
