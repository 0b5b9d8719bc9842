"""The pure comparison of the agent's whole table (``agent.rules.structure``): a listing in,
findings and the objects to delete out; and how the kernel's interval elements and an allow
element's timeout and comment are judged (``agent.reconcile.element_differs``)."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from agent.config import parse_config
from agent.model import Address, EntryKey, ObservedElement
from agent.reconcile import element_differs
from agent.rules import render
from agent.rules.structure import (
    Rogue,
    Structure,
    expected_structure,
    observed_structure,
    ranges_from_keys,
    render_repair,
)
from agent.state import Entry

CFG = parse_config('agent_id = "a"\n[static_sources]\nall = ["198.18.0.0/24"]\n').firewall
NET = ipaddress.ip_network("198.18.0.0/24")
STATIC4 = [(NET.network_address.packed, 0), ((NET.broadcast_address + 1).packed, 1)]

Items = list[dict[str, Any]]


def _listed() -> Items:
    """A terse listing of a freshly rendered table, as nft prints it (handles, counters)."""
    items: Items = [{"table": {"family": "inet", "name": CFG.table, "handle": 1}}]
    for n, cmd in enumerate(render.render_table(CFG), 2):
        add = cmd.get("add", {})
        for kind in ("chain", "set", "rule", "counter"):
            if kind in add:
                obj = {**copy.deepcopy(add[kind]), "family": "inet", "handle": n}
                obj["table"] = CFG.table
                if kind == "counter":
                    obj.update(packets=12, bytes=3400)
                items.append({kind: obj})
    return items


def _keys(**extra: list[tuple[bytes, int]]) -> dict[str, list[tuple[bytes, int]]]:
    keys = {"static4_agent": list(STATIC4), "static6_agent": []}
    for name, more in extra.items():
        keys[name] = keys.get(name, []) + more
    return keys


def _add(kind: str, **obj: Any) -> Callable[[Items], Items]:
    return lambda items: [*items, {kind: {"family": "inet", "table": CFG.table, **obj}}]


def _edit(kind: str, name: str, **changes: Any) -> Callable[[Items], Items]:
    def edit(items: Items) -> Items:
        for item in items:
            if kind in item and item[kind].get("name") == name:
                item[kind].update(changes)
        return items

    return edit


def _drop_rule(chain: str, index: int) -> Callable[[Items], Items]:
    def drop(items: Items) -> Items:
        rules = [i for i in items if i.get("rule", {}).get("chain") == chain]
        return [i for i in items if i is not rules[index]]

    return drop


_ACCEPT_ALL = {"rule": {"family": "inet", "table": CFG.table, "chain": "prof_agent"}}


def _insert_accept(items: Items) -> Items:
    first = next(n for n, i in enumerate(items) if i.get("rule", {}).get("chain") == "prof_agent")
    rule = copy.deepcopy(_ACCEPT_ALL)
    rule["rule"]["expr"] = [{"accept": None}]
    return [*items[:first], rule, *items[first:]]


def _unchanged(items: Items) -> Items:
    return items


# tamper: (listing change, interval keys, findings, rogue chains, sets, objects)
CASES: dict[str, tuple[Callable[[Items], Items], Any, list[str], Rogue]] = {
    "as rendered": (_unchanged, _keys(), [], Rogue()),
    "0.0.0.0/0 added to a static set": (
        _unchanged,
        _keys(static4_agent=[(b"\0\0\0\0", 0)]),
        ["elements of static4_agent"],
        Rogue(),
    ),
    "an address added to an empty static set": (
        _unchanged,
        _keys(static6_agent=[(b"\x20\x01\x0d\xb8" + b"\0" * 12, 0)]),
        ["elements of static6_agent"],
        Rogue(),
    ),
    "a static set not read (doctor)": (_unchanged, {}, [], Rogue()),
    "a rogue set": (
        _add("set", name="rogue", type="ipv4_addr"),
        _keys(),
        ["rogue set rogue"],
        Rogue(sets=("rogue",)),
    ),
    "a rogue map": (
        _add("map", name="m", type="ipv4_addr", map="verdict"),
        _keys(),
        ["rogue map m"],
        Rogue(objects=(("map", "m"),)),
    ),
    "a rogue chain": (
        _add("chain", name="rogue"),
        _keys(),
        ["rogue chain rogue"],
        Rogue(chains=("rogue",)),
    ),
    "a rogue counter": (
        _add("counter", name="c", packets=0, bytes=0),
        _keys(),
        ["rogue counter c"],
        Rogue(objects=(("counter", "c"),)),
    ),
    "a rule inserted": (_insert_accept, _keys(), ["rules of prof_agent"], Rogue()),
    "a rule deleted": (_drop_rule("input", -1), _keys(), ["rules of input"], Rogue()),
    "the input policy set to drop": (
        _edit("chain", "input", policy="drop"),
        _keys(),
        ["chain input (hook, priority or policy)"],
        Rogue(),  # policy is changed in place
    ),
    "the input priority changed": (
        _edit("chain", "input", prio=100),
        _keys(),
        ["chain input (hook, priority or policy)"],
        Rogue(chains=("input",)),
    ),
    "an allow set's flags changed": (
        _edit("set", "allow4_agent", flags=[]),
        _keys(),
        ["set allow4_agent (type, size or flags)"],
        Rogue(sets=("allow4_agent",)),
    ),
    "another table's objects": (
        lambda items: [*items, {"chain": {"family": "inet", "table": "other", "name": "x"}}],
        _keys(),
        [],
        Rogue(),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_table_is_compared_whole(case: str) -> None:
    change, keys, findings, rogue = CASES[case]
    observed = observed_structure(change(_listed()), CFG.table, keys)
    expected = expected_structure(CFG)
    assert expected.missing_from(observed) == findings
    assert expected.rogue_in(observed) == rogue


def test_a_dormant_table_is_a_finding() -> None:
    observed = observed_structure(_listed(), CFG.table, _keys())
    dormant = Structure(observed.chains, observed.sets, observed.rules, observed.objects, flags=1)
    assert expected_structure(CFG).missing_from(dormant) == [
        "table flags (dormant: every rule of it off)"
    ]


def test_a_repair_flushes_every_chain_before_deleting_and_renders_the_table_again() -> None:
    observed = observed_structure(_add("chain", name="rogue")(_listed()), CFG.table, _keys())
    rogue = Rogue(chains=("rogue",), sets=("x",), objects=(("quota", "q"),))
    cmds = render_repair(CFG, observed, rogue)
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in cmds]
    flushes = [v for v in verbs[: len(observed.chains)]]
    assert flushes == [("flush", "chain")] * len(observed.chains)
    assert verbs[len(observed.chains) : len(observed.chains) + 3] == [
        ("delete", "chain"),
        ("delete", "set"),
        ("delete", "quota"),
    ]
    assert cmds[len(observed.chains) + 3 :] == render.render_table(CFG)
    assert render_repair(CFG, observed, Rogue()) == render.render_table(CFG)


def _v4(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


@pytest.mark.parametrize(
    ("keys", "covers"),
    [
        ([], []),
        # As the kernel dumps 198.18.0.0/24 and 198.18.5.5 (nft adds an end at 0.0.0.0).
        (
            [
                (_v4("198.18.5.6"), 1),
                (_v4("198.18.5.5"), 0),
                (_v4("198.18.1.0"), 1),
                (_v4("198.18.0.0"), 0),
                (bytes(4), 1),
            ],
            [("198.18.0.0", "198.18.1.0"), ("198.18.5.5", "198.18.5.6")],
        ),
        ([(bytes(4), 0)], [("0.0.0.0", None)]),  # noqa: S104 (0.0.0.0/0: open to the top)
        # Adjacent ranges (an end and a start at one address) are one.
        (
            [
                (_v4("198.18.0.0"), 0),
                (_v4("198.18.1.0"), 1),
                (_v4("198.18.1.0"), 0),
                (_v4("198.18.2.0"), 1),
            ],
            [("198.18.0.0", "198.18.2.0")],
        ),
    ],
)
def test_interval_elements_are_read_as_the_ranges_they_cover(
    keys: list[tuple[bytes, int]], covers: list[tuple[str, str | None]]
) -> None:
    expected = tuple(
        (int(ipaddress.ip_address(a)), int(ipaddress.ip_address(b)) if b else 1 << 32)
        for a, b in covers
    )
    assert ranges_from_keys(keys) == expected


NOW = 1_000_000_000
ALICE = Entry(EntryKey("agent", Address("198.18.0.2")), "alice", NOW, NOW + 600_000, "r-1")
RIGHT = render.element_comment("alice", "r-1")


@pytest.mark.parametrize(
    ("seen", "differs"),
    [
        (ObservedElement(ALICE.key, 600, 600, RIGHT), False),
        (ObservedElement(ALICE.key, 600, 598, RIGHT), False),  # listed in whole seconds
        (ObservedElement(ALICE.key, 86400, 86400, RIGHT), True),  # re-added for a day
        (ObservedElement(ALICE.key, 60, 60, RIGHT), True),  # re-added for a minute
        (ObservedElement(ALICE.key, 0, 0, RIGHT), True),  # re-added without a timeout
        (ObservedElement(ALICE.key, 600, 600, "req=x sub=mallory"), True),
    ],
)
def test_an_allow_element_changed_by_hand_is_told_apart(
    seen: ObservedElement, differs: bool
) -> None:
    assert element_differs(ALICE, seen, NOW) is differs
