"""What the end-to-end tests share: raw signed calls, the reason table, state+kernel snapshots,
and ``AgentRig`` (a started daemon with its relay and raw caller; the fixtures that make them
are in tests/e2e/conftest.py).

Raw calls go over the real mTLS channel (through the devlab relay) with envelopes the tests build
by hand, so attacks the project's own client would never produce can be sent. ``Observed`` is
everything a refused request must leave exactly as it was: the agent's reported entries and
``state_version`` and the elements of every allow set in the kernel.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netlab import Lab, Netns
from prometheus_client.parser import text_string_to_metric_families

from agent.devlab import METRICS_PORT, DevAgent, TcpRelay
from agent.rpc.client import AgentClient
from agent.rpc.envelope import SignedRequest, pae, payload_type_for
from agent.rpc.pb import agent_pb2, agent_pb2_grpc
from agent.rpc.signing import keyid_for, private_key_from_pem

C = grpc.StatusCode

# Every reason word the agent may answer a signed request with, and its one gRPC code
# (PROTOCOL.md "Errors"). A reason seen that is missing here fails the tests that check it.
REASON_CODES: Mapping[str, grpc.StatusCode] = {
    # envelope and header (agent.rpc.envelope)
    "malformed_envelope": C.UNAUTHENTICATED,
    "unknown_key": C.UNAUTHENTICATED,
    "bad_signature": C.UNAUTHENTICATED,
    "wrong_payload_type": C.INVALID_ARGUMENT,
    "unparsable_payload": C.INVALID_ARGUMENT,
    "missing_header": C.INVALID_ARGUMENT,
    "wrong_agent": C.PERMISSION_DENIED,
    "invalid_window": C.UNAUTHENTICATED,
    "window_too_long": C.UNAUTHENTICATED,
    "request_not_yet_valid": C.UNAUTHENTICATED,
    "request_expired": C.UNAUTHENTICATED,
    "invalid_request_id": C.INVALID_ARGUMENT,
    # caller
    "caller_not_allowed": C.PERMISSION_DENIED,
    # replay
    "request_id_reused": C.ALREADY_EXISTS,
    # fields (agent.policy, agent.model, agent.rpc.convert)
    "invalid_address": C.INVALID_ARGUMENT,
    "host_bits_set": C.INVALID_ARGUMENT,
    "prefix_too_short": C.INVALID_ARGUMENT,
    "address_not_global": C.INVALID_ARGUMENT,
    "invalid_ttl": C.INVALID_ARGUMENT,
    "invalid_subject": C.INVALID_ARGUMENT,
    "unknown_profile": C.INVALID_ARGUMENT,
    "duplicate_entry": C.INVALID_ARGUMENT,
    "no_entries": C.INVALID_ARGUMENT,
    "invalid_revoke": C.INVALID_ARGUMENT,
    "empty_subject": C.INVALID_ARGUMENT,
    # caps and ordering
    "request_too_large": C.RESOURCE_EXHAUSTED,
    "entry_cap": C.RESOURCE_EXHAUSTED,
    "set_full": C.RESOURCE_EXHAUSTED,
    "stale_sync": C.FAILED_PRECONDITION,
}

RPC_MESSAGES: Mapping[str, type[SignedRequest]] = {
    "Allow": agent_pb2.AllowRequest,
    "Revoke": agent_pb2.RevokeRequest,
    "Sync": agent_pb2.SyncRequest,
    "Erase": agent_pb2.EraseRequest,
}


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one call came back with: OK and a result, or a code and the reason word."""

    code: grpc.StatusCode
    reason: str = ""
    message: str = ""
    result: agent_pb2.ApplyResult | None = None

    @property
    def ok(self) -> bool:
        return self.code == C.OK

    def applied(self) -> agent_pb2.ApplyResult:
        """The result of a call that must have succeeded (failing with its reason otherwise)."""
        assert self.ok, self.message
        assert self.result is not None
        return self.result


@dataclass(frozen=True, slots=True)
class Signer:
    """A request-signing key and the key id it signs under (which need not be its own)."""

    key: Ed25519PrivateKey
    keyid: str

    @staticmethod
    def fresh() -> Signer:
        key = Ed25519PrivateKey.generate()
        return Signer(key, keyid_for(key.public_key()))

    def sign(self, payload_type: str, payload: bytes) -> agent_pb2.Signature:
        return agent_pb2.Signature(keyid=self.keyid, sig=self.key.sign(pae(payload_type, payload)))


def header(
    agent_id: str,
    request_id: str,
    *,
    issued_ms: int | None = None,
    valid_ms: int = 60_000,
    expires_ms: int | None = None,
) -> agent_pb2.RequestHeader:
    issued = now_ms() if issued_ms is None else issued_ms
    return agent_pb2.RequestHeader(
        agent_id=agent_id,
        request_id=request_id,
        issued_at_unix_ms=issued,
        expires_at_unix_ms=issued + valid_ms if expires_ms is None else expires_ms,
    )


def allow_entry(
    address: str, ttl: int = 600, subject: str = "", profile: str = ""
) -> agent_pb2.AllowEntry:
    return agent_pb2.AllowEntry(address=address, ttl_seconds=ttl, subject=subject, profile=profile)


def envelope(
    payload: bytes, payload_type: str, signers: Iterable[Signer]
) -> agent_pb2.SignedEnvelope:
    """Sign exact ``payload`` bytes under ``payload_type`` with each signer."""
    env = agent_pb2.SignedEnvelope(payload_type=payload_type, payload=payload)
    env.signatures.extend(s.sign(payload_type, payload) for s in signers)
    return env


def signed(message: SignedRequest, signer: Signer) -> agent_pb2.SignedEnvelope:
    """``message`` serialized once and signed under the type its class names."""
    return envelope(message.SerializeToString(), payload_type_for(type(message)), [signer])


class RawCaller:
    """A real mTLS channel to one agent, for hand-built envelopes and GetState."""

    def __init__(
        self,
        agent: DevAgent,
        target: str,
        *,
        cert: bytes | None = None,
        key: bytes | None = None,
    ) -> None:
        p = agent.pki
        creds = grpc.ssl_channel_credentials(
            root_certificates=p.ca_cert.read_bytes(),
            private_key=key if key is not None else p.client.key.read_bytes(),
            certificate_chain=cert if cert is not None else p.client.cert.read_bytes(),
        )
        self.agent_id = agent.agent_id
        self.channel = grpc.secure_channel(
            target, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        self.stub = agent_pb2_grpc.FirewallAgentStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.signer = Signer(private_key_from_pem(p.signing.key.read_bytes()), p.signing.keyid)
        self._serial = 0

    def close(self) -> None:
        self.channel.close()

    def request_id(self, tag: str = "req") -> str:
        """A fresh valid request id (unique within this caller)."""
        self._serial += 1
        return f"{tag}-{self._serial:06d}-{time.monotonic_ns() % 10**9:09d}"

    def header(self, **kw: Any) -> agent_pb2.RequestHeader:
        request_id = kw.pop("request_id", None) or self.request_id()
        return header(kw.pop("agent_id", self.agent_id), request_id, **kw)

    def send(self, rpc: str, env: agent_pb2.SignedEnvelope, timeout: float = 10.0) -> Answer:
        try:
            result = getattr(self.stub, rpc)(env, timeout=timeout)
        except grpc.RpcError as exc:
            message = exc.details() or ""
            return Answer(exc.code(), message.split(":", 1)[0].strip(), message)
        return Answer(C.OK, result=result)

    def send_bytes(self, rpc: str, data: bytes, timeout: float = 10.0) -> Answer:
        """Send ``data`` as the request of ``rpc`` without any encoding."""
        method = self.channel.unary_unary(
            f"/vicifast.agent.v1.FirewallAgent/{rpc}",
            request_serializer=lambda b: b,
            response_deserializer=agent_pb2.ApplyResult.FromString,
        )
        try:
            result = method(data, timeout=timeout)
        except grpc.RpcError as exc:
            message = exc.details() or ""
            return Answer(exc.code(), message.split(":", 1)[0].strip(), message)
        return Answer(C.OK, result=result)

    def call(self, rpc: str, message: SignedRequest) -> Answer:
        """Sign ``message`` with the agent's trusted dev key and send it on ``rpc``."""
        return self.send(rpc, signed(message, self.signer))

    def allow(self, *entries: agent_pb2.AllowEntry, **hdr: Any) -> Answer:
        return self.call(
            "Allow", agent_pb2.AllowRequest(header=self.header(**hdr), entries=entries)
        )

    def sync(self, *entries: agent_pb2.AllowEntry, **hdr: Any) -> Answer:
        return self.call("Sync", agent_pb2.SyncRequest(header=self.header(**hdr), entries=entries))

    def revoke(
        self, addresses: Iterable[str] = (), subject: str = "", profile: str = "", **hdr: Any
    ) -> Answer:
        msg = agent_pb2.RevokeRequest(
            header=self.header(**hdr), addresses=list(addresses), subject=subject, profile=profile
        )
        return self.call("Revoke", msg)

    def erase(self, subject: str, **hdr: Any) -> Answer:
        return self.call(
            "Erase", agent_pb2.EraseRequest(header=self.header(**hdr), subject=subject)
        )

    def state(self) -> agent_pb2.AgentState:
        result: agent_pb2.AgentState = self.stub.GetState(agent_pb2.GetStateRequest(), timeout=10)
        return result

    def serving(self) -> bool:
        answer = self.health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


EntryRow = tuple[str, str, str, int, int, str]
KernelRow = tuple[str, str, int, str]  # set, element, timeout, comment


@dataclass(frozen=True, slots=True)
class Observed:
    """The agent's reported state and the kernel's allow sets at one moment."""

    state_version: int
    entries: tuple[EntryRow, ...]
    kernel: frozenset[KernelRow] = field(default_factory=frozenset)

    @property
    def addresses(self) -> set[str]:
        return {e[0] for e in self.entries}

    @property
    def elements(self) -> set[str]:
        return {k[1] for k in self.kernel}


def entry_rows(state: agent_pb2.AgentState) -> tuple[EntryRow, ...]:
    return tuple(
        (
            e.address,
            e.profile,
            e.subject,
            e.created_at_unix_ms,
            e.expires_at_unix_ms,
            e.request_id,
        )
        for e in state.entries
    )


def kernel_rows(ns: Netns, table: str = "vicifast") -> frozenset[KernelRow]:
    """Every element of the table's dynamic allow sets (``allow4_*``, ``allow6_*``).

    The remaining time (``expires``) ticks, so it is left out; ``timeout`` and the comment
    (which names the request id) change whenever an element is written.
    """
    listing = ns.nft_json("-t", "list", "sets", "inet")
    names = [
        item["set"]["name"]
        for item in listing["nftables"]
        if "set" in item
        and item["set"]["table"] == table
        and item["set"]["name"].startswith("allow")
    ]
    rows: set[KernelRow] = set()
    for name in names:
        got = ns.nft_json("list", "set", "inet", table, name)
        for item in got["nftables"]:
            for elem in item.get("set", {}).get("elem", ()):
                e = elem["elem"] if isinstance(elem, dict) and "elem" in elem else {"val": elem}
                rows.add((name, str(e["val"]), int(e.get("timeout", 0)), e.get("comment", "")))
    return frozenset(rows)


def observe(caller: RawCaller, ns: Netns, table: str = "vicifast") -> Observed:
    state = caller.state()
    return Observed(state.state_version, entry_rows(state), kernel_rows(ns, table))


def in_test_ranges(text: str) -> bool:
    net = ipaddress.ip_network(text, strict=False)
    return any(
        net.version == r.version and net.subnet_of(r)  # type: ignore[arg-type]
        for r in (
            ipaddress.ip_network("198.18.0.0/15"),
            ipaddress.ip_network("2001:db8::/32"),
        )
    )


def open_relay(agent: DevAgent) -> TcpRelay:
    return agent.relay()


@dataclass
class AgentRig:
    """A started daemon in ``lab.srv`` with a relay and a raw caller."""

    lab: Lab
    agent: DevAgent
    relay: TcpRelay
    raw: RawCaller

    def observe(self) -> Observed:
        return observe(self.raw, self.lab.srv, self.agent.table)

    def client(self) -> AgentClient:
        return self.agent.client(self.relay.address)

    def restart(self) -> None:
        """SIGTERM, start again, and a fresh connection (the old one saw the listener go)."""
        self.agent.stop()
        self.agent.start()
        self.raw.close()
        self.raw = RawCaller(self.agent, self.relay.address)

    @staticmethod
    @contextlib.contextmanager
    def running(lab: Lab, directory: Path, **kw: Any) -> Iterator[AgentRig]:
        """Start a daemon made by ``DevAgent(**kw)``; ``configure(dev)``, if given, runs first
        (e.g. to rewrite its config)."""
        configure = kw.pop("configure", None)
        with DevAgent(directory, lab.srv.name, **kw) as dev:
            if configure is not None:
                configure(dev)
            dev.start()
            relay = dev.relay()
            raw = RawCaller(dev, relay.address)
            rig = AgentRig(lab, dev, relay, raw)
            try:
                yield rig
            finally:
                rig.raw.close()
                relay.close()


# --- metrics ---------------------------------------------------------------------------------

Labels = frozenset[tuple[str, str]]


def metrics_relay(agent: DevAgent) -> TcpRelay:
    """A relay to ``agent``'s metrics listener (127.0.0.1 inside its namespace): what is
    scraped through it is what a local Prometheus would read."""
    return TcpRelay(agent.netns, ("127.0.0.1", METRICS_PORT))


def scrape_text(relay: TcpRelay) -> str:
    """One scrape of the daemon's metrics through ``relay`` (the ``metrics`` fixture's)."""
    url = f"http://{relay.address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


def scrape(relay: TcpRelay) -> dict[tuple[str, Labels], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(scrape_text(relay))
        for s in family.samples
    }


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))
