"""Unauthenticated connections cannot exhaust the daemon (issue 19, point 1).

Connections to the API port are capped in total (``[api] max_connections``) and per source
(``max_connections_per_source``) by the accept gate (agent.rpc.gate): one over a cap is reset at
once and holds no descriptor. A connection that does not finish its TLS handshake within
``handshake_timeout_s`` is closed. Meanwhile authenticated callers are answered. The flood comes
from loopback addresses of the daemon's own namespace (127.0.0.0/8: each its own source).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
from conftest import AgentRig
from e2ekit import allow_entry
from netlab import Lab

from agent.devlab import DevAgent, closed_by_peer, open_connections

PORT = 7447
TOTAL = 120
PER_SOURCE = 20
HANDSHAKE_S = 2
# The first bytes of a TLS record carrying a ClientHello: a handshake begun and never finished.
PARTIAL_HELLO = bytes.fromhex("160301020001")


def _limits(dev: DevAgent) -> None:
    dev.write_config(
        dev.config_text().replace(
            "[api]\n",
            f"[api]\nmax_connections = {TOTAL}\nmax_connections_per_source = {PER_SOURCE}\n"
            f"handshake_timeout_s = {HANDSHAKE_S}\n",
        )
    )


@pytest.fixture(scope="module")
def rig(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    with AgentRig.running(
        module_lab,
        tmp_path_factory.mktemp("conns"),
        table="conns",
        api_listen=f"127.0.0.1:{PORT}",
        metrics_listen="127.0.0.1:9621",
        configure=_limits,
    ) as rig:
        yield rig


def _connect_from(netns: str, sources: list[str], each: int, hello: bool) -> list[socket.socket]:
    return open_connections(
        netns, ("127.0.0.1", PORT), sources, each, PARTIAL_HELLO if hello else b""
    )


def _open_count(socks: list[socket.socket]) -> int:
    return sum(not closed_by_peer(s) for s in socks)


def _until(predicate: object, timeout: float, what: str) -> float:
    assert callable(predicate)
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_one_source_holds_at_most_its_share_and_callers_are_answered(rig: AgentRig) -> None:
    base = _fds(rig.agent.pid)
    socks = _connect_from(rig.agent.netns, ["127.0.0.2"], 300, hello=False)
    try:
        _until(lambda: _open_count(socks) <= PER_SOURCE, 10, "per-source cap")
        # Each admitted connection costs three descriptors; the 280 refused ones none.
        assert _fds(rig.agent.pid) <= base + 3 * PER_SOURCE + 10
        # A caller from another source connects and is answered meanwhile.
        answer = rig.raw.allow(allow_entry("198.18.60.1"))
        assert answer.ok, answer
        # Nobody finishes a handshake: gRPC closes them after handshake_timeout_s.
        took = _until(lambda: _open_count(socks) == 0, 10 * HANDSHAKE_S, "handshake timeout")
        assert took <= HANDSHAKE_S + 3
    finally:
        for s in socks:
            s.close()


def test_many_sources_hit_the_total_cap_and_half_done_handshakes_time_out(rig: AgentRig) -> None:
    assert rig.raw.state().agent_id  # the caller's connection is made before the flood
    base = _fds(rig.agent.pid)
    sources = [f"127.0.1.{i}" for i in range(1, 11)]
    started = time.monotonic()
    socks = _connect_from(rig.agent.netns, sources, PER_SOURCE, hello=True)
    try:
        assert len(socks) == 200
        _until(lambda: _open_count(socks) <= TOTAL - 1, 10, "total cap")
        assert _fds(rig.agent.pid) <= base + 3 * TOTAL + 10
        # The connection made before the flood still carries calls.
        answer = rig.raw.allow(allow_entry("198.18.60.2"))
        assert answer.ok, answer
        _until(lambda: _open_count(socks) == 0, 10 * HANDSHAKE_S, "handshake timeout")
        assert time.monotonic() - started <= HANDSHAKE_S + 5
        # Slots are given back: a new connection is admitted and answered.
        rig.raw.close()
        rig.raw = type(rig.raw)(rig.agent, rig.relay.address)
        assert rig.raw.allow(allow_entry("198.18.60.3")).ok
    finally:
        for s in socks:
            s.close()
