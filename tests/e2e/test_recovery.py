"""Recovery from a damaged state database never resurrects (issue 19, point 6), with the real
daemon: the request log is lost with the database, so requests issued before the recovery are
refused (``issued_before_recovery``), and ``state_version`` continues above every version the
lost database held (the ceiling kept beside it), so watchers never see it go backwards."""

from __future__ import annotations

from e2ekit import C, RawCaller, allow_entry, signed
from lifecycle_kit import allow_set_addresses
from netlab import Lab

from agent.devlab import DevAgent, TcpRelay
from agent.rpc.pb import agent_pb2

GRANTED = "198.18.20.1"


def _corrupt(agent: DevAgent) -> None:
    with (agent.state_dir / "state.db").open("r+b") as f:
        f.write(b"this is not a database" * 200)


def test_a_captured_allow_replayed_after_a_recovery_is_refused_and_versions_go_on(
    lab: Lab, agent: DevAgent, relay: TcpRelay
) -> None:
    raw = RawCaller(agent, relay.address)
    try:
        captured = signed(
            agent_pb2.AllowRequest(
                header=raw.header(valid_ms=240_000), entries=[allow_entry(GRANTED, 600, "alice")]
            ),
            raw.signer,
        )
        raw.send("Allow", captured).applied()
        assert raw.revoke([GRANTED]).ok
        before = raw.state().state_version
    finally:
        raw.close()
    agent.stop()
    _corrupt(agent)
    agent.start()
    raw = RawCaller(agent, relay.address)
    try:
        state = raw.state()
        assert state.state_version > before  # not back near 1
        replay = raw.send("Allow", captured)
        assert (replay.code, replay.reason) == (C.UNAUTHENTICATED, "issued_before_recovery")
        assert GRANTED not in allow_set_addresses(lab.srv, "vicifast", "allow4_agent")
        assert raw.state().state_version == state.state_version  # the refusal changed nothing
        # A request signed after the recovery is applied as usual, above the old versions.
        fresh = raw.allow(allow_entry("198.18.20.2", 600, "bob")).applied()
        assert fresh.state_version > state.state_version
    finally:
        raw.close()
    # Once more: a second recovery continues above the first one's versions as well.
    after_first = fresh.state_version
    agent.stop()
    _corrupt(agent)
    agent.start()
    raw = RawCaller(agent, relay.address)
    try:
        assert raw.state().state_version > after_first
    finally:
        raw.close()
