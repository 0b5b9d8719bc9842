"""The kernel side of drift detection (``agent.rules.monitor``): the ruleset generation that lets
a clean restart skip listing the elements, and the notifications of the agent's own commits,
which must cost nothing, against a foreign commit, which must be reported."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from netlab import Lab, Netns

from agent.devlab import scratch_netns
from agent.rules.monitor import NftMonitor, Touch, generation, ruleset_fingerprint


def test_the_generation_moves_with_each_commit_and_only_then(lab: Lab) -> None:
    first = lab.srv.call(generation)
    assert lab.srv.call(generation) == first  # reading is no change
    lab.srv.nft("add", "table", "inet", "vf_gen_other")
    after_add = lab.srv.call(generation)
    assert after_add > first
    lab.srv.nft("list", "ruleset")
    assert lab.srv.call(generation) == after_add
    lab.srv.nft("delete", "table", "inet", "vf_gen_other")
    assert lab.srv.call(generation) > after_add


def test_the_fingerprint_names_generation_and_namespace(lab: Lab) -> None:
    first = lab.srv.call(ruleset_fingerprint)
    assert lab.srv.call(ruleset_fingerprint) == first
    lab.srv.nft("add", "table", "inet", "vf_gen_other")
    assert lab.srv.call(ruleset_fingerprint) != first
    with scratch_netns("vf-fp-a") as a, scratch_netns("vf-fp-b") as b:
        ns_a, ns_b = Netns(a), Netns(b)
        assert ns_a.call(generation) == ns_b.call(generation)  # both fresh
        assert ns_a.call(ruleset_fingerprint) != ns_b.call(ruleset_fingerprint)
    lab.srv.nft("delete", "table", "inet", "vf_gen_other")


def _own_commit(lab: Lab, nft: object, script: str) -> None:
    rc, _out, err = nft.cmd(script)  # type: ignore[attr-defined]
    assert rc == 0, err


def test_own_notifications_are_dropped_as_they_arrive_and_foreign_ones_reported(lab: Lab) -> None:
    me = threading.get_native_id()
    monitor = lab.srv.call(NftMonitor, "vf_mon", is_own=lambda tid: tid == me)
    nft = lab.srv.nftables()
    try:
        _own_commit(lab, nft, "add table inet vf_mon; add set inet vf_mon s { type ipv4_addr; }")
        assert monitor.wait(0.5) == Touch()  # own: the NEWGEN names this thread
        assert len(monitor._own_ports) == 1  # and its header our socket's port
        elements = ", ".join(f"198.18.1.{i}" for i in range(1, 201))
        _own_commit(lab, nft, f"add element inet vf_mon s {{ {elements} }}")
        assert monitor._drain() == Touch()
        assert monitor._summary.touch() == Touch()  # nothing of it was folded in
        lab.srv.nft("delete", "element", "inet", "vf_mon", "s", "{ 198.18.1.7 }")  # foreign
        assert monitor.wait(2.0) == Touch(sets=frozenset({"s"}))
    finally:
        monitor.close()
        lab.srv.nft("delete", "table", "inet", "vf_mon")


class _Refused(Exception):
    """The kernel refused a transaction inside ``not_listening`` (its return code)."""


def _quiet_commit(monitor: NftMonitor, nft: object, script: str, *, foreign: str = "") -> None:
    """``script`` committed by this thread inside ``not_listening``; ``foreign``, if given, is
    committed by another process first, inside the same window."""
    with monitor.not_listening():
        if foreign:
            subprocess.run(["nft", "-f", "-"], input=foreign, text=True, check=True)
        rc, _out, err = nft.cmd(script)  # type: ignore[attr-defined]
        assert rc == 0, err


@pytest.fixture
def watched(lab: Lab) -> Iterator[tuple[NftMonitor, Any]]:
    """A monitor of table ``vf_mon`` (with set ``s``, made by this thread, so heard as its own)
    and the libnftables context that made it; both gone afterwards."""
    me = threading.get_native_id()
    monitor = lab.srv.call(NftMonitor, "vf_mon", is_own=lambda tid: tid == me)
    nft = lab.srv.nftables()
    try:
        _own_commit(lab, nft, "add table inet vf_mon; add set inet vf_mon s { type ipv4_addr; }")
        assert monitor.wait(0.5) == Touch()
        yield monitor, nft
    finally:
        monitor.close()
        lab.srv.nft("delete", "table", "inet", "vf_mon")


def test_a_quiet_transaction_is_not_heard_and_reports_nothing(
    lab: Lab, watched: tuple[NftMonitor, Any]
) -> None:
    monitor, nft = watched
    elements = ", ".join(f"198.18.{i // 250}.{i % 250 + 1}" for i in range(5000))
    lab.srv.call(_quiet_commit, monitor, nft, f"add element inet vf_mon s {{ {elements} }}")
    assert len(lab.srv.nft("list", "set", "inet", "vf_mon", "s").split(",")) == 5000
    # Not one notification of the 5,000 elements was queued, and nothing is reported.
    with pytest.raises(BlockingIOError):
        monitor.sock.recv(65536, socket.MSG_DONTWAIT)
    assert monitor.wait(0.2) == Touch()
    # Listening again: a foreign change afterwards is heard as before.
    lab.srv.nft("delete", "element", "inet", "vf_mon", "s", "{ 198.18.0.7 }")
    assert monitor.wait(2.0) == Touch(sets=frozenset({"s"}))


def test_a_foreign_commit_while_not_listening_reports_lost(
    lab: Lab, watched: tuple[NftMonitor, Any]
) -> None:
    monitor, nft = watched
    lab.srv.call(
        _quiet_commit,
        monitor,
        nft,
        "add element inet vf_mon s { 198.18.0.1 }",
        foreign="add element inet vf_mon s { 198.18.0.2 }\n",
    )
    # Woken by the monitor itself, well before the timeout.
    assert monitor.wait(30.0) == Touch(lost=True)
    assert monitor.wait(0.2) == Touch()  # reported once


def test_what_was_queued_before_not_listening_is_still_reported(
    lab: Lab, watched: tuple[NftMonitor, Any]
) -> None:
    monitor, nft = watched
    lab.srv.nft("add", "element", "inet", "vf_mon", "s", "{ 198.18.0.9 }")  # unread
    lab.srv.call(_quiet_commit, monitor, nft, "add element inet vf_mon s { 198.18.0.1 }")
    assert monitor.wait(30.0) == Touch(sets=frozenset({"s"}))


def test_a_refused_quiet_transaction_expects_no_commit(
    lab: Lab, watched: tuple[NftMonitor, Any]
) -> None:
    monitor, nft = watched

    def refused() -> None:
        with monitor.not_listening():
            rc, _out, _err = nft.cmd("delete element inet vf_mon s { 198.18.0.77 }")
            raise _Refused(rc)  # ENOENT: nothing was committed

    with pytest.raises(_Refused) as refusal:
        lab.srv.call(refused)
    assert refusal.value.args[0] != 0
    assert monitor.wait(0.2) == Touch()
