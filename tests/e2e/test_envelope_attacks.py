"""Every refusal of a signed envelope, end to end: the code, the reason word, and nothing changed.

One daemon (trusting two keys, for the rotation and wrong-key-id cases) serves the whole table;
each case snapshots the agent's state and the kernel's allow sets before and after its request.
The payload of every refused request is a valid Allow of a fresh address, so a wrongly accepted
one would show up in both snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import AgentRig
from e2ekit import (
    REASON_CODES,
    RPC_MESSAGES,
    C,
    RawCaller,
    Signer,
    allow_entry,
    envelope,
    header,
    now_ms,
    signed,
)
from netlab import Lab

from agent.devlab import DevAgent
from agent.rpc.envelope import pae, payload_type_for
from agent.rpc.pb import agent_pb2
from agent.rpc.signing import private_key_from_pem

ALLOW_TYPE = payload_type_for(agent_pb2.AllowRequest)
REVOKE_TYPE = payload_type_for(agent_pb2.RevokeRequest)


@dataclass
class Keys:
    """The callers' side of the table: the trusted keys, a stranger's key, a raw caller."""

    raw: RawCaller
    trusted: Signer
    second: Signer
    stranger: Signer
    agent_id: str

    def hdr(self, **kw: object) -> agent_pb2.RequestHeader:
        """A header; ``issued_in``/``expires_in`` are milliseconds from now (at build time)."""
        now = now_ms()
        if "issued_in" in kw:
            kw["issued_ms"] = now + int(kw.pop("issued_in"))  # type: ignore[call-overload]
        if "expires_in" in kw:
            kw["expires_ms"] = now + int(kw.pop("expires_in"))  # type: ignore[call-overload]
        return self.raw.header(**kw)

    def allow_msg(self, address: str = "198.18.1.1", **kw: object) -> agent_pb2.AllowRequest:
        return agent_pb2.AllowRequest(header=self.hdr(**kw), entries=[allow_entry(address)])

    def allow_bytes(self, **kw: object) -> bytes:
        return self.allow_msg(**kw).SerializeToString()


def _trust_two_keys(dev: DevAgent) -> None:
    second = dev.pki.new_signing_key("second")
    keys = {dev.pki.signing.keyid: dev.pki.signing.public_b64, second.keyid: second.public_b64}
    dev.write_config(dev.config_text(trusted_keys=keys))


@pytest.fixture(scope="module")
def rig(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    directory = tmp_path_factory.mktemp("envelope")
    with AgentRig.running(module_lab, directory, configure=_trust_two_keys) as rig:
        # Something to keep: a refusal must leave existing entries exactly as they were.
        held = rig.raw.allow(
            allow_entry("198.18.0.10", 3600, "held"), allow_entry("2001:db8:0:5::", 3600, "held")
        )
        assert held.ok, held
        yield rig


@pytest.fixture(scope="module")
def keys(rig: AgentRig) -> Keys:
    second_pem = (rig.agent.pki.directory / "second.key").read_bytes()
    second = private_key_from_pem(second_pem)
    from agent.rpc.signing import keyid_for  # noqa: PLC0415

    return Keys(
        raw=rig.raw,
        trusted=rig.raw.signer,
        second=Signer(second, keyid_for(second.public_key())),
        stranger=Signer.fresh(),
        agent_id=rig.agent.agent_id,
    )


Build = Callable[[Keys], "tuple[str, agent_pb2.SignedEnvelope | bytes]"]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    code: grpc.StatusCode
    reason: str

    def __post_init__(self) -> None:
        assert REASON_CODES[self.reason] == self.code, self.name


def _allow(build: Callable[[Keys], agent_pb2.SignedEnvelope | bytes]) -> Build:
    return lambda k: ("Allow", build(k))


def _sig(keyid: str, sig: bytes) -> agent_pb2.Signature:
    return agent_pb2.Signature(keyid=keyid, sig=sig)


def _with_sigs(payload: bytes, type_: str, *sigs: agent_pb2.Signature) -> agent_pb2.SignedEnvelope:
    env = agent_pb2.SignedEnvelope(payload_type=type_, payload=payload)
    env.signatures.extend(sigs)
    return env


def _raw_pae_sig(k: Keys, message: bytes) -> agent_pb2.Signature:
    """The trusted key's signature over arbitrary bytes (not the envelope's PAE)."""
    return _sig(k.trusted.keyid, k.trusted.key.sign(message))


def _other_bytes(k: Keys) -> agent_pb2.SignedEnvelope:
    signed_payload, sent_payload = k.allow_bytes(), k.allow_bytes(address="198.18.1.2")
    return _with_sigs(sent_payload, ALLOW_TYPE, k.trusted.sign(ALLOW_TYPE, signed_payload))


def _flipped(k: Keys) -> agent_pb2.SignedEnvelope:
    env = signed(k.allow_msg(), k.trusted)
    sig = bytearray(env.signatures[0].sig)
    sig[10] ^= 0x01
    env.signatures[0].sig = bytes(sig)
    return env


def _signed_over(message: Callable[[bytes], bytes]) -> Build:
    """The trusted key's signature over ``message(payload)`` instead of the payload's PAE."""

    def build(k: Keys) -> agent_pb2.SignedEnvelope:
        payload = k.allow_bytes()
        return _with_sigs(payload, ALLOW_TYPE, _raw_pae_sig(k, message(payload)))

    return _allow(build)


def _stranger_and_garbage(k: Keys) -> agent_pb2.SignedEnvelope:
    payload = k.allow_bytes()
    return _with_sigs(
        payload,
        ALLOW_TYPE,
        k.stranger.sign(ALLOW_TYPE, payload),
        _sig(k.trusted.keyid, b"\1" * 64),
    )


def _leading_zero_pae(k: Keys) -> agent_pb2.SignedEnvelope:
    payload = k.allow_bytes()
    t = ALLOW_TYPE.encode()
    message = b"DSSEv1 0%d %b %d %b" % (len(t), t, len(payload), payload)
    return _with_sigs(payload, ALLOW_TYPE, _raw_pae_sig(k, message))


def _type_changed_after_signing(k: Keys) -> agent_pb2.SignedEnvelope:
    payload = k.allow_bytes()
    return _with_sigs(payload, ALLOW_TYPE + " ", k.trusted.sign(ALLOW_TYPE, payload))


def _wrong_type(type_: str) -> Build:
    return _allow(lambda k: envelope(k.allow_bytes(), type_, [k.trusted]))


def _signed_payload(payload: bytes) -> Build:
    return _allow(lambda k: envelope(payload, ALLOW_TYPE, [k.trusted]))


def _signed_header(**kw: object) -> Build:
    return _allow(lambda k: signed(k.allow_msg(**kw), k.trusted))


def _nine_signatures(k: Keys) -> agent_pb2.SignedEnvelope:
    payload = k.allow_bytes()
    return _with_sigs(payload, ALLOW_TYPE, *[k.trusted.sign(ALLOW_TYPE, payload)] * 9)


def _long_keyid(k: Keys) -> agent_pb2.SignedEnvelope:
    payload = k.allow_bytes()
    return _with_sigs(
        payload,
        ALLOW_TYPE,
        _sig("k" * 257, b"\0" * 64),
        k.trusted.sign(ALLOW_TYPE, payload),
    )


def _relabel(signer: Callable[[Keys], Signer], keyid: Callable[[Keys], str]) -> Build:
    def build(k: Keys) -> agent_pb2.SignedEnvelope:
        payload = k.allow_bytes()
        sig = signer(k).sign(ALLOW_TYPE, payload)
        return _with_sigs(payload, ALLOW_TYPE, _sig(keyid(k), sig.sig))

    return _allow(build)


def _truncated_payload(k: Keys) -> agent_pb2.SignedEnvelope:
    payload = k.allow_bytes()
    return envelope(payload[: len(payload) - 3], ALLOW_TYPE, [k.trusted])


U, IA, PD = C.UNAUTHENTICATED, C.INVALID_ARGUMENT, C.PERMISSION_DENIED

CASES = [
    # --- step 1: well-formed, a trusted signature verifies ---------------------------------
    Case("no signatures", _allow(lambda k: envelope(k.allow_bytes(), ALLOW_TYPE, [])), U,
         "malformed_envelope"),
    Case("not a SignedEnvelope at all", _allow(lambda k: b"\xff\xff\xff\xff"), U,
         "malformed_envelope"),
    Case("nine valid signatures (more than the cap of 8)", _allow(_nine_signatures), U,
         "malformed_envelope"),
    Case("a keyid longer than 256 bytes", _allow(_long_keyid), U, "malformed_envelope"),
    Case("unknown keyid (a stranger's key)",
         _allow(lambda k: envelope(k.allow_bytes(), ALLOW_TYPE, [k.stranger])), U, "unknown_key"),
    Case("several unknown keyids",
         _allow(lambda k: envelope(k.allow_bytes(), ALLOW_TYPE, [k.stranger, Signer.fresh()])), U,
         "unknown_key"),
    Case("empty keyid on the trusted key's valid signature",
         _relabel(lambda k: k.trusted, lambda k: ""), U, "unknown_key"),
    Case("valid signature labelled with the other trusted key's id",
         _relabel(lambda k: k.trusted, lambda k: k.second.keyid), U, "bad_signature"),
    Case("second key's valid signature labelled with the first key's id",
         _relabel(lambda k: k.second, lambda k: k.trusted.keyid), U, "bad_signature"),
    Case("a stranger's signature labelled with a trusted id",
         _relabel(lambda k: k.stranger, lambda k: k.trusted.keyid), U, "bad_signature"),
    Case("random signature bytes",
         _allow(lambda k: _with_sigs(k.allow_bytes(), ALLOW_TYPE, _sig(k.trusted.keyid,
                bytes(range(64))))), U, "bad_signature"),
    Case("empty signature bytes",
         _allow(lambda k: _with_sigs(k.allow_bytes(), ALLOW_TYPE, _sig(k.trusted.keyid, b""))),
         U, "bad_signature"),
    Case("one bit of the signature flipped", _allow(_flipped), U, "bad_signature"),
    Case("signature over other payload bytes", _allow(_other_bytes), U, "bad_signature"),
    Case("signature over the bare payload, not its PAE",
         _signed_over(lambda p: p), U, "bad_signature"),
    Case("signature over the PAE of another payload type",
         _signed_over(lambda p: pae(REVOKE_TYPE, p)), U, "bad_signature"),
    Case("signature over a PAE with a leading zero in a length", _allow(_leading_zero_pae), U,
         "bad_signature"),
    Case("signature over a 'DSSEv2' PAE",
         _signed_over(lambda p: b"DSSEv2" + pae(ALLOW_TYPE, p)[6:]), U, "bad_signature"),
    Case("payload_type edited after signing", _allow(_type_changed_after_signing), U,
         "bad_signature"),
    Case("an unknown key and a bad signature under a trusted id",
         _allow(_stranger_and_garbage), U, "bad_signature"),
    Case("wrong type AND bad signature: the signature is judged first",
         _allow(lambda k: _with_sigs(k.allow_bytes(), REVOKE_TYPE, _sig(k.trusted.keyid,
                b"\1" * 64))), U, "bad_signature"),
    # --- step 2: payload_type equals the RPC's type exactly --------------------------------
    Case("RevokeRequest type on Allow", _wrong_type(REVOKE_TYPE), IA, "wrong_payload_type"),
    Case("AllowRequest type on Revoke",
         lambda k: ("Revoke", envelope(k.allow_bytes(), ALLOW_TYPE, [k.trusted])), IA,
         "wrong_payload_type"),
    Case("AllowRequest type on Sync",
         lambda k: ("Sync", envelope(k.allow_bytes(), ALLOW_TYPE, [k.trusted])), IA,
         "wrong_payload_type"),
    Case("AllowRequest type on Erase",
         lambda k: ("Erase", envelope(k.allow_bytes(), ALLOW_TYPE, [k.trusted])), IA,
         "wrong_payload_type"),
    Case("type in lower case", _wrong_type(ALLOW_TYPE.lower()), IA, "wrong_payload_type"),
    Case("type in upper case", _wrong_type(ALLOW_TYPE.upper()), IA, "wrong_payload_type"),
    Case("+json suffix", _wrong_type(ALLOW_TYPE.replace("+proto", "+json")), IA,
         "wrong_payload_type"),
    Case("v2 in the type", _wrong_type(ALLOW_TYPE.replace(".v1.", ".v2.")), IA,
         "wrong_payload_type"),
    Case("empty type", _wrong_type(""), IA, "wrong_payload_type"),
    Case("type with a trailing space", _wrong_type(ALLOW_TYPE + " "), IA, "wrong_payload_type"),
    Case("wrong type AND unparsable payload: the type is judged first",
         _allow(lambda k: envelope(b"\xff\xff", REVOKE_TYPE, [k.trusted])), IA,
         "wrong_payload_type"),
    # --- step 3: the payload parses and has a header -----------------------------------------
    Case("payload is not protobuf", _signed_payload(b"\xff\xff\xff"), IA, "unparsable_payload"),
    Case("payload cut short", _allow(_truncated_payload), IA, "unparsable_payload"),
    Case("payload without a header",
         _allow(lambda k: signed(agent_pb2.AllowRequest(entries=[allow_entry("198.18.1.1")]),
                k.trusted)), IA, "missing_header"),
    Case("empty payload", _signed_payload(b""), IA, "missing_header"),
    # --- step 4: agent_id ------------------------------------------------------------------
    Case("another agent's id", _signed_header(agent_id="other-agent"), PD, "wrong_agent"),
    Case("empty agent id", _signed_header(agent_id=""), PD, "wrong_agent"),
    Case("agent id in another case", _signed_header(agent_id="DEV-AGENT"), PD, "wrong_agent"),
    Case("wrong agent AND expired: the audience is judged first",
         _signed_header(agent_id="other-agent", issued_in=-600_000), PD, "wrong_agent"),
    # --- step 5: validity window -----------------------------------------------------------
    Case("expired", _signed_header(issued_in=-400_000, valid_ms=200_000), U,
         "request_expired"),
    Case("expired just beyond the 30 s skew",
         _signed_header(issued_in=-100_000, expires_in=-40_000), U, "request_expired"),
    Case("zero timestamps", _signed_header(issued_ms=0, expires_ms=0), U, "request_expired"),
    Case("issued in the future beyond the skew", _signed_header(issued_in=120_000), U,
         "request_not_yet_valid"),
    Case("issued far in the future", _signed_header(issued_ms=2**62), U,
         "request_not_yet_valid"),
    Case("window of 300 s + 1 ms", _signed_header(valid_ms=300_001), U, "window_too_long"),
    Case("window of a year", _signed_header(valid_ms=365 * 86_400_000), U, "window_too_long"),
    Case("expires before issued", _signed_header(valid_ms=-1), U, "invalid_window"),
    Case("expires before issued AND issued in the future: shape before clock",
         _signed_header(issued_in=3_600_000, valid_ms=-1000), U, "invalid_window"),
    Case("expired AND a malformed request id: window first",
         _signed_header(issued_in=-400_000, request_id="bad id"), U, "request_expired"),
    # --- step 6: request id format ---------------------------------------------------------
    Case("request id of 7 characters", _signed_header(request_id="abcdefg"), IA,
         "invalid_request_id"),
    Case("request id of 65 characters", _signed_header(request_id="a" * 65), IA,
         "invalid_request_id"),
    Case("request id with a space", _signed_header(request_id="abcd efgh"), IA,
         "invalid_request_id"),
    Case("request id with '!'", _signed_header(request_id="abcdefgh!"), IA,
         "invalid_request_id"),
    Case("request id with a newline", _signed_header(request_id="abcdefgh\n"), IA,
         "invalid_request_id"),
    Case("request id with a dot", _signed_header(request_id="abcd.efgh"), IA,
         "invalid_request_id"),
    Case("request id with non-ASCII letters", _signed_header(request_id="ééééééééé"), IA,
         "invalid_request_id"),
    Case("request id with the reserved local- prefix",
         _signed_header(request_id="local-abcdefgh"), IA, "invalid_request_id"),
    Case("malformed request id AND an invalid address: the id first",
         _allow(lambda k: signed(agent_pb2.AllowRequest(
             header=header(k.agent_id, "no good"), entries=[allow_entry("0.0.0.0/0")]),
             k.trusted)), IA, "invalid_request_id"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_envelope_changes_nothing(rig: AgentRig, keys: Keys, case: Case) -> None:
    before = rig.observe()
    rpc, request = case.build(keys)
    if isinstance(request, bytes):
        answer = rig.raw.send_bytes(rpc, request)
    else:
        answer = rig.raw.send(rpc, request)
    assert (answer.code, answer.reason) == (case.code, case.reason), answer.message
    assert rig.observe() == before


@pytest.mark.parametrize("rpc", sorted(RPC_MESSAGES))
@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("bad signature", "bad_signature"),
        ("stranger", "unknown_key"),
        ("expired", "request_expired"),
    ],
)
def test_every_signed_rpc_checks_the_envelope(
    rig: AgentRig, keys: Keys, rpc: str, what: str, reason: str
) -> None:
    message = RPC_MESSAGES[rpc](header=keys.hdr())
    if what == "expired":
        message.header.issued_at_unix_ms -= 600_000
        message.header.expires_at_unix_ms -= 600_000
    env = signed(message, keys.stranger if what == "stranger" else keys.trusted)
    if what == "bad signature":
        env.signatures[0].sig = b"\2" * 64
    before = rig.observe()
    answer = rig.raw.send(rpc, env)
    assert (answer.code, answer.reason) == (REASON_CODES[reason], reason), answer.message
    assert rig.observe() == before


def test_one_trusted_signature_among_unknown_and_mislabelled_ones_is_enough(
    rig: AgentRig, keys: Keys
) -> None:
    payload = keys.allow_msg("198.18.2.1").SerializeToString()
    env = _with_sigs(
        payload,
        ALLOW_TYPE,
        keys.stranger.sign(ALLOW_TYPE, payload),
        _sig("", keys.trusted.key.sign(pae(ALLOW_TYPE, payload))),
        _sig(keys.trusted.keyid, keys.second.key.sign(pae(ALLOW_TYPE, payload))),
        keys.second.sign(ALLOW_TYPE, payload),
    )
    answer = rig.raw.send("Allow", env)
    assert answer.ok, answer.message
    assert answer.result is not None
    assert [(r.address, r.status) for r in answer.result.results] == [
        ("198.18.2.1", agent_pb2.ADDED)
    ]
    assert "198.18.2.1" in rig.observe().elements


@pytest.mark.parametrize("signer", ["trusted", "second"])
def test_either_trusted_key_signs_during_rotation(rig: AgentRig, keys: Keys, signer: str) -> None:
    address = {"trusted": "198.18.2.2", "second": "198.18.2.3"}[signer]
    answer = rig.raw.send("Allow", signed(keys.allow_msg(address), getattr(keys, signer)))
    assert answer.ok, answer.message
    state = rig.raw.state()
    assert sorted(state.trusted_keyids) == sorted([keys.trusted.keyid, keys.second.keyid])
    assert address in rig.observe().elements


@pytest.mark.parametrize("offset_ms", [25_000, -250_000])
def test_requests_inside_the_skew_and_window_are_accepted(
    rig: AgentRig, keys: Keys, offset_ms: int
) -> None:
    address = f"198.18.3.{1 if offset_ms > 0 else 2}"
    msg = keys.allow_msg(address, issued_ms=now_ms() + offset_ms, valid_ms=300_000)
    answer = rig.raw.send("Allow", signed(msg, keys.trusted))
    assert answer.ok, answer.message
    assert address in rig.observe().elements


def test_the_daemon_outlived_the_table(rig: AgentRig, tmp_path: Path) -> None:
    assert rig.agent.process is not None
    assert rig.agent.process.poll() is None
    assert rig.raw.serving()
