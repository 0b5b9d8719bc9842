"""The kernel side of drift detection (``agent.rules.monitor``): the ruleset generation that lets
a clean restart skip listing the elements, and the notifications of the agent's own commits,
which must cost nothing, against a foreign commit, which must be reported."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
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


def _own_commit(nft: Any, script: str) -> None:
    rc, _out, err = nft.cmd(script)
    assert rc == 0, err


def heard_until(monitor: NftMonitor, marker: str, timeout: float = 10.0) -> Touch:
    """Everything ``monitor`` reports until a report names set ``marker``.

    The marker is a foreign commit made after the commits under test: the kernel sends
    notifications in commit order, so once the marker is heard, whatever the earlier commits
    made the monitor report is in the result too. No absence is concluded from a quiet wait.
    """
    heard = Touch()
    deadline = time.monotonic() + timeout
    while marker not in heard.sets:
        left = deadline - time.monotonic()
        assert left > 0, f"the marker commit on set {marker} was never reported: {heard}"
        heard = heard.merge(monitor.wait(left))
    return heard


def _mark(lab: Lab, address: str = "198.18.9.1") -> None:
    """A foreign commit (another process): one element added to set ``marker``."""
    lab.srv.nft("add", "element", "inet", "vf_mon", "marker", f"{{ {address} }}")


_TABLE = (
    "add table inet vf_mon; add set inet vf_mon s { type ipv4_addr; }; "
    "add set inet vf_mon marker { type ipv4_addr; }"
)


def test_own_commits_are_not_reported_and_foreign_ones_are(lab: Lab) -> None:
    monitor = lab.srv.call(NftMonitor, "vf_mon")
    nft = lab.srv.nftables()
    try:
        _own_commit(nft, _TABLE)
        elements = ", ".join(f"198.18.1.{i}" for i in range(1, 201))
        _own_commit(nft, f"add element inet vf_mon s {{ {elements} }}")
        _mark(lab)
        # Neither the new table and sets nor the 200 elements of this process are reported.
        assert heard_until(monitor, "marker") == Touch(sets=frozenset({"marker"}))
        lab.srv.nft("delete", "element", "inet", "vf_mon", "s", "{ 198.18.1.7 }")  # foreign
        assert monitor.wait(10.0) == Touch(sets=frozenset({"s"}))
    finally:
        monitor.close()
        lab.srv.nft("delete", "table", "inet", "vf_mon")


# Run as PID 1 of a fresh PID namespace (``unshare --pid --fork --mount-proc``) inside the lab's
# network namespace, like a daemon in a container: the kernel names the committing thread by
# its host-wide id there. Prints what the monitor heard of its own commits, as a Touch's repr.
_IN_PID_NAMESPACE = f"""
import os, subprocess, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
import nftables
from agent.rules.monitor import NftMonitor, Touch
assert os.getpid() == 1
monitor = NftMonitor("vf_mon")
nft = nftables.Nftables()
for script in ({_TABLE!r}, "add element inet vf_mon s {{ 198.18.2.1, 198.18.2.2 }}"):
    rc, _out, err = nft.cmd(script)
    assert rc == 0, err
subprocess.run(["nft", "add element inet vf_mon marker {{ 198.18.9.1 }}"], check=True)
heard, deadline = Touch(), time.monotonic() + 10
while "marker" not in heard.sets and time.monotonic() < deadline:
    heard = heard.merge(monitor.wait(deadline - time.monotonic()))
print(repr(heard))
"""


def test_own_commits_are_recognised_inside_a_pid_namespace(lab: Lab) -> None:
    try:
        done = lab.srv.run(
            "unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _IN_PID_NAMESPACE
        )
        # Only the other process's commit; the process's own table, sets and elements not.
        assert done.stdout.strip() == repr(Touch(sets=frozenset({"marker"})))
    finally:
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
    """A monitor of table ``vf_mon`` (with sets ``s`` and ``marker``, made by this process, so
    not reported) and the libnftables context that made it; both gone afterwards."""
    monitor = lab.srv.call(NftMonitor, "vf_mon")
    nft = lab.srv.nftables()
    try:
        _own_commit(nft, _TABLE)
        _mark(lab, "198.18.9.250")
        assert heard_until(monitor, "marker") == Touch(sets=frozenset({"marker"}))
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
    _mark(lab)
    assert heard_until(monitor, "marker") == Touch(sets=frozenset({"marker"}))  # reported once


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
    _mark(lab)
    assert heard_until(monitor, "marker") == Touch(sets=frozenset({"marker"}))
