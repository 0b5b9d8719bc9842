"""Reading the kernel's listings: allow elements, counters and the table's shape.

Fixtures are copies of real ``nft -j`` output (nftables 1.0.6) of a table rendered by the agent,
metainfo and handles included; only what the agent owns is read.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.model import Address, EntryKey, ObservedElement
from agent.rules.readback import (
    CounterValue,
    parse_allow_set_name,
    parse_counters,
    parse_set_elements,
    parse_table_shape,
    repeated_values,
)

METAINFO = {
    "metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}
}

# nft -j list set inet vicifast allow4_agent
ALLOW4_LISTING: list[dict[str, Any]] = [
    METAINFO,
    {
        "set": {
            "family": "inet",
            "name": "allow4_agent",
            "table": "vicifast",
            "type": "ipv4_addr",
            "handle": 2,
            "size": 65536,
            "flags": ["timeout"],
            "elem": [
                {
                    "elem": {
                        "val": "198.18.0.1",
                        "timeout": 60,
                        "expires": 59,
                        "comment": "req=r1 sub=bob",
                    }
                },
                {"elem": {"val": "198.18.0.2", "timeout": 3600, "expires": 3599}},
            ],
        }
    },
]

# nft -j list set inet vicifast allow6_agent (an element added by the /64 policy)
ALLOW6_LISTING: list[dict[str, Any]] = [
    METAINFO,
    {
        "set": {
            "family": "inet",
            "name": "allow6_agent",
            "table": "vicifast",
            "type": "ipv6_addr",
            "handle": 4,
            "size": 65536,
            "flags": ["timeout"],
            "elem": [
                {
                    "elem": {
                        "val": "2001:db8:1:2::",
                        "timeout": 120,
                        "expires": 119,
                        "comment": "req=r2 sub=\u00e9",
                    }
                }
            ],
        }
    },
]

# nft -j list counters table inet vicifast
COUNTERS_LISTING: list[dict[str, Any]] = [
    METAINFO,
    {
        "counter": {
            "family": "inet",
            "name": "drop_agent",
            "table": "vicifast",
            "handle": 1,
            "packets": 17,
            "bytes": 1020,
        }
    },
    {
        "counter": {
            "family": "inet",
            "name": "drop_admin",
            "table": "vicifast",
            "handle": 9,
            "packets": 0,
            "bytes": 0,
        }
    },
]


def agent(address: str) -> EntryKey:
    return EntryKey("agent", Address(address))


def test_allow4_listing_reads_back_timeouts_expiries_and_comments() -> None:
    assert list(parse_set_elements(ALLOW4_LISTING, ipv6_prefix=64)) == [
        ObservedElement(agent("198.18.0.1"), 60, 59, "req=r1 sub=bob"),
        ObservedElement(agent("198.18.0.2"), 3600, 3599, ""),
    ]


def test_slash_64_element_reads_back_as_its_prefix() -> None:
    assert list(parse_set_elements(ALLOW6_LISTING, ipv6_prefix=64)) == [
        ObservedElement(agent("2001:db8:1:2::/64"), 120, 119, "req=r2 sub=\u00e9")
    ]


def test_slash_128_element_reads_back_as_the_bare_address() -> None:
    assert [e.key for e in parse_set_elements(ALLOW6_LISTING, ipv6_prefix=128)] == [
        agent("2001:db8:1:2::")
    ]


def test_read_back_key_equals_the_key_that_wrote_it() -> None:
    # what render writes as val for a /64 entry must read back to the same EntryKey
    key = agent("2001:db8:1:2::/64")
    listing = copy.deepcopy(ALLOW6_LISTING)
    listing[1]["set"]["elem"][0]["elem"]["val"] = key.address.element
    (observed,) = parse_set_elements(listing, ipv6_prefix=64)
    assert observed.key == key


def test_profile_comes_from_the_set_name() -> None:
    listing = copy.deepcopy(ALLOW4_LISTING)
    listing[1]["set"]["name"] = "allow4_admin_2"
    assert {e.key.profile for e in parse_set_elements(listing, ipv6_prefix=64)} == {"admin_2"}


@pytest.mark.parametrize(
    "name",
    ["static4_agent", "guard4_api", "probe_features", "allow4_", "allow5_agent", "allow4_Agent"],
)
def test_sets_that_are_not_allow_sets_are_ignored(name: str) -> None:
    listing = copy.deepcopy(ALLOW4_LISTING)
    listing[1]["set"]["name"] = name
    assert list(parse_set_elements(listing, ipv6_prefix=64)) == []


def test_static_interval_set_listing_is_ignored() -> None:
    static = {
        "set": {
            "family": "inet",
            "name": "static4_agent",
            "table": "vicifast",
            "type": "ipv4_addr",
            "handle": 3,
            "flags": ["interval"],
            "elem": [{"prefix": {"addr": "203.0.113.0", "len": 24}}, "192.0.2.7"],
        }
    }
    assert list(parse_set_elements([METAINFO, static, *ALLOW4_LISTING[1:]], 64)) == list(
        parse_set_elements(ALLOW4_LISTING, 64)
    )


def test_set_without_elements_yields_nothing() -> None:
    listing = copy.deepcopy(ALLOW4_LISTING)
    del listing[1]["set"]["elem"]
    assert list(parse_set_elements(listing, ipv6_prefix=64)) == []


def test_bare_element_without_timeout_or_comment_reads_back() -> None:
    listing = copy.deepcopy(ALLOW4_LISTING)
    listing[1]["set"]["elem"] = ["198.18.0.9"]
    assert list(parse_set_elements(listing, ipv6_prefix=64)) == [
        ObservedElement(agent("198.18.0.9"), 0, 0, "")
    ]


@pytest.mark.parametrize(
    ("set_name", "val"),
    [
        ("allow4_agent", "2001:db8::1"),  # wrong family for the set
        ("allow6_agent", "198.18.0.1"),
        ("allow4_agent", {"prefix": {"addr": "198.18.0.0", "len": 24}}),
        ("allow4_agent", "not-an-address"),
    ],
)
def test_values_that_cannot_be_ours_are_ignored(set_name: str, val: Any) -> None:
    listing = copy.deepcopy(ALLOW4_LISTING)
    listing[1]["set"]["name"] = set_name
    listing[1]["set"]["elem"] = [{"elem": {"val": val, "timeout": 60, "expires": 1}}]
    assert list(parse_set_elements(listing, ipv6_prefix=64)) == []


def test_listing_of_several_sets_reads_them_all() -> None:
    got = list(parse_set_elements([*ALLOW4_LISTING, *ALLOW6_LISTING[1:]], ipv6_prefix=64))
    assert [e.key for e in got] == [
        agent("198.18.0.1"),
        agent("198.18.0.2"),
        agent("2001:db8:1:2::/64"),
    ]


# --- torn listings ---------------------------------------------------------------------------


def _with_elems(name: str, elems: list[Any]) -> dict[str, Any]:
    return {"set": {"family": "inet", "name": name, "table": "vicifast", "elem": elems}}


def _el(val: Any, expires: int = 59) -> dict[str, Any]:
    return {"elem": {"val": val, "timeout": 60, "expires": expires}}


PREFIX = {"prefix": {"addr": "198.18.0.0", "len": 24}}

# listing -> elements named a second time within one set
TORN = [
    pytest.param(ALLOW4_LISTING, 0, id="whole-listing"),
    pytest.param([METAINFO], 0, id="metainfo-only"),
    pytest.param(
        [
            _with_elems(
                "allow4_agent", [_el("198.18.0.1"), _el("198.18.0.2"), _el("198.18.0.1", 58)]
            )
        ],
        1,
        id="a-value-listed-twice-with-another-countdown",
    ),
    pytest.param(
        [_with_elems("allow4_agent", [_el("198.18.0.1")] * 3 + [_el("198.18.0.2")] * 2)],
        3,
        id="every-extra-copy-counts",
    ),
    pytest.param(
        [_with_elems("allow4_agent", ["198.18.0.9", _el("198.18.0.9")])],
        1,
        id="bare-and-full-form-of-one-value",
    ),
    pytest.param(
        [_with_elems("allow4_agent", [_el(PREFIX), _el(PREFIX)])],
        1,
        id="values-that-are-not-strings",
    ),
    pytest.param(
        [
            _with_elems("allow4_agent", [_el("198.18.0.1")]),
            _with_elems("other", [_el("198.18.0.1")]),
        ],
        0,
        id="the-same-value-in-two-sets",
    ),
    pytest.param(
        [_with_elems("allow6_agent", [_el("2001:db8:1:2::1"), _el("2001:db8:1:2::2")])],
        0,
        id="two-addresses-of-one-slash-64-are-two-values",
    ),
]


@pytest.mark.parametrize(("listing", "repeats"), TORN)
def test_repeated_values_tell_a_torn_listing(listing: list[dict[str, Any]], repeats: int) -> None:
    assert repeated_values(listing) == repeats


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("allow4_agent", ("agent", 4)),
        ("allow6_agent", ("agent", 6)),
        ("allow6_admin_2", ("admin_2", 6)),
        ("static4_agent", None),
        ("allow4_", None),
        ("allow4_1x", None),
        ("allow46_agent", None),
        ("xallow4_agent", None),
        ("allow4_agent ", None),
    ],
)
def test_allow_set_names(name: str, parsed: tuple[str, int] | None) -> None:
    assert parse_allow_set_name(name) == parsed


# --- counters ---------------------------------------------------------------------------------


def test_counters_are_read_by_name() -> None:
    assert parse_counters(COUNTERS_LISTING) == {
        "drop_agent": CounterValue("drop_agent", 17, 1020),
        "drop_admin": CounterValue("drop_admin", 0, 0),
    }


def test_counters_listing_with_only_metainfo_is_empty() -> None:
    assert parse_counters([METAINFO]) == {}


def test_sets_in_a_counters_listing_are_not_counters() -> None:
    assert parse_counters([*ALLOW4_LISTING, *COUNTERS_LISTING[1:2]]) == {
        "drop_agent": CounterValue("drop_agent", 17, 1020)
    }


# --- table shape --------------------------------------------------------------------------------

# nft -j -t list table inet vicifast (default config, abridged to one rule per chain)
TERSE_TABLE: list[dict[str, Any]] = [
    METAINFO,
    {"table": {"family": "inet", "name": "vicifast", "handle": 1}},
    {
        "counter": {
            "family": "inet",
            "name": "drop_agent",
            "table": "vicifast",
            "handle": 1,
            "packets": 0,
            "bytes": 0,
        }
    },
    {
        "set": {
            "family": "inet",
            "name": "allow4_agent",
            "table": "vicifast",
            "type": "ipv4_addr",
            "handle": 2,
            "size": 65536,
            "flags": ["timeout"],
        }
    },
    {
        "set": {
            "family": "inet",
            "name": "static4_agent",
            "table": "vicifast",
            "type": "ipv4_addr",
            "handle": 3,
            "flags": ["interval"],
        }
    },
    {"chain": {"family": "inet", "table": "vicifast", "name": "prof_agent", "handle": 6}},
    {
        "chain": {
            "family": "inet",
            "table": "vicifast",
            "name": "input",
            "handle": 13,
            "type": "filter",
            "hook": "input",
            "prio": -10,
            "policy": "accept",
        }
    },
    {
        "rule": {
            "family": "inet",
            "table": "vicifast",
            "chain": "prof_agent",
            "handle": 12,
            "expr": [{"counter": "drop_agent"}, {"drop": None}],
        }
    },
    {
        "rule": {
            "family": "inet",
            "table": "vicifast",
            "chain": "input",
            "handle": 14,
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}},
                {"accept": None},
            ],
        }
    },
]


def test_table_shape_ignores_handles_and_counter_values() -> None:
    shape = parse_table_shape(TERSE_TABLE)
    assert shape.sets == frozenset(
        {
            ("allow4_agent", "ipv4_addr", 65536, ("timeout",)),
            ("static4_agent", "ipv4_addr", 0, ("interval",)),
        }
    )
    assert shape.chains == frozenset({"prof_agent", "input"})
    assert shape.counters == frozenset({"drop_agent"})
    assert shape.rules == (
        ("prof_agent", '[{"counter":"drop_agent"},{"drop":null}]'),
        (
            "input",
            '[{"match":{"left":{"meta":{"key":"iif"}},"op":"==","right":"lo"}},{"accept":null}]',
        ),
    )
    moved = copy.deepcopy(TERSE_TABLE)
    for item in moved:
        for obj in item.values():
            if "handle" in obj:
                obj["handle"] += 100
            if "packets" in obj:
                obj["packets"] = obj["bytes"] = 99
    assert parse_table_shape(moved) == shape


def test_table_shape_sees_a_changed_rule() -> None:
    changed = copy.deepcopy(TERSE_TABLE)
    changed[-2]["rule"]["expr"] = [{"drop": None}]
    assert parse_table_shape(changed).rules != parse_table_shape(TERSE_TABLE).rules
