"""Pure parts of the lifecycle: notifications, structure, shadowing, comments, convergence."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from agent.config import PortRange, parse_config
from agent.model import Address, EntryKey, ObservedElement
from agent.reconcile import (
    STARTUP,
    UNCHANGED_STARTUP,
    Scope,
    entry_from_element,
    plan_convergence,
    request_of,
    startup_scope,
    subject_of,
)
from agent.rules import render
from agent.rules.monitor import (
    NFT_MSG_NEWGEN,
    GenerationSummary,
    Touch,
    generation_pid,
    messages,
)
from agent.rules.shadowing import find_shadowing
from agent.rules.structure import expected_structure, observed_structure
from agent.state import Entry, Event, EventKind, StateView, newest_numbered
from agent.state_records import entries_from_rows, from_stored, settled_audit, to_stored
from agent.store_records import IntentChange, PendingIntent, StoredEntry

# --- netlink notifications ----------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _msg(kind: int, family: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 0, 0, 0) + body


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


INET, IP = 1, 2
CASES: list[tuple[str, bytes, Touch]] = [
    ("our table deleted", _msg(2, INET, _attr(1, _name("vicifast"))), Touch(structure=True)),
    (
        "element deleted from our set",
        _msg(14, INET, _attr(1, _name("vicifast")), _attr(2, _name("allow4_agent"))),
        Touch(sets=frozenset({"allow4_agent"})),
    ),
    (
        "our set deleted",
        _msg(11, INET, _attr(1, _name("vicifast")), _attr(2, _name("allow6_agent"))),
        Touch(structure=True, sets=frozenset({"allow6_agent"})),
    ),
    ("a rule of ours deleted", _msg(8, INET, _attr(1, _name("vicifast"))), Touch(structure=True)),
    ("same name, other family", _msg(2, IP, _attr(1, _name("vicifast"))), Touch(elsewhere=True)),
    ("another inet table", _msg(3, INET, _attr(1, _name("filter"))), Touch(elsewhere=True)),
    ("a longer name", _msg(3, INET, _attr(1, _name("vicifast2"))), Touch(elsewhere=True)),
    ("a shorter name", _msg(3, INET, _attr(1, _name("vicifas"))), Touch(elsewhere=True)),
    (
        "our table named after another attribute",
        _msg(14, INET, _attr(2, _name("allow4_agent")), _attr(1, _name("vicifast"))),
        Touch(sets=frozenset({"allow4_agent"})),
    ),
]


@pytest.mark.parametrize(("_what", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_foreign_generation_is_summed_up_per_table(
    _what: str, data: bytes, expected: Touch
) -> None:
    summary = GenerationSummary("vicifast")  # as the monitor folds a generation's messages
    for kind, start, end in messages(data):
        summary.add(data, kind, start, end)
    assert summary.touch() == expected


def test_the_generation_message_names_the_committing_thread() -> None:
    gen = _msg(NFT_MSG_NEWGEN, 0, _attr(1, struct.pack("!I", 7)), _attr(2, struct.pack("!I", 4321)))
    data = _msg(8, INET, _attr(1, _name("vicifast"))) + gen
    found = list(messages(data))
    assert [k for k, _, _ in found] == [8, NFT_MSG_NEWGEN]
    _, start, end = found[1]
    assert generation_pid(data, start, end) == 4321


def test_touches_merge() -> None:
    merged = Touch(sets=frozenset({"a"})).merge(Touch(lost=True, sets=frozenset({"b"})))
    assert merged == Touch(sets=frozenset({"a", "b"}), lost=True)
    assert merged.ours
    assert not Touch(elsewhere=True).ours
    assert Touch().empty


# --- structure -----------------------------------------------------------------------------


def _listing(cfg_text: str = 'agent_id = "a"') -> tuple[Any, list[dict[str, Any]]]:
    """What a terse listing of a freshly rendered table holds (static sets' elements aside)."""
    cfg = parse_config(cfg_text).firewall
    items: list[dict[str, Any]] = []
    for cmd in render.render_table(cfg):
        add = cmd.get("add", {})
        for kind in ("chain", "set", "rule", "counter"):
            if kind in add:
                items.append({kind: {**add[kind], "family": "inet", "table": cfg.table}})
    return cfg, items


def test_an_intact_table_has_the_expected_structure() -> None:
    cfg, items = _listing()
    assert expected_structure(cfg).missing_from(observed_structure(items, cfg.table)) == []


@pytest.mark.parametrize(
    ("damage", "missing"),
    [
        ("flush input", ["rules of input"]),
        ("drop set allow4_agent", ["set allow4_agent"]),
        ("drop chain prof_agent", ["chain prof_agent", "rules of prof_agent"]),
        ("other table", None),
    ],
)
def test_a_damaged_structure_names_what_is_missing(damage: str, missing: list[str] | None) -> None:
    cfg, items = _listing()
    if damage == "flush input":
        items = [i for i in items if i.get("rule", {}).get("chain") != "input"]
    elif damage == "drop set allow4_agent":
        items = [i for i in items if i.get("set", {}).get("name") != "allow4_agent"]
    elif damage == "drop chain prof_agent":
        items = [
            i
            for i in items
            if i.get("chain", {}).get("name") != "prof_agent"
            and i.get("rule", {}).get("chain") != "prof_agent"
        ]
    else:
        items = [{k: {**v, "table": "other"}} for i in items for k, v in i.items()]
    got = expected_structure(cfg).missing_from(observed_structure(items, cfg.table))
    if missing is None:
        assert len(got) > 5  # nothing of ours is there
    else:
        assert got == missing


# --- shadowing -----------------------------------------------------------------------------

PROTECTED = [PortRange("udp", 5060, 5060), PortRange("tcp", 5061, 5061)]


def _chain(family: str, table: str, prio: int, policy: str, hook: str = "input") -> dict[str, Any]:
    return {
        "chain": {
            "family": family,
            "table": table,
            "name": "in",
            "type": "filter",
            "hook": hook,
            "prio": prio,
            "policy": policy,
        }
    }


def _rule(family: str, table: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": "in", "expr": list(expr)}}


def _dport(proto: str, port: Any) -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": proto, "field": "dport"}},
            "right": port,
        }
    }


SHADOW_CASES: list[tuple[str, list[dict[str, Any]], dict[str, tuple[str, ...]]]] = [
    (
        "policy drop, nothing opened",
        [_chain("ip", "filter", 0, "drop")],
        {"filter": ("5060/udp", "5061/tcp")},
    ),
    (
        "policy drop, SIP opened",
        [
            _chain("ip", "filter", 0, "drop"),
            _rule("ip", "filter", _dport("udp", 5060), {"accept": None}),
        ],
        {"filter": ("5061/tcp",)},
    ),
    (
        "ufw-style final reject",
        [_chain("inet", "ufw", 0, "accept"), _rule("inet", "ufw", {"reject": None})],
        {"ufw": ("5060/udp", "5061/tcp")},
    ),
    (
        "conditional drop is not judged",
        [
            _chain("inet", "fw", 0, "accept"),
            _rule(
                "inet",
                "fw",
                {
                    "match": {
                        "op": "==",
                        "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": "203.0.113.9",
                    }
                },
                {"drop": None},
            ),
        ],
        {},
    ),
    ("runs before ours", [_chain("ip", "early", -100, "drop")], {}),
    ("debian default accepts", [_chain("inet", "filter", 0, "accept")], {}),
    ("not the input hook", [_chain("ip", "fwd", 0, "drop", hook="forward")], {}),
    ("our own table", [_chain("inet", "vicifast", -10, "drop")], {}),
    (
        "port range opened",
        [
            _chain("ip6", "f", 0, "drop"),
            _rule("ip6", "f", _dport("udp", {"range": [5000, 5100]}), {"accept": None}),
            _rule("ip6", "f", _dport("tcp", {"set": [5061, 443]}), {"accept": None}),
        ],
        {},
    ),
]


@pytest.mark.parametrize(
    ("_what", "items", "expected"), SHADOW_CASES, ids=[c[0] for c in SHADOW_CASES]
)
def test_shadowing_chains_are_found(
    _what: str, items: list[dict[str, Any]], expected: dict[str, tuple[str, ...]]
) -> None:
    found = find_shadowing(items, own_table="vicifast", own_priority=-10, protected=PROTECTED)
    assert {s.table: set(s.ports) for s in found} == {t: set(p) for t, p in expected.items()}


# --- element comments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("comment", "request_id", "subject"),
    [
        ("req=r-1 sub=alice", "r-1", "alice"),
        ("req=r-2 sub=", "r-2", ""),
        ("req=r-3 sub=a b sub=c", "r-3", "a b sub=c"),
        ("local req=local-9 sub=bob", "local-9", "bob"),
        ("hand made", "", ""),
    ],
)
def test_an_element_comment_gives_back_request_and_subject(
    comment: str, request_id: str, subject: str
) -> None:
    assert request_of(comment) == request_id
    assert subject_of(comment) == subject


def test_an_entry_is_rebuilt_from_an_element() -> None:
    key = EntryKey("agent", Address("198.18.0.9"))
    e = entry_from_element(ObservedElement(key, 600, 500, "req=r-1 sub=alice"), 1_000)
    assert (e.subject, e.request_id, e.created_at_ms, e.expires_at_ms) == (
        "alice",
        "r-1",
        1_000,
        501_000,
    )


# --- convergence: one event and one state_version per entry that changes -------------------

NOW = 1_000_000
CFG = parse_config('agent_id = "a"').firewall
ALL_SETS = frozenset(render.allow_set(p.name, fam) for p in CFG.profiles for fam in (4, 6))
NO_TABLE = expected_structure(CFG).missing_from(observed_structure([], CFG.table))
ALICE = Entry(EntryKey("agent", Address("198.18.0.2")), "alice", NOW - 60_000, NOW + 600_000, "r-1")
GONE = Entry(EntryKey("agent", Address("198.18.0.3")), "bob", NOW - 90_000, NOW - 1, "r-2")
INTRUDER = ObservedElement(EntryKey("agent", Address("198.18.0.4")), 3600, 3600, "hand made")


def _seen(e: Entry) -> ObservedElement:
    comment = render.element_comment(e.subject, e.request_id, local=e.local)
    return ObservedElement(e.key, 600, (e.expires_at_ms - NOW) // 1000, comment)


# what: (stored entries, kernel elements, structure missing, event kinds with their addresses)
CONVERGE_CASES: list[
    tuple[str, list[Entry], list[ObservedElement], list[str], list[tuple[EventKind, str]]]
] = [
    ("fresh host: no store, no table", [], [], NO_TABLE, []),
    ("a chain was flushed", [ALICE], [_seen(ALICE)], ["rules of input"], []),
    ("in sync", [ALICE], [_seen(ALICE)], [], []),
    (
        "ruleset flushed: the entry comes back",
        [ALICE],
        [],
        NO_TABLE,
        [(EventKind.DRIFT_REPAIRED, "198.18.0.2")],
    ),
    ("one element deleted", [ALICE], [], [], [(EventKind.DRIFT_REPAIRED, "198.18.0.2")]),
    ("element added by hand", [], [INTRUDER], [], [(EventKind.DRIFT_REPAIRED, "198.18.0.4")]),
    ("expired while down: not restored", [GONE], [], NO_TABLE, [(EventKind.EXPIRED, "198.18.0.3")]),
]


@pytest.mark.parametrize(
    ("_what", "stored", "kernel", "broken", "expected"),
    CONVERGE_CASES,
    ids=[c[0] for c in CONVERGE_CASES],
)
def test_convergence_raises_one_event_and_version_per_entry_and_none_for_structure(
    _what: str,
    stored: list[Entry],
    kernel: list[ObservedElement],
    broken: list[str],
    expected: list[tuple[EventKind, str]],
) -> None:
    view = StateView(entries={e.key: e for e in stored}, state_version=7 if stored else 0)
    plan = plan_convergence(
        view,
        {o.key: o for o in kernel},
        checked=ALL_SETS,
        now_ms=NOW,
        structure_repaired=broken,
    )
    events = plan.result.events
    assert [(e.kind, e.entry.key.address.text if e.entry else None) for e in events] == expected
    assert [e.state_version for e in events] == [
        view.state_version + i + 1 for i in range(len(expected))
    ]
    assert plan.view.state_version == view.state_version + len(expected)
    assert plan.result.structure_repaired == tuple(broken)
    assert plan.result.drift == bool(broken or plan.result.restored or plan.result.removed)
    assert view.state_version == (7 if stored else 0)  # the caller's view is left as it was


def test_only_entries_of_the_sets_read_can_be_missing() -> None:
    v6 = Entry(EntryKey("agent", Address("2001:db8::5")), "bob", NOW - 1000, NOW + 60_000, "r6")
    view = StateView(entries={ALICE.key: ALICE, v6.key: v6})
    only_v4 = plan_convergence(view, {}, checked={"allow4_agent"}, now_ms=NOW)
    assert [e.key for e in only_v4.missing] == [ALICE.key]
    both = plan_convergence(view, {}, checked={"allow4_agent", "allow6_agent"}, now_ms=NOW)
    assert {e.key for e in both.missing} == {ALICE.key, v6.key}


def test_a_fresh_host_starts_at_version_zero_with_no_history_yet_counts_as_repaired() -> None:
    plan = plan_convergence(
        StateView(), {}, checked=ALL_SETS, now_ms=NOW, structure_repaired=NO_TABLE
    )
    assert NO_TABLE  # the table really is missing
    assert plan.view.state_version == 0
    assert plan.result.events == ()
    assert plan.result.drift  # the daemon does not count it at start-up (Verifier.record)
    assert "chain input" in plan.result.describe()


@pytest.mark.parametrize(
    ("stopped_at", "now", "intents", "expected"),
    [
        (7, 7, False, UNCHANGED_STARTUP),
        (7, 8, False, STARTUP),  # someone committed while the daemon was stopped
        (None, 7, False, STARTUP),  # a crash, or a fresh state: nothing recorded
        (7, None, False, STARTUP),  # the generation could not be read
        (7, 7, True, STARTUP),  # a pending intent is settled by the elements it left
    ],
)
def test_only_an_unchanged_generation_after_a_clean_stop_skips_the_element_listing(
    stopped_at: int | None, now: int | None, intents: bool, expected: Scope
) -> None:
    assert startup_scope(stopped_at, now, intents=intents) is expected
    assert UNCHANGED_STARTUP.sets == frozenset()
    assert UNCHANGED_STARTUP.install


def test_only_the_retained_history_of_a_large_change_is_stored() -> None:
    entry = Entry(EntryKey("agent", Address("198.18.0.1")), "s", 0, 1000, "r")
    events = [Event(EventKind.ADDED, 0, entry, "", v) for v in range(11, 21)]
    # Events numbered already (a convergence's) keep their versions.
    kept, floor = newest_numbered([(events, 10)], keep=3)
    assert [e.state_version for e in kept] == [18, 19, 20]
    assert floor == 17
    kept, floor = newest_numbered([(events, 10)], keep=10)
    assert (len(kept), floor) == (10, 0)
    assert newest_numbered([(events, 10)], keep=0) == ([], 20)


def test_a_group_numbers_only_the_events_its_history_keeps() -> None:
    entry = Entry(EntryKey("agent", Address("198.18.0.1")), "s", 0, 1000, "r")

    def evs(n: int) -> tuple[Event, ...]:
        return tuple(Event(EventKind.ADDED, 0, entry) for _ in range(n))

    raised = [(evs(3), 10), (evs(0), 13), (evs(4), 13)]  # versions 11-13, then 14-17
    newest, floor = newest_numbered(raised, keep=5)
    assert [e.state_version for e in newest] == [13, 14, 15, 16, 17]
    assert floor == 12
    newest, floor = newest_numbered(raised, keep=7)
    assert ([e.state_version for e in newest], floor) == (list(range(11, 18)), 0)
    assert newest_numbered(raised, keep=0) == ([], 17)


def test_entries_load_from_rows_as_from_records() -> None:
    rows = [
        ("agent", "198.18.0.1", "alice", 1, 2, "r-1", 0),
        ("agent", "2001:db8:1:2::/64", "", 3, 4, "local-r-2", 1),
    ]
    loaded = entries_from_rows(rows)
    assert loaded == {
        e.key: e for e in (from_stored(StoredEntry(*row[:6], local=bool(row[6]))) for row in rows)
    }
    assert [e.local for e in loaded.values()] == [False, True]


def test_entries_loaded_from_rows_share_one_object_per_repeated_value() -> None:
    def fresh(text: str) -> str:
        return "".join(list(text))  # equal, but a new object: as each row's value is

    big = 10**15  # beyond the small ints Python shares anyway
    rows = [
        (fresh("agent"), f"198.18.0.{i}", f"s{i}", big + 1, big + 2, fresh("r-sync"), 0)
        for i in range(1, 4)
    ]
    assert rows[0][0] is not rows[1][0]
    assert rows[0][3] is not rows[1][3]
    loaded = list(entries_from_rows(rows).values())
    first = loaded[0]
    for e in loaded[1:]:
        assert e.key.profile is first.key.profile
        assert e.request_id is first.request_id
        assert e.created_at_ms is first.created_at_ms
        assert e.expires_at_ms is first.expires_at_ms
    assert [e.subject for e in loaded] == ["s1", "s2", "s3"]


# --- intents left by a crash: rolled forward only as far as the kernel shows --------------


def test_settled_intents_change_the_state_with_one_event_and_version_each() -> None:
    bob = Entry(EntryKey("agent", Address("198.18.0.5")), "bob", NOW - 9_000, NOW + 60_000, "r-0")
    carol = Entry(EntryKey("agent", Address("198.18.0.6")), "carol", NOW, NOW + 60_000, "r-9")
    lost = Entry(EntryKey("agent", Address("198.18.0.7")), "dave", NOW, NOW + 60_000, "r-9")
    refreshed_alice = Entry(ALICE.key, "alice", ALICE.created_at_ms, NOW + 900_000, "r-9")
    view = StateView(entries={ALICE.key: ALICE, bob.key: bob}, state_version=7)
    intent = PendingIntent(
        "i-1",
        NOW - 5,
        (
            IntentChange("upsert", to_stored(carol)),  # the kernel has it: added
            IntentChange("upsert", to_stored(lost)),  # the kernel does not: never happened
            IntentChange("upsert", to_stored(refreshed_alice)),  # the kernel has it: refreshed
            IntentChange("remove", to_stored(bob)),  # gone from the kernel: removed
        ),
    )
    kernel = [_seen(carol), _seen(refreshed_alice)]
    plan = plan_convergence(
        view, {o.key: o for o in kernel}, checked=ALL_SETS, now_ms=NOW, intents=(intent,)
    )
    settled = [(e.kind, e.entry.key.address.text if e.entry else None) for e in plan.settled]
    assert settled == [
        (EventKind.ADDED, "198.18.0.6"),
        (EventKind.REFRESHED, "198.18.0.2"),
        (EventKind.REMOVED, "198.18.0.5"),
    ]
    assert [e.state_version for e in plan.result.events] == [8, 9, 10]
    assert plan.result.events == plan.settled
    assert plan.view.state_version == 10
    assert set(plan.view.entries) == {ALICE.key, carol.key}
    assert plan.view.entries[ALICE.key] == refreshed_alice
    assert [settled_audit(e).action for e in plan.settled] == ["added", "refreshed", "removed"]
    assert {settled_audit(e).caller for e in plan.settled} == {""}  # an intent names no caller


def test_an_intent_the_state_already_holds_settles_without_an_event() -> None:
    intent = PendingIntent("i-2", NOW - 5, (IntentChange("upsert", to_stored(ALICE)),))
    plan = plan_convergence(
        StateView(entries={ALICE.key: ALICE}, state_version=3),
        {ALICE.key: _seen(ALICE)},
        checked=ALL_SETS,
        now_ms=NOW,
        intents=(intent,),
    )
    assert plan.settled == ()
    assert plan.view.state_version == 3
