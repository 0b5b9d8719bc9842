"""Who may talk to the daemon at all: mutual TLS against its client CA, then its caller list.

A caller without a client certificate, with one from another CA, an expired one, or over
plaintext never completes a call (``UNAVAILABLE`` on the client: the handshake failed); a caller
with a valid chain but an unlisted identity gets ``PERMISSION_DENIED caller_not_allowed`` on
every RPC, health included. Each carries a validly signed Allow, and nothing is applied.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AgentRig
from e2ekit import C, RawCaller, allow_entry, signed
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.devpki import make_dev_pki
from agent.rpc.pb import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def rig(shared: AgentRig) -> AgentRig:
    return shared


def _allow_envelope(rig: AgentRig, address: str) -> agent_pb2.SignedEnvelope:
    msg = agent_pb2.AllowRequest(header=rig.raw.header(), entries=[allow_entry(address)])
    return signed(msg, rig.raw.signer)


def _no_cert(rig: AgentRig, tmp: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=rig.agent.pki.ca_cert.read_bytes())
    return grpc.secure_channel(
        rig.relay.address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def _channel_with(rig: AgentRig, cert: Path, key: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=rig.agent.pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return grpc.secure_channel(
        rig.relay.address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def _other_ca(rig: AgentRig, tmp: Path) -> grpc.Channel:
    other = make_dev_pki(tmp / "other-ca", rig.agent.agent_id)
    return _channel_with(rig, other.client.cert, other.client.key)


def _expired(rig: AgentRig, tmp: Path) -> grpc.Channel:
    now = dt.datetime.now(dt.UTC)
    old = rig.agent.pki.issue_client_cert(
        f"expired-{tmp.name}",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    return _channel_with(rig, old.cert, old.key)


def _plaintext(rig: AgentRig, tmp: Path) -> grpc.Channel:
    return grpc.insecure_channel(rig.relay.address)


HANDSHAKE_FAILURES: dict[str, Callable[[AgentRig, Path], grpc.Channel]] = {
    "no client certificate": _no_cert,
    "client certificate from another CA": _other_ca,
    "expired client certificate from the right CA": _expired,
    "plaintext": _plaintext,
}


@pytest.mark.parametrize("how", list(HANDSHAKE_FAILURES))
def test_caller_without_an_acceptable_certificate_never_reaches_a_handler(
    rig: AgentRig, tmp_path: Path, how: str
) -> None:
    before = rig.observe()
    channel = HANDSHAKE_FAILURES[how](rig, tmp_path)
    try:
        stub = agent_pb2_grpc.FirewallAgentStub(channel)
        with pytest.raises(grpc.RpcError) as allow:
            stub.Allow(_allow_envelope(rig, "198.18.4.1"), timeout=10)
        with pytest.raises(grpc.RpcError) as state:
            stub.GetState(agent_pb2.GetStateRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        channel.close()
    assert {allow.value.code(), state.value.code(), health.value.code()} == {C.UNAVAILABLE}
    assert rig.observe() == before


@pytest.fixture(scope="module")
def intruder(rig: AgentRig) -> Iterator[RawCaller]:
    """A caller with a valid chain to the client CA but an identity the agent does not list."""
    issued = rig.agent.pki.issue_client_cert(
        "intruder", common_name="intruder", uri_sans=("spiffe://vicifast/intruder",)
    )
    caller = RawCaller(
        rig.agent, rig.relay.address, cert=issued.cert.read_bytes(), key=issued.key.read_bytes()
    )
    yield caller
    caller.close()


@pytest.mark.parametrize("rpc", ["Allow", "Revoke", "Sync", "Erase"])
def test_unlisted_identity_is_denied_signed_calls_even_with_a_valid_signature(
    rig: AgentRig, intruder: RawCaller, rpc: str
) -> None:
    before = rig.observe()
    message = {
        "Allow": lambda h: agent_pb2.AllowRequest(header=h, entries=[allow_entry("198.18.4.2")]),
        "Revoke": lambda h: agent_pb2.RevokeRequest(header=h, subject="anyone"),
        "Sync": lambda h: agent_pb2.SyncRequest(header=h),
        "Erase": lambda h: agent_pb2.EraseRequest(header=h, subject="anyone"),
    }[rpc](rig.raw.header())
    answer = intruder.call(rpc, message)
    assert (answer.code, answer.reason) == (C.PERMISSION_DENIED, "caller_not_allowed")
    assert rig.observe() == before


def test_unlisted_identity_is_denied_before_the_envelope_is_looked_at(
    rig: AgentRig, intruder: RawCaller
) -> None:
    answer = intruder.send_bytes("Allow", b"\xff\xff")
    assert (answer.code, answer.reason) == (C.PERMISSION_DENIED, "caller_not_allowed")


def test_unlisted_identity_is_denied_reads_and_health(rig: AgentRig, intruder: RawCaller) -> None:
    calls: dict[str, Callable[[], object]] = {
        "GetState": intruder.state,
        "WatchEvents": lambda: next(
            iter(intruder.stub.WatchEvents(agent_pb2.WatchEventsRequest(), timeout=10))
        ),
        "Health": intruder.serving,
        "Health(service)": lambda: intruder.health_stub.Check(
            health_pb2.HealthCheckRequest(service="vicifast.agent.v1.FirewallAgent"), timeout=10
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == C.PERMISSION_DENIED, name
        assert (refused.value.details() or "").split(":")[0] == "caller_not_allowed", name


def test_listed_identity_is_served(rig: AgentRig) -> None:
    assert rig.raw.serving()
    assert rig.raw.state().agent_id == rig.agent.agent_id


def _tls_handshake(rig: AgentRig, version: ssl.TLSVersion) -> str:
    """Handshake with TLS at most ``version`` (presenting the valid client certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(rig.agent.pki.ca_cert)
    ctx.load_cert_chain(rig.agent.pki.client.cert, rig.agent.pki.client.key)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions at all
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    host, _, port = rig.relay.address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return str(tls.version())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # offering TLS 1.0/1.1 on purpose
def test_tls_below_1_2_is_refused_and_1_2_accepted(rig: AgentRig) -> None:
    assert _tls_handshake(rig, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    for old in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
        with pytest.raises(ssl.SSLError):
            _tls_handshake(rig, old)
