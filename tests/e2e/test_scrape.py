"""The real daemon's Prometheus metrics, scraped over HTTP inside its namespace, by value.

The metrics listener is 127.0.0.1:9617 inside the agent's namespace; the test reaches it through
a devlab relay, so what is read is exactly what a local Prometheus would scrape.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from e2ekit import metrics_relay, scrape, scrape_text, value
from netlab import Lab, wait_until

from agent.devlab import DevAgent, TcpRelay
from agent.rpc.client import AgentCallError, AgentClient, ClientIdentity, Entry
from agent.rpc.signing import private_key_from_pem


def stranger(agent: DevAgent, target: str, *, signing: bool, cert: bool) -> AgentClient:
    """A client whose signing key the agent does not trust, or whose certificate it does not
    allow (chained to the right CA, but not a configured identity)."""
    p = agent.pki
    ident = agent.identity()
    if signing:
        key = p.new_signing_key("stranger-signing")
        ident = ClientIdentity(
            ident.ca_cert,
            ident.client_cert,
            ident.client_key,
            private_key_from_pem(key.key.read_bytes()),
            key.keyid,
        )
    if cert:
        other = p.issue_client_cert(
            "stranger", common_name="stranger", uri_sans=("spiffe://example/stranger",)
        )
        ident = ClientIdentity(
            ident.ca_cert,
            other.cert.read_bytes(),
            other.key.read_bytes(),
            ident.signing_key,
            ident.keyid,
        )
    return AgentClient(target, agent.agent_id, ident, server_name="localhost")


def test_an_allow_moves_the_entries_gauge(lab: Lab, client: AgentClient, metrics: TcpRelay) -> None:
    entries = "vicifast_agent_entries"
    before = scrape(metrics)
    assert value(before, entries, family="ipv4", profile="agent") == 0

    client.allow([Entry(lab.addr.client(4), 600, "alice")])

    after = scrape(metrics)
    assert value(after, entries, family="ipv4", profile="agent") == 1
    assert value(after, entries, family="ipv6", profile="agent") == 0
    assert (
        value(after, "vicifast_agent_state_version")
        == value(before, "vicifast_agent_state_version") + 1
    )  # type: ignore[operator]
    assert value(after, "vicifast_agent_requests_total", rpc="Allow", code="OK") == 1
    assert value(after, "vicifast_agent_kernel_transaction_duration_seconds_count") > value(  # type: ignore[operator]
        before, "vicifast_agent_kernel_transaction_duration_seconds_count"
    )


def test_a_dropped_packet_moves_the_drop_counter(
    lab: Lab, agent: DevAgent, metrics: TcpRelay
) -> None:
    dropped = "vicifast_agent_dropped_packets_total"
    before = value(scrape(metrics), dropped, profile="agent")
    assert before is not None

    assert not lab.reaches("udp", 5060, family=4)

    after = scrape(metrics)
    assert value(after, dropped, profile="agent") == before + 1
    assert value(after, "vicifast_agent_dropped_bytes_total", profile="agent") > 0  # type: ignore[operator]


@dataclass(frozen=True)
class Refusal:
    untrusted_signing_key: bool
    unlisted_certificate: bool
    code: grpc.StatusCode
    reason: str


@pytest.mark.parametrize(
    "case",
    [
        Refusal(True, False, grpc.StatusCode.UNAUTHENTICATED, "unknown_key"),
        Refusal(False, True, grpc.StatusCode.PERMISSION_DENIED, "caller_not_allowed"),
    ],
    ids=["untrusted-signing-key", "caller-not-allowed"],
)
def test_a_refusal_is_counted_by_code_and_as_an_auth_failure_by_reason(
    lab: Lab, agent: DevAgent, relay: TcpRelay, metrics: TcpRelay, case: Refusal
) -> None:
    caller = stranger(
        agent,
        relay.address,
        signing=case.untrusted_signing_key,
        cert=case.unlisted_certificate,
    )
    try:
        with pytest.raises(AgentCallError) as refused:
            caller.allow([Entry(lab.addr.client(4), 600, "mallory")])
    finally:
        caller.close()
    assert (refused.value.code, refused.value.reason) == (case.code, case.reason)

    samples = scrape(metrics)

    assert value(samples, "vicifast_agent_requests_total", rpc="Allow", code=case.code.name) == 1
    assert value(samples, "vicifast_agent_auth_failures_total", reason=case.reason) == 1
    assert value(samples, "vicifast_agent_request_duration_seconds_count", rpc="Allow") == 1
    assert value(samples, "vicifast_agent_entries", family="ipv4", profile="agent") == 0


def test_promtool_finds_nothing_to_lint_in_a_real_scrape(
    promtool: str, lab: Lab, client: AgentClient, metrics: TcpRelay
) -> None:
    lab.reaches("udp", 5060, family=4)
    client.allow([Entry(lab.addr.client(4), 600, "alice")])
    client.state()
    text = scrape_text(metrics)
    assert "vicifast_agent_build_info{" in text

    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )

    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


def test_an_expired_entry_is_counted_and_leaves_the_entries_gauge(lab: Lab, tmp_path: Path) -> None:
    with DevAgent(tmp_path / "agent", lab.srv.name, extra_toml="[ttl]\nmin = 1\n") as dev:
        dev.start()
        api, metrics = dev.relay(), metrics_relay(dev)
        client = dev.client(api.address)
        try:
            client.allow([Entry(lab.addr.client(4), 1, "alice")])

            wait_until(
                lambda: value(scrape(metrics), "vicifast_agent_expiries_total") == 1,
                timeout=10,
                what="the expiry to be counted",
            )

            samples = scrape(metrics)
            assert value(samples, "vicifast_agent_entries", family="ipv4", profile="agent") == 0
        finally:
            client.close()
            metrics.close()
            api.close()
