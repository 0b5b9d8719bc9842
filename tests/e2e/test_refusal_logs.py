"""What refusals leave in the journal (issue 21, points 2 and 3).

A refused control-plane request is one WARNING with its reason word, the caller's identity and
the request id, never an address or a subject; a flood of them writes a burst of lines and then
a few a minute, the next line saying how many were not written. A TLS handshake gRPC refuses or
that times out is logged by the daemon in its own structured form (rate-limited) and counted in
``vicifast_agent_api_handshake_failures_total``; gRPC core's own lines stay out, with the
environment the unit gives the daemon.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AgentRig
from e2ekit import C, allow_entry, metrics_relay, scrape, signed, value
from netlab import Lab

from agent.devlab import API_PORT, closed_by_peer, open_connections
from agent.devpki import CONTROL_PLANE_URI
from agent.rpc.pb import agent_pb2

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vicifast-agent.service"
HANDSHAKE_S = 2
BURST = 10  # agent.rpc.service.REFUSAL_LOG_BURST
PARTIAL_HELLO = bytes.fromhex("160301020001")


def unit_environment() -> dict[str, str]:
    """The Environment= assignments of the shipped unit, as systemd hands them over."""
    env: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for assignment in line.removeprefix("Environment=").split():
                name, _, val = assignment.partition("=")
                env[name] = val
    return env


@pytest.fixture(scope="module")
def rig(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    env = unit_environment()
    assert env.get("GRPC_VERBOSITY") == "ERROR"
    with pytest.MonkeyPatch.context() as mp:
        for name, val in env.items():
            mp.setenv(name, val)
        with AgentRig.running(
            module_lab,
            tmp_path_factory.mktemp("refusals"),
            table="refusals",
            configure=lambda dev: dev.write_config(
                dev.config_text().replace(
                    "[api]\n", f"[api]\nhandshake_timeout_s = {HANDSHAKE_S}\n"
                )
            ),
        ) as rig:
            yield rig


def _log(rig: AgentRig) -> str:
    return rig.agent.log_path.read_text(errors="replace")


def _lines(rig: AgentRig, pattern: str) -> list[str]:
    return [line for line in _log(rig).splitlines() if re.search(pattern, line)]


def _until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def _bad_signature(rig: AgentRig) -> agent_pb2.SignedEnvelope:
    msg = agent_pb2.AllowRequest(header=rig.raw.header(), entries=[allow_entry("198.18.70.1")])
    env = signed(msg, rig.raw.signer)
    env.signatures[0].sig = bytes(64)
    return env


def test_a_refusal_is_one_warning_with_reason_caller_and_request_id(rig: AgentRig) -> None:
    answer = rig.raw.allow(
        allow_entry("198.18.70.2", subject="alice@example.com", profile="nosuchprofile"),
        request_id="refusal-0001",
    )
    assert (answer.code, answer.reason) == (C.INVALID_ARGUMENT, "unknown_profile")
    _until(lambda: _lines(rig, "refusal-0001"), 10, "the refusal's log line")
    [line] = _lines(rig, "refusal-0001")
    assert " WARNING " in line
    assert "refused Allow: unknown_profile" in line
    assert f"caller {CONTROL_PLANE_URI}," in line
    assert "REASON='unknown_profile'" in line
    assert "REQUEST_ID='refusal-0001'" in line
    log = _log(rig)
    assert "198.18.70.2" not in log
    assert "alice" not in log


def test_a_flood_of_refusals_writes_a_burst_then_says_how_many_were_held(rig: AgentRig) -> None:
    before = len(_lines(rig, "refused Allow: bad_signature"))
    for _ in range(3 * BURST):
        answer = rig.raw.send("Allow", _bad_signature(rig))
        assert answer.reason == "bad_signature"
    written = len(_lines(rig, "refused Allow: bad_signature")) - before
    # The burst, less what the test before used, plus a token or two back during the flood.
    assert BURST - 2 <= written <= BURST + 2
    # The bucket refills (30 a minute): the next line written counts those held back.
    _until(
        lambda: (
            rig.raw.send("Allow", _bad_signature(rig)).reason == "bad_signature"
            and bool(_lines(rig, r"bad_signature .*\(\d+ more like it not logged\)"))
        ),
        15,
        "a line saying how many were not logged",
    )
    assert "request -" in _lines(rig, "refused Allow: bad_signature")[0]


def test_handshake_failures_are_logged_by_the_daemon_and_counted(rig: AgentRig) -> None:
    target = ("127.0.0.1", API_PORT)
    plain = open_connections(rig.agent.netns, target, ["127.0.2.1"], 30, b"GET / HTTP/1.1\r\n\r\n")
    stalled = open_connections(rig.agent.netns, target, ["127.0.2.2"], 2, PARTIAL_HELLO)
    try:
        _until(lambda: all(closed_by_peer(s) for s in plain + stalled), 10, "closed by gRPC")
    finally:
        for s in plain + stalled:
            s.close()
    relay = metrics_relay(rig.agent)
    try:

        def counted() -> bool:
            samples = scrape(relay)
            failed = value(
                samples, "vicifast_agent_api_handshake_failures_total", reason="handshake_failed"
            )
            timed = value(
                samples, "vicifast_agent_api_handshake_failures_total", reason="handshake_timeout"
            )
            return (failed or 0) >= 30 and (timed or 0) >= 2

        _until(counted, 10, "handshake failures counted")
    finally:
        relay.close()
    refused = _lines(rig, r"api: TLS handshake refused .*REASON='handshake_failed'")
    assert 1 <= len(refused) <= BURST + 2  # 30 failures, rate-limited lines
    assert _lines(rig, r"api: TLS handshake timed out .*REASON='handshake_timeout'")
    # gRPC core's own lines ("I1207 ... ssl_transport_security.cc ... Handshake failed") stay out.
    assert not _lines(rig, r"Handshake failed|ssl_transport_security")
