"""The whole table is ours (issue 19, point 3), on the real kernel: whatever is changed inside
the agent's table by hand - a static source added, an allow element re-added with another
timeout or comment, a rogue set, chain, rule or object, a rule deleted, a chain's policy or a
set's flags changed - one convergence finds it, repairs it in one transaction, and the next
finds nothing; the allowed entry and the other owner's table stay as they were."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from tablekit import OTHER_TABLE, Rig

from agent.engine import Engine
from agent.errors import KernelError
from agent.model import AllowEntry
from agent.reconcile import FULL, STRUCTURE, Convergence, converge_task
from agent.rules.render import element_comment
from agent.rules.structure import expected_structure, interval_sets, read_structure
from agent.state import AllowCmd, RequestMeta
from agent.store import Store

ALLOWED = "198.18.7.1"
T = "inet vicifast"


def _allow(rig: Rig) -> AllowCmd:
    now = int(time.time() * 1000)
    meta = RequestMeta("req-tamper-1", "Allow", now, now + 60_000, b"\1" * 32, "cp")
    return AllowCmd(meta, (AllowEntry(rig.key(ALLOWED).address, "agent", 600, "alice"),))


def _handle_of_rule(rig: Rig, chain: str, index: int) -> int:
    listed = rig.lab.srv.nft_json("-a", "list", "chain", "inet", "vicifast", chain)
    rules = [i["rule"] for i in listed["nftables"] if "rule" in i]
    return int(rules[index]["handle"])


def _readd_allowed(timeout: str, comment: str) -> str:
    return (
        f"delete element {T} allow4_agent {{ {ALLOWED} }}\n"
        f'add element {T} allow4_agent {{ {ALLOWED} timeout {timeout} comment "{comment}" }}\n'
    )


_ALICE = element_comment("alice", "req-tamper-1")
# name: (nft script, or a function of the rig giving one; what the repair must name)
TAMPERS: dict[str, tuple[str | Callable[[Rig], str], str]] = {
    "static set element added": (
        f"add element {T} static4_agent {{ 0.0.0.0/0 }}",
        "elements of static4_agent",
    ),
    "static6 set element added": (
        f"add element {T} static6_agent {{ ::/0 }}",
        "elements of static6_agent",
    ),
    "allow element with another timeout": (_readd_allowed("1d", _ALICE), "corrected"),
    "allow element with another comment": (
        _readd_allowed("600s", "req=x sub=mallory"),
        "corrected",
    ),
    "rogue set": (f"add set {T} rogue {{ type ipv4_addr; }}", "rogue set rogue"),
    "rogue map": (f"add map {T} rogue_map {{ type ipv4_addr : verdict; }}", "rogue map rogue_map"),
    "rogue chain": (f"add chain {T} rogue", "rogue chain rogue"),
    "rogue base chain": (
        f"add chain {T} rogue_in {{ type filter hook input priority -20; policy drop; }}",
        "rogue chain rogue_in",
    ),
    "rogue rule in our chain": (f"insert rule {T} prof_agent accept", "rules of prof_agent"),
    "rogue rule jumping to a rogue chain": (
        f"add chain {T} rogue\nadd rule {T} rogue accept\ninsert rule {T} input jump rogue",
        "rogue chain rogue",
    ),
    "rule deleted": (
        lambda rig: f"delete rule {T} prof_agent handle {_handle_of_rule(rig, 'prof_agent', -1)}",
        "rules of prof_agent",
    ),
    "chain policy changed": (f"chain {T} input {{ policy drop; }}", "chain input"),
    "set flags changed": (
        f"flush chain {T} prof_agent\ndelete set {T} allow4_agent\n"
        f"add set {T} allow4_agent {{ type ipv4_addr; size 65536; }}",
        "set allow4_agent",
    ),
    "rogue counter": (f"add counter {T} rogue_counter", "rogue counter rogue_counter"),
    "rogue quota": (f"add quota {T} rogue_quota {{ 100 mbytes }}", "rogue quota rogue_quota"),
    # Every chain of a dormant table is off: nothing protected is dropped any more.
    "table made dormant": (f"add table {T} {{ flags dormant; }}", "table flags"),
}


def _converge(engine: Engine, store: Store, rig: Rig, scope: Any) -> Convergence:
    conv: Convergence = engine.run_task(converge_task(store, rig.table, engine.now_ms, scope))
    return conv


def _findings(rig: Rig) -> list[str]:
    cfg = rig.cfg.firewall
    live = rig.lab.srv.call(read_structure, rig.table.nft, cfg.table, interval_sets(cfg))
    return expected_structure(cfg).missing_from(live)


@pytest.mark.parametrize("name", list(TAMPERS))
def test_a_change_by_hand_anywhere_in_the_table_is_found_and_repaired(
    rig: Rig, make_engine: Callable[..., Engine], name: str
) -> None:
    rig.lab.srv.nft_script(OTHER_TABLE)
    # The writer thread is started inside the lab's namespace: its netlink dumps read there.
    engine = rig.lab.srv.call(make_engine)
    store = engine.store
    engine.submit(_allow(rig))
    other = rig.other_table()
    assert _findings(rig) == []
    script, named = TAMPERS[name]
    rig.lab.srv.nft_script(script if isinstance(script, str) else script(rig))
    assert _findings(rig) or named == "corrected"

    conv = _converge(engine, store, rig, FULL)

    assert conv.drift
    if named == "corrected":
        assert conv.corrected == 1
    else:
        assert any(f.startswith(named) for f in conv.structure_repaired), conv.structure_repaired
    assert _findings(rig) == []
    assert not _converge(engine, store, rig, FULL).drift  # nothing left to repair
    assert not _converge(engine, store, rig, STRUCTURE).drift
    listed = {
        e["elem"]["val"]: e["elem"]
        for i in rig.lab.srv.nft_json("list", "set", "inet", "vicifast", "allow4_agent")["nftables"]
        if "set" in i
        for e in i["set"].get("elem", ())
    }
    assert listed.keys() == {ALLOWED}
    assert listed[ALLOWED]["comment"] == _ALICE
    assert 590 <= listed[ALLOWED]["expires"] <= 600
    assert rig.other_table() == other


class _GarbledNft:
    """An nft whose listing is not JSON (as nft 1.0.6 prints a dormant table)."""

    def query(self, command: dict[str, Any], *, terse: bool = False) -> list[dict[str, Any]]:
        raise json.JSONDecodeError("Expecting value", '{"flags": ', 10)


def test_a_listing_that_is_not_json_fails_the_check_with_a_reason(rig: Rig) -> None:
    with pytest.raises(KernelError) as failed:
        rig.lab.srv.call(read_structure, cast(Any, _GarbledNft()), "vicifast")
    assert failed.value.reason == "unreadable_listing"
