"""Drift: whatever someone does to the agent's table by hand, it is back within 1 s, reported.

Each case changes the table the way a sysadmin or a package would and measures the time from the
action to the repair. An action that loses the entry's element is seen on the daemon's event
stream (one DRIFT_REPAIRED per entry restored, moving state_version by one); one that loses only
structure (a flushed chain) changes no entry, so it raises no event and moves no state_version:
the test polls GetState().drift_repairs against a deadline. Either way the kernel then holds the
table and the entry again, packets pass again, and GetState counts one repair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from lifecycle_kit import KIND, Watcher, allow_set_addresses, poll_until
from netlab import Lab, Netns

from agent.devlab import DevAgent, TcpRelay
from agent.rpc.client import AgentClient, Entry

REPAIR_WITHIN_S = 1.0

# Debian 12's /etc/nftables.conf: what `systemctl reload nftables` loads after `flush ruleset`.
DEBIAN_NFTABLES_CONF = """flush ruleset
table inet filter {
    chain input { type filter hook input priority filter; }
    chain forward { type filter hook forward priority filter; }
    chain output { type filter hook output priority filter; }
}
"""


def _flush_ruleset(ns: Netns, table: str) -> None:
    ns.nft("flush", "ruleset")


def _reload_nftables(ns: Netns, table: str) -> None:
    ns.nft_script(DEBIAN_NFTABLES_CONF)


def _delete_table(ns: Netns, table: str) -> None:
    ns.nft("delete", "table", "inet", table)


def _delete_set(ns: Netns, table: str) -> None:
    # A set in use cannot be deleted: its rules go first, in the same transaction.
    ns.nft_script(f"flush chain inet {table} prof_agent\ndelete set inet {table} allow4_agent\n")


def _flush_chain(ns: Netns, table: str) -> None:
    ns.nft("flush", "chain", "inet", table, "input")


def _delete_element(ns: Netns, table: str) -> None:
    ns.nft("delete", "element", "inet", table, "allow4_agent", "{ 198.18.0.2 }")


# action -> (what it does, whether it takes the entry's element with it)
DRIFTS: dict[str, tuple[Callable[[Netns, str], None], bool]] = {
    "nft flush ruleset": (_flush_ruleset, True),
    "systemctl reload nftables": (_reload_nftables, True),
    "nft delete table": (_delete_table, True),
    "delete a set": (_delete_set, True),
    "flush a chain (rules deleted)": (_flush_chain, False),
    "delete one element": (_delete_element, True),
}


@pytest.fixture
def watcher(agent: DevAgent, relay: TcpRelay, client: AgentClient) -> Iterator[Watcher]:
    w = Watcher(agent, relay, client.state().state_version)
    yield w
    w.close()


@pytest.mark.parametrize("action", list(DRIFTS), ids=list(DRIFTS))
def test_drift_is_repaired_within_one_second_with_event_and_counter(
    lab: Lab, agent: DevAgent, relay: TcpRelay, client: AgentClient, action: str
) -> None:
    src = lab.addr.client4
    client.allow([Entry(src, 600, "alice")])
    assert lab.reaches("udp", 5060, family=4)
    before = client.state()
    drift, loses_entry = DRIFTS[action]

    def counted() -> bool:
        return client.state().drift_repairs > before.drift_repairs

    watcher = Watcher(agent, relay, before.state_version)
    try:
        started = time.monotonic()
        drift(lab.srv, agent.table)
        if loses_entry:
            at, restored = watcher.wait_for(
                lambda e: e.kind == KIND.DRIFT_REPAIRED and e.entry.address == src, timeout=5.0
            )
            assert restored.entry.subject == "alice"
            assert restored.state_version == before.state_version + 1
            poll_until(counted, timeout=5.0)  # counted just after the event is published
        else:
            at = poll_until(counted, timeout=5.0)
        assert at - started <= REPAIR_WITHIN_S, f"repaired after {at - started:.3f} s"
    finally:
        watcher.close()
    assert src in allow_set_addresses(lab.srv, agent.table, "allow4_agent")
    assert lab.reaches("udp", 5060, family=4)
    assert not lab.reaches("udp", 5060, family=4, src=lab.addr.client4_alt)
    after = client.state()
    assert after.drift_repairs == before.drift_repairs + 1
    # One version per entry that changed: none when only the structure was lost.
    assert after.state_version == before.state_version + (1 if loses_entry else 0)
    assert all(e.HasField("entry") for _, e in watcher.events)
    assert after.ruleset_in_sync
    assert after.last_verified_at_unix_ms >= before.last_verified_at_unix_ms
    assert [e.address for e in after.entries] == [src]


def test_a_fresh_daemon_has_no_history_and_its_first_allow_is_version_one(
    lab: Lab, agent: DevAgent, relay: TcpRelay, client: AgentClient
) -> None:
    # Installing the table on a fresh host is structure, not an entry change.
    state = client.state()
    assert (state.state_version, state.drift_repairs) == (0, 0)
    assert client.allow([Entry(lab.addr.client4, 600, "alice")]).state_version == 1
    watcher = Watcher(agent, relay, 0)
    try:
        _, first = watcher.wait_for(lambda e: True, timeout=5.0)
    finally:
        watcher.close()
    assert (first.kind, first.state_version, first.entry.address) == (
        KIND.ADDED,
        1,
        lab.addr.client4,
    )


def test_an_element_added_by_hand_is_removed(
    lab: Lab, agent: DevAgent, client: AgentClient, watcher: Watcher
) -> None:
    intruder = lab.addr.client4_alt
    lab.srv.nft(
        "add", "element", "inet", agent.table, "allow4_agent", f"{{ {intruder} timeout 1h }}"
    )
    _, ev = watcher.wait_for(lambda e: e.kind == KIND.DRIFT_REPAIRED, timeout=5.0)
    assert ev.entry.address == intruder
    assert intruder not in allow_set_addresses(lab.srv, agent.table, "allow4_agent")
    assert client.state().entries == []


def test_changes_to_other_tables_are_left_alone_and_shadowing_is_reported(
    lab: Lab, agent: DevAgent, client: AgentClient
) -> None:
    assert agent.notify is not None
    lab.srv.nft_script(
        "table ip filter {\n"
        "  chain INPUT { type filter hook input priority 0; policy drop;\n"
        "    iif lo accept\n    tcp dport 22 accept\n  }\n}\n"
    )
    status = agent.notify.wait_for("STATUS", timeout=5.0)
    while "another table" not in status["STATUS"]:
        status = agent.notify.wait_for("STATUS", timeout=5.0)
    assert "policy drop" in lab.srv.nft("list", "table", "ip", "filter")
    assert client.state().drift_repairs == 0
    lab.srv.nft("delete", "table", "ip", "filter")
    status = agent.notify.wait_for("STATUS", timeout=5.0)
    while "another table" in status["STATUS"]:
        status = agent.notify.wait_for("STATUS", timeout=5.0)
