"""The privacy policy's log promise, end to end: no log line names an address or a subject.

One daemon is driven down every path that logs - signed gRPC requests (Allow, refresh, Revoke
by address and by subject, Sync, Erase), refused requests, the local socket through the real CLI
(allow, revoke, list, why, audit, refusals), expiry, drift repair and a restart's reconcile -
each naming one person's subject and addresses. Then the daemon's log is read whole: the messages
and the structured fields (stderr carries every field the journal would get, ``REQUEST_ID=``,
``SUBJECT=`` and all), and neither the subject nor any of the addresses may appear.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2ekit import AgentRig, allow_entry
from netlab import Lab, wait_until

from agent.devlab import REPO_ROOT

SUBJECT = "privacy-carol-4471"
V4 = ("198.18.44.1", "198.18.44.2", "198.18.44.3", "198.18.44.4", "198.18.44.5")
V6 = "2001:db8:44:1::7"
V6_KEY = "2001:db8:44:1:"  # the /64 the entry stands for, in any spelling of the tail
SHORT_TTL_S = 2


@pytest.fixture(scope="module")
def rig(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    with AgentRig.running(
        module_lab, tmp_path_factory.mktemp("privacy"), extra_toml="[ttl]\nmin = 1\n"
    ) as started:
        yield started


def cli(rig: AgentRig, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", rig.agent.netns, sys.executable, "-m", "agent", *args]
    argv += ["--socket", str(rig.agent.local_socket), "--config", str(rig.agent.config_path)]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
    )


def _grpc_paths(rig: AgentRig) -> None:
    raw = rig.raw
    assert raw.allow(allow_entry(V4[0], 600, SUBJECT), allow_entry(V6, 600, SUBJECT)).ok
    assert raw.allow(allow_entry(V4[0], 900, SUBJECT)).ok  # refresh
    assert raw.revoke([V4[0]]).ok
    assert raw.sync(allow_entry(V4[1], 600, SUBJECT)).ok
    assert raw.revoke([], subject=SUBJECT).ok
    # refused: a duplicate, a bad subject next to the person's, a non-global address
    assert not raw.allow(allow_entry(V4[2], 600, SUBJECT), allow_entry(V4[2])).ok
    assert not raw.allow(allow_entry(V4[2], 600, SUBJECT + "\n")).ok
    assert not raw.allow(allow_entry(V4[2], 600, SUBJECT), allow_entry("10.44.0.1")).ok
    assert raw.allow(allow_entry(V4[2], 600, SUBJECT)).ok
    assert raw.erase(SUBJECT).ok


def _local_paths(rig: AgentRig) -> None:
    done = cli(rig, "allow", V4[3], V6, "--subject", SUBJECT, "--ttl", "600")
    assert done.returncode == 0, done.stderr
    for args in (
        ("list",),
        ("list", "--subject", SUBJECT),
        ("why", V4[3], "5060/udp"),
        ("audit", "--subject", SUBJECT),
        ("audit", "--address", V4[3]),
        ("revoke", V4[3]),
        ("revoke", "--subject", SUBJECT),
        ("status",),
    ):
        done = cli(rig, *args)
        assert done.returncode in (0, 1), (args, done.stderr)
    # refused by the daemon: a prefix with host bits, a subject with a control character
    assert cli(rig, "allow", f"{V4[3]}/24", "--subject", SUBJECT).returncode != 0
    assert cli(rig, "allow", V4[3], "--subject", SUBJECT + "\t").returncode != 0


def _expiry(rig: AgentRig) -> None:
    assert rig.raw.allow(allow_entry(V4[4], SHORT_TTL_S, SUBJECT)).ok
    wait_until(
        lambda: all(e.address != V4[4] for e in rig.raw.state().entries),
        timeout=SHORT_TTL_S + 10,
        what="the short entry to expire",
    )


def _drift(rig: AgentRig) -> None:
    assert rig.raw.allow(allow_entry(V4[0], 600, SUBJECT)).ok
    before = rig.raw.state().drift_repairs
    rig.lab.srv.nft("delete", "element", "inet", rig.agent.table, "allow4_agent", f"{{ {V4[0]} }}")
    wait_until(lambda: rig.raw.state().drift_repairs > before, timeout=10, what="the drift repair")
    # An element nobody granted, added behind the agent's back, is removed again.
    table = rig.agent.table
    rig.lab.srv.nft("add", "element", "inet", table, "allow4_agent", f"{{ {V4[1]} }}")
    wait_until(
        lambda: V4[1] not in rig.lab.srv.nft("list", "set", "inet", table, "allow4_agent"),
        timeout=20,
        what="the unknown element to be removed",
    )


def test_no_log_line_or_journal_field_names_an_address_or_a_subject(rig: AgentRig) -> None:
    _grpc_paths(rig)
    _local_paths(rig)
    _expiry(rig)
    _drift(rig)
    rig.restart()  # start-up reconcile, with an entry to adopt
    assert rig.raw.erase(SUBJECT).ok

    log = Path(rig.agent.log_path).read_text(errors="replace")
    # Every path did log, with its structured fields (what journald gets as REQUEST_ID= ...).
    for expected in ("Allow ", "Revoke ", "Sync ", "Erase ", "local grant", "local revoke"):
        assert expected in log, f"no {expected!r} line in the log"
    assert "REQUEST_ID='local-" in log
    assert "drift" in log
    named = [name for name in (SUBJECT, *V4, V6, V6_KEY) if name in log]
    assert not named, f"the daemon's log names {named}:\n{_lines_naming(log, named)}"
    for field in ("SUBJECT=", "ADDRESS="):
        assert field not in log, f"a log record carries the journal field {field}"


def _lines_naming(log: str, names: list[str]) -> str:
    return "\n".join(line for line in log.splitlines() if any(n in line for n in names))
