"""The whole table is ours, through the real daemon (issue 19, point 3): a tamper matrix.

Each case changes something inside the agent's table by hand, the way a careless sysadmin or a
hostile process would, and then waits for the daemon (one per module, woken by the kernel's
notifications) to put it back: within 1 s the table compares equal to what the agent makes
again, the repair is counted in GetState's ``drift_repairs``, the allowed entry is still there
as the agent wrote it, and ``ruleset_in_sync`` is true again.
"""

from __future__ import annotations

import time

import pytest
from e2ekit import AgentRig, allow_entry
from netlab import Netns

from agent.config import parse_config
from agent.rules.nft import NftAdapter
from agent.rules.render import element_comment
from agent.rules.structure import expected_structure, interval_sets, read_structure

REPAIR_WITHIN_S = 1.0
ALLOWED = "198.18.30.1"
T = "inet vicifast"


@pytest.fixture(scope="module")
def rig(shared: AgentRig) -> AgentRig:
    assert shared.raw.allow(allow_entry(ALLOWED, 600, "alice")).ok
    return shared


def _readd(rig: AgentRig, timeout: str, comment: str) -> str:
    return (
        f"delete element {T} allow4_agent {{ {ALLOWED} }}\n"
        f'add element {T} allow4_agent {{ {ALLOWED} timeout {timeout} comment "{comment}" }}\n'
    )


def _rule_handle(ns: Netns, chain: str) -> int:
    listed = ns.nft_json("-a", "list", "chain", "inet", "vicifast", chain)
    return int([i["rule"] for i in listed["nftables"] if "rule" in i][-1]["handle"])


TAMPERS = {
    "static set element added": lambda rig: f"add element {T} static4_agent {{ 0.0.0.0/0 }}",
    "allow element with another timeout": lambda rig: _readd(rig, "1d", _comment(rig)),
    "allow element with another comment": lambda rig: _readd(rig, "600s", "req=x sub=mallory"),
    # Kernels from about 6.12 on take a re-add's timeout in place (and notify it).
    "allow element's timeout changed in place": lambda rig: (
        f"add element {T} allow4_agent {{ {ALLOWED} timeout 1d }}"
    ),
    "rogue set": lambda rig: f"add set {T} rogue {{ type ipv4_addr; }}",
    "rogue chain": lambda rig: f"add chain {T} rogue",
    "rogue base chain": lambda rig: (
        f"add chain {T} rogue_in {{ type filter hook input priority -20; policy drop; }}"
    ),
    "rogue rule in our chain": lambda rig: f"insert rule {T} prof_agent accept",
    "rule deleted": lambda rig: (
        f"delete rule {T} prof_agent handle {_rule_handle(rig.lab.srv, 'prof_agent')}"
    ),
    "chain policy changed": lambda rig: f"chain {T} input {{ policy drop; }}",
    "set flags changed": lambda rig: (
        f"flush chain {T} prof_agent\ndelete set {T} allow4_agent\n"
        f"add set {T} allow4_agent {{ type ipv4_addr; size 65536; }}"
    ),
    "rogue counter": lambda rig: f"add counter {T} rogue_counter",
    "rogue map": lambda rig: f"add map {T} rogue_map {{ type ipv4_addr : verdict; }}",
    "table made dormant": lambda rig: f"add table {T} {{ flags dormant; }}",
}


def _comment(rig: AgentRig) -> str:
    entry = next(e for e in rig.raw.state().entries if e.address == ALLOWED)
    return element_comment(entry.subject, entry.request_id)


def _differences(rig: AgentRig) -> list[str]:
    cfg = parse_config(rig.agent.config_path.read_text()).firewall
    live = rig.lab.srv.call(lambda: read_structure(NftAdapter(), cfg.table, interval_sets(cfg)))
    found = expected_structure(cfg).missing_from(live)
    listed = rig.lab.srv.nft_json("list", "set", "inet", "vicifast", "allow4_agent")
    elements = [
        e["elem"] for i in listed["nftables"] if "set" in i for e in i["set"].get("elem", ())
    ]
    if [(e["val"], e["comment"]) for e in elements] != [(ALLOWED, _comment(rig))]:
        found.append(f"allow4_agent holds {elements}")
    elif abs(elements[0]["expires"] - _remaining_s(rig)) > 5:
        found.append(f"allow4_agent's element expires in {elements[0]['expires']} s")
    return found


def _remaining_s(rig: AgentRig) -> float:
    state = rig.raw.state()
    entry = next(e for e in state.entries if e.address == ALLOWED)
    return (entry.expires_at_unix_ms - state.now_unix_ms) / 1000


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_change_by_hand_inside_the_table_is_undone_within_a_second_and_counted(
    rig: AgentRig, tamper: str
) -> None:
    assert _differences(rig) == []
    before = rig.raw.state().drift_repairs
    script = TAMPERS[tamper](rig)
    rig.lab.srv.nft_script(script)
    done = time.monotonic()
    deadline = done + REPAIR_WITHIN_S
    while True:
        repaired = rig.raw.state().drift_repairs > before and not _differences(rig)
        if repaired or time.monotonic() > deadline:
            break
    took = time.monotonic() - done
    assert repaired, f"after {took:.2f} s: {_differences(rig)}"
    state = rig.raw.state()
    assert state.ruleset_in_sync
    assert state.drift_repairs >= before + 1
