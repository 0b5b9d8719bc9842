"""Fuzzing one running daemon with random and mutated envelopes (hypothesis).

Most envelopes are signed with the trusted test key, so the code past verification - payload
parsing, header checks, replay, field validation, caps, ordering, the kernel - runs on random
input too. Every answer must be OK or a documented code with a known reason word; the daemon
must stay up and healthy; and the kernel must never hold an element that validation should have
refused (every element is an entry the agent reports, in normal form, with a valid subject).

Addresses the generators produce are either refused by the policy or inside the test ranges
(198.18.0.0/15, 2001:db8::/32), so nothing outside them is ever installed, even in the lab.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable

import pytest
from conftest import AgentRig
from e2ekit import REASON_CODES, RPC_MESSAGES, Answer, Signer, envelope, kernel_rows, now_ms
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidArgument
from agent.model import Address, check_subject
from agent.policy import AddressPolicy, normalize_address
from agent.rpc.envelope import SignedRequest, payload_type_for
from agent.rpc.pb import agent_pb2

POLICY = AddressPolicy(ipv6_prefix=64, permit_test_ranges=True)  # DevAgent's configuration
TEST_NETS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32"))
MAX_TTL_MS = 604_800_000


def admitted(text: str) -> Address | None:
    try:
        return normalize_address(text, POLICY)
    except InvalidArgument:
        return None


def outside_test_ranges(text: str) -> bool:
    """Whether the agent would admit ``text`` as an address outside the test ranges."""
    address = admitted(text)
    if address is None:
        return False
    net = address.network
    return not any(net.version == t.version and net.subnet_of(t) for t in TEST_NETS)  # type: ignore[arg-type]


VALID_ADDRESSES = st.one_of(
    st.builds("198.18.{}.{}".format, st.integers(20, 40), st.integers(0, 255)),
    st.builds("2001:db8:{:x}:{:x}::{:x}".format, *[st.integers(0, 0xFFFF)] * 3),
    st.builds("::ffff:198.19.{}.{}".format, st.integers(0, 255), st.integers(0, 255)),
    st.builds("198.18.21.{}/32".format, st.integers(0, 255)),
)
INVALID_ADDRESSES = st.sampled_from(
    [
        "0.0.0.0/0", "::/0", "127.0.0.1", "::1", "10.0.0.1", "fe80::1%eth0", "198.018.20.1",
        "198.18.20.1 ", " 198.18.20.1", "198.18.20.1/24", "224.0.0.1", "ff02::1", "::",
        "::ffff:127.0.0.1", "2001:db8::/48", "", "169.254.0.1", "255.255.255.255",
    ]
)  # fmt: skip


def _mutate_text(text: str, data: st.DataObject) -> str:
    pos = data.draw(st.integers(0, len(text)))
    op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    ch = data.draw(st.characters(codec="utf-8"))
    if op == "insert":
        return text[:pos] + ch + text[pos:]
    if op == "delete" or pos == len(text):
        return text[:pos] + text[pos + 1 :]
    return text[:pos] + ch + text[pos + 1 :]


ADDRESSES = st.one_of(VALID_ADDRESSES, VALID_ADDRESSES, INVALID_ADDRESSES, st.text(max_size=40))
TTLS = st.one_of(st.sampled_from([0, 1, 59, 60, 600, 604_800, 604_801]), st.integers(0, 2**32 - 1))
SUBJECTS = st.one_of(
    st.sampled_from(["", "alice", 'O\'Brien; "x"', "a" * 64, "a" * 65, "\u202e", "x\ny"]),
    st.text(max_size=70),
)
PROFILES = st.one_of(st.sampled_from(["", "agent", "", "agent", "nope"]), st.text(max_size=6))


class Fuzzer:
    """Builds and sends one random request per hypothesis example against one daemon."""

    def __init__(self, rig: AgentRig) -> None:
        self.rig = rig
        self.raw = rig.raw
        self.trusted = rig.raw.signer
        self.ids = itertools.count()
        self.seen: dict[str, int] = {}

    def address(self, data: st.DataObject) -> str:
        text = data.draw(ADDRESSES)
        if data.draw(st.integers(0, 5)) == 5:
            text = _mutate_text(text, data)
        assume(not outside_test_ranges(text))
        return text

    def entry(self, data: st.DataObject) -> agent_pb2.AllowEntry:
        if not data.draw(st.booleans()):  # half of the entries are valid ones
            return agent_pb2.AllowEntry(
                address=data.draw(VALID_ADDRESSES),
                ttl_seconds=data.draw(st.sampled_from([0, 60, 600, 604_800])),
                subject=data.draw(st.text(st.characters(categories=["L", "N", "P", "Zs"]),
                                          max_size=64)),
                profile=data.draw(st.sampled_from(["", "agent"])),
            )  # fmt: skip
        return agent_pb2.AllowEntry(
            address=self.address(data),
            ttl_seconds=data.draw(TTLS),
            subject=data.draw(SUBJECTS),
            profile=data.draw(PROFILES),
        )

    def header(self, data: st.DataObject) -> agent_pb2.RequestHeader:
        now = now_ms()
        request_id = f"fuzz-{next(self.ids):08d}-{now % 10**6:06d}"
        hdr = agent_pb2.RequestHeader(
            agent_id=self.raw.agent_id,
            request_id=request_id,
            issued_at_unix_ms=now + data.draw(st.integers(-20_000, 20_000)),
            expires_at_unix_ms=now + 60_000,
        )
        # Hypothesis favours small values: 0 must be the undamaged header.
        damage = data.draw(st.integers(0, 9))
        if damage == 9:
            hdr.request_id = data.draw(st.text(max_size=70))
        elif damage == 8:
            hdr.agent_id = data.draw(st.text(max_size=12))
        elif damage == 7:
            hdr.issued_at_unix_ms = data.draw(st.integers(-(2**63), 2**63 - 1))
            hdr.expires_at_unix_ms = data.draw(st.integers(-(2**63), 2**63 - 1))
        return hdr

    def message(self, data: st.DataObject, rpc: str) -> SignedRequest:
        header = self.header(data)
        if rpc in ("Allow", "Sync"):
            count = data.draw(st.sampled_from([1, 2, 3, 4, 0]))
            entries = [self.entry(data) for _ in range(count)]
            return RPC_MESSAGES[rpc](header=header, entries=entries)
        if rpc == "Revoke":
            count = data.draw(st.sampled_from([1, 2, 3, 0]))
            return agent_pb2.RevokeRequest(
                header=header,
                addresses=[self.address(data) for _ in range(count)],
                subject=data.draw(SUBJECTS) if count == 0 or data.draw(st.booleans()) else "",
                profile=data.draw(PROFILES),
            )
        return agent_pb2.EraseRequest(header=header, subject=data.draw(SUBJECTS))

    def request(self, data: st.DataObject) -> tuple[str, agent_pb2.SignedEnvelope | bytes]:
        rpc = data.draw(st.sampled_from(sorted(RPC_MESSAGES)))
        message = self.message(data, rpc)
        payload = message.SerializeToString()
        payload_type = payload_type_for(type(message))
        modes = ["valid"] * 6 + ["mutated", "random", "type", "sigs"]
        mode = modes[data.draw(st.integers(0, len(modes) - 1))]
        if mode == "mutated":
            payload = self.mutated(data, payload, type(message))
        elif mode == "random":
            payload = data.draw(st.binary(max_size=200))
            assume(self.installs_nothing_outside(payload, type(message)))
        elif mode == "type":
            payload_type = data.draw(
                st.one_of(
                    st.sampled_from([payload_type_for(t) for t in RPC_MESSAGES.values()]),
                    st.text(max_size=60),
                )
            )
        env = envelope(payload, payload_type, [self.trusted])
        if mode == "sigs":
            self.damage_signatures(data, env)
        if data.draw(st.integers(0, 30)) == 30:
            return rpc, data.draw(st.binary(max_size=300))  # not even an envelope
        return rpc, env

    def mutated(self, data: st.DataObject, payload: bytes, kind: type[SignedRequest]) -> bytes:
        raw = bytearray(payload)
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
            op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            if op == "flip" and raw:
                raw[pos] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "insert":
                raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
            elif op == "delete" and raw:
                del raw[pos]
            elif op == "truncate":
                del raw[pos:]
        out = bytes(raw)
        assume(self.installs_nothing_outside(out, kind))
        return out

    @staticmethod
    def installs_nothing_outside(payload: bytes, kind: type[SignedRequest]) -> bool:
        """False when ``payload`` parses into a request naming an admissible address outside
        the test ranges (which the lab must never install)."""
        try:
            message = kind.FromString(payload)
        except Exception:  # noqa: BLE001 - unparsable: the agent refuses it, nothing to check
            return True
        texts = [e.address for e in getattr(message, "entries", ())]
        texts += list(getattr(message, "addresses", ()))
        return not any(outside_test_ranges(t) for t in texts)

    def damage_signatures(self, data: st.DataObject, env: agent_pb2.SignedEnvelope) -> None:
        how = data.draw(st.sampled_from(["flip", "keyid", "stranger", "none", "many"]))
        sig = env.signatures[0]
        if how == "flip":
            b = bytearray(sig.sig)
            b[data.draw(st.integers(0, len(b) - 1))] ^= 1
            sig.sig = bytes(b)
        elif how == "keyid":
            sig.keyid = data.draw(st.text(max_size=300))
        elif how == "stranger":
            env.ClearField("signatures")
            env.signatures.append(Signer.fresh().sign(env.payload_type, env.payload))
        elif how == "none":
            env.ClearField("signatures")
        else:
            env.signatures.extend([sig] * data.draw(st.integers(1, 10)))

    def send(self, rpc: str, request: agent_pb2.SignedEnvelope | bytes) -> Answer:
        if isinstance(request, bytes):
            return self.raw.send_bytes(rpc, request)
        return self.raw.send(rpc, request)


def check_kernel_holds_only_valid_entries(rig: AgentRig) -> None:
    """Every element of the allow sets is a reported entry that validation accepts, and every
    reported entry is in the kernel."""
    state = rig.raw.state()
    expected: set[tuple[str, str]] = set()
    for e in state.entries:
        assert normalize_address(e.address, POLICY).text == e.address
        assert check_subject(e.subject) == e.subject
        assert e.profile == "agent"
        assert e.created_at_unix_ms <= e.expires_at_unix_ms <= state.now_unix_ms + MAX_TTL_MS
        address = Address(e.address)
        expected.add((f"allow{address.family}_agent", address.element))
    kernel = {(row[0], row[1]) for row in kernel_rows(rig.lab.srv, rig.agent.table)}
    assert kernel == expected


@pytest.fixture(scope="module")
def rig(shared: AgentRig) -> AgentRig:
    return shared


def test_random_and_mutated_envelopes_never_crash_the_daemon_or_install_invalid_entries(
    rig: AgentRig,
) -> None:
    fuzzer = Fuzzer(rig)
    answers: dict[str, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    @given(st.data())
    def one(data: st.DataObject) -> None:
        rpc, request = fuzzer.request(data)
        answer = fuzzer.send(rpc, request)
        key = "OK" if answer.ok else answer.reason
        answers[key] = answers.get(key, 0) + 1
        if answer.ok:
            assert answer.result is not None
            for r in answer.result.results:
                assert admitted(r.address) == Address(r.address), r
        else:
            assert answer.reason in REASON_CODES, answer.message
            assert answer.code == REASON_CODES[answer.reason], answer.message
        if sum(answers.values()) % 50 == 0:
            check_kernel_holds_only_valid_entries(rig)

    one()
    assert rig.agent.process is not None
    assert rig.agent.process.poll() is None
    assert rig.raw.serving()
    check_kernel_holds_only_valid_entries(rig)
    # The fuzz reached past verification and into every stage, not only the signature check.
    reached: Callable[[str], bool] = lambda reason: answers.get(reason, 0) > 0  # noqa: E731
    assert reached("OK"), answers
    assert any(map(reached, ("invalid_address", "address_not_global", "invalid_subject"))), answers
    assert reached("unparsable_payload") or reached("missing_header"), answers
