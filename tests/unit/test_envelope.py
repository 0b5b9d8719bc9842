"""PROTOCOL.md "Signed envelope", "Request header" and steps 1-6 of "Order of checks"."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import AgentError, InvalidArgument, PermissionDenied, Unauthenticated
from agent.rpc.envelope import (
    MAX_SIGNATURES,
    REASONS,
    OpenedRequest,
    RequestHeader,
    TrustPolicy,
    check_request_id,
    open_envelope,
    pae,
    payload_type_for,
)
from agent.rpc.pb import agent_pb2 as pb
from agent.rpc.signing import keyid_for, sign_payload

AGENT = "dialer-01.example"
NOW = 1_700_000_000_000
SKEW = 30_000
WINDOW = 300_000
REQUEST_ID = "req-0001_abcd"
ALLOW_TYPE = "application/vnd.vicifast.agent.v1.AllowRequest+proto"


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


KEY_A, KEY_B, KEY_C = _key(1), _key(2), _key(3)
KEYID_A, KEYID_B, KEYID_C = (keyid_for(k.public_key()) for k in (KEY_A, KEY_B, KEY_C))
POLICY = TrustPolicy(
    agent_id=AGENT,
    trusted_keys={KEYID_A: KEY_A.public_key(), KEYID_B: KEY_B.public_key()},
    clock_skew_ms=SKEW,
    max_window_ms=WINDOW,
)


def header(**overrides: object) -> pb.RequestHeader:
    fields: dict[str, object] = {
        "agent_id": AGENT,
        "request_id": REQUEST_ID,
        "issued_at_unix_ms": NOW,
        "expires_at_unix_ms": NOW + 60_000,
    }
    fields.update(overrides)
    return pb.RequestHeader(**fields)  # type: ignore[arg-type]


def allow_payload(**header_overrides: object) -> bytes:
    request = pb.AllowRequest(header=header(**header_overrides))
    request.entries.add(address="198.51.100.7", ttl_seconds=3600, subject="agent007")
    return request.SerializeToString(deterministic=True)


def signed(
    payload: bytes | None = None,
    payload_type: str = ALLOW_TYPE,
    signers: tuple[tuple[Ed25519PrivateKey, str], ...] = ((KEY_A, KEYID_A),),
) -> pb.SignedEnvelope:
    return sign_payload(payload_type, allow_payload() if payload is None else payload, signers)


def open_allow(envelope: pb.SignedEnvelope, now_ms: int = NOW) -> OpenedRequest[pb.AllowRequest]:
    return open_envelope(envelope, pb.AllowRequest, POLICY, now_ms)


# ---------------------------------------------------------------------------------------------
# Envelope builders for the failure table.


def no_signatures() -> pb.SignedEnvelope:
    return pb.SignedEnvelope(payload_type=ALLOW_TYPE, payload=allow_payload())


def too_many_signatures() -> pb.SignedEnvelope:
    return signed(signers=((KEY_A, KEYID_A),) * (MAX_SIGNATURES + 1))


def overlong_keyid() -> pb.SignedEnvelope:
    return signed(signers=((KEY_A, KEYID_A), (KEY_C, "k" * 257)))


def tampered_payload() -> pb.SignedEnvelope:
    envelope = signed()
    envelope.payload = allow_payload(request_id="req-0002_abcd")
    return envelope


def tampered_payload_type() -> pb.SignedEnvelope:
    envelope = signed(payload_type="application/vnd.vicifast.agent.v1.RevokeRequest+proto")
    envelope.payload_type = ALLOW_TYPE
    return envelope


def garbage_signature() -> pb.SignedEnvelope:
    envelope = signed()
    envelope.signatures[0].sig = b"\x00" * 64
    return envelope


def truncated_signature() -> pb.SignedEnvelope:
    envelope = signed()
    envelope.signatures[0].sig = envelope.signatures[0].sig[:63]
    return envelope


def no_header() -> pb.SignedEnvelope:
    request = pb.AllowRequest()
    request.entries.add(address="198.51.100.7")
    return signed(request.SerializeToString())


FailureCase = tuple[Callable[[], pb.SignedEnvelope], type[AgentError], str]

FAILURES: dict[str, FailureCase] = {
    # 1. well-formed envelope and a trusted signature
    "no_signature": (no_signatures, Unauthenticated, "malformed_envelope"),
    "more_than_max_signatures": (too_many_signatures, Unauthenticated, "malformed_envelope"),
    "keyid_over_256_bytes": (overlong_keyid, Unauthenticated, "malformed_envelope"),
    "unknown_keyid_only": (
        lambda: signed(signers=((KEY_C, KEYID_C),)),
        Unauthenticated,
        "unknown_key",
    ),
    "empty_keyid_only": (lambda: signed(signers=((KEY_A, ""),)), Unauthenticated, "unknown_key"),
    "valid_signature_under_unknown_label": (
        lambda: signed(signers=((KEY_A, "ed25519:ffffffffffffffff"),)),
        Unauthenticated,
        "unknown_key",
    ),
    "valid_signature_under_other_trusted_label": (
        lambda: signed(signers=((KEY_A, KEYID_B),)),
        Unauthenticated,
        "bad_signature",
    ),
    "garbage_signature": (garbage_signature, Unauthenticated, "bad_signature"),
    "truncated_signature": (truncated_signature, Unauthenticated, "bad_signature"),
    "payload_changed_after_signing": (tampered_payload, Unauthenticated, "bad_signature"),
    "payload_type_changed_after_signing": (
        tampered_payload_type,
        Unauthenticated,
        "bad_signature",
    ),
    # 2. payload_type exactly the RPC's
    "payload_type_of_other_rpc": (
        lambda: signed(payload_type="application/vnd.vicifast.agent.v1.RevokeRequest+proto"),
        InvalidArgument,
        "wrong_payload_type",
    ),
    "payload_type_case_differs": (
        lambda: signed(payload_type="application/vnd.vicifast.agent.v1.allowrequest+proto"),
        InvalidArgument,
        "wrong_payload_type",
    ),
    "payload_type_empty": (lambda: signed(payload_type=""), InvalidArgument, "wrong_payload_type"),
    # 3. parses as the message, has a header
    "payload_not_protobuf": (
        lambda: signed(b"\xff\xff\xff"),
        InvalidArgument,
        "unparsable_payload",
    ),
    "payload_string_not_utf8": (
        lambda: signed(b"\x0a\x04\x0a\x02\xc3\x28"),
        InvalidArgument,
        "unparsable_payload",
    ),
    "payload_without_header": (no_header, InvalidArgument, "missing_header"),
    "empty_payload": (lambda: signed(b""), InvalidArgument, "missing_header"),
    # 4. audience
    "other_agents_request": (
        lambda: signed(allow_payload(agent_id="dialer-02.example")),
        PermissionDenied,
        "wrong_agent",
    ),
    "agent_id_case_differs": (
        lambda: signed(allow_payload(agent_id=AGENT.upper())),
        PermissionDenied,
        "wrong_agent",
    ),
    "empty_agent_id": (lambda: signed(allow_payload(agent_id="")), PermissionDenied, "wrong_agent"),
    # 5. validity window
    "expires_before_issued": (
        lambda: signed(allow_payload(issued_at_unix_ms=NOW, expires_at_unix_ms=NOW - 1)),
        Unauthenticated,
        "invalid_window",
    ),
    "window_longer_than_max": (
        lambda: signed(allow_payload(expires_at_unix_ms=NOW + WINDOW + 1)),
        Unauthenticated,
        "window_too_long",
    ),
    "issued_beyond_skew_in_future": (
        lambda: signed(
            allow_payload(issued_at_unix_ms=NOW + SKEW + 1, expires_at_unix_ms=NOW + SKEW + 60_000)
        ),
        Unauthenticated,
        "request_not_yet_valid",
    ),
    "expired_beyond_skew": (
        lambda: signed(
            allow_payload(issued_at_unix_ms=NOW - 120_000, expires_at_unix_ms=NOW - SKEW)
        ),
        Unauthenticated,
        "request_expired",
    ),
    "header_times_missing": (
        lambda: signed(allow_payload(issued_at_unix_ms=0, expires_at_unix_ms=0)),
        Unauthenticated,
        "request_expired",
    ),
    # 6. request_id format
    "request_id_too_short": (
        lambda: signed(allow_payload(request_id="a" * 7)),
        InvalidArgument,
        "invalid_request_id",
    ),
    "request_id_too_long": (
        lambda: signed(allow_payload(request_id="a" * 65)),
        InvalidArgument,
        "invalid_request_id",
    ),
    "request_id_with_dot": (
        lambda: signed(allow_payload(request_id="req.0001abcd")),
        InvalidArgument,
        "invalid_request_id",
    ),
    "request_id_non_ascii": (
        lambda: signed(allow_payload(request_id="réq-0001abcd")),
        InvalidArgument,
        "invalid_request_id",
    ),
    "request_id_empty": (
        lambda: signed(allow_payload(request_id="")),
        InvalidArgument,
        "invalid_request_id",
    ),
    "request_id_reserved_local_prefix": (
        lambda: signed(allow_payload(request_id="local-0001abcd")),
        InvalidArgument,
        "invalid_request_id",
    ),
}


@pytest.mark.parametrize(("build", "error", "reason"), FAILURES.values(), ids=FAILURES.keys())
def test_each_failing_check_has_its_reason_and_error_class(
    build: Callable[[], pb.SignedEnvelope], error: type[AgentError], reason: str
) -> None:
    with pytest.raises(AgentError) as caught:
        open_allow(build())
    assert type(caught.value) is error
    assert caught.value.reason == reason


def test_reason_table_is_exactly_the_documented_set() -> None:
    assert {reason for _, _, reason in FAILURES.values()} == REASONS


# Two failures at once: the earlier check in the protocol's order wins.
PRECEDENCE: dict[str, FailureCase] = {
    "bad_signature_before_wrong_payload_type": (
        lambda: signed(
            payload_type="application/vnd.vicifast.agent.v1.SyncRequest+proto",
            signers=((KEY_C, KEYID_A),),
        ),
        Unauthenticated,
        "bad_signature",
    ),
    "unknown_key_before_unparsable_payload": (
        lambda: signed(b"\xff", signers=((KEY_C, KEYID_C),)),
        Unauthenticated,
        "unknown_key",
    ),
    "malformed_envelope_before_a_valid_signature": (
        lambda: signed(signers=((KEY_A, KEYID_A),) * (MAX_SIGNATURES + 1)),
        Unauthenticated,
        "malformed_envelope",
    ),
    "trusted_label_with_bad_signature_beats_unknown_label": (
        lambda: signed(signers=((KEY_C, KEYID_C), (KEY_C, KEYID_A))),
        Unauthenticated,
        "bad_signature",
    ),
    "wrong_payload_type_before_unparsable_payload": (
        lambda: signed(b"\xff", payload_type="application/vnd.vicifast.agent.v1.X+proto"),
        InvalidArgument,
        "wrong_payload_type",
    ),
    "wrong_agent_before_expired": (
        lambda: signed(
            allow_payload(agent_id="dialer-02", issued_at_unix_ms=1, expires_at_unix_ms=2)
        ),
        PermissionDenied,
        "wrong_agent",
    ),
    "wrong_agent_before_invalid_request_id": (
        lambda: signed(allow_payload(agent_id="dialer-02", request_id="x")),
        PermissionDenied,
        "wrong_agent",
    ),
    "expired_before_invalid_request_id": (
        lambda: signed(
            allow_payload(issued_at_unix_ms=1, expires_at_unix_ms=2, request_id="bad id")
        ),
        Unauthenticated,
        "request_expired",
    ),
    "not_yet_valid_before_invalid_request_id": (
        lambda: signed(
            allow_payload(
                issued_at_unix_ms=NOW + 3_600_000,
                expires_at_unix_ms=NOW + 3_660_000,
                request_id="x",
            )
        ),
        Unauthenticated,
        "request_not_yet_valid",
    ),
    "inverted_window_before_clock": (
        lambda: signed(allow_payload(issued_at_unix_ms=NOW + 3_600_000, expires_at_unix_ms=5)),
        Unauthenticated,
        "invalid_window",
    ),
    "window_too_long_before_clock": (
        lambda: signed(allow_payload(issued_at_unix_ms=1, expires_at_unix_ms=1 + WINDOW + 1)),
        Unauthenticated,
        "window_too_long",
    ),
}


@pytest.mark.parametrize(("build", "error", "reason"), PRECEDENCE.values(), ids=PRECEDENCE.keys())
def test_first_failing_check_wins(
    build: Callable[[], pb.SignedEnvelope], error: type[AgentError], reason: str
) -> None:
    with pytest.raises(AgentError) as caught:
        open_allow(build())
    assert type(caught.value) is error
    assert caught.value.reason == reason


# Window edges are inclusive where PROTOCOL.md says <= / >.
ACCEPTED_HEADERS = {
    "issued_exactly_skew_in_future": {
        "issued_at_unix_ms": NOW + SKEW,
        "expires_at_unix_ms": NOW + SKEW + 1,
    },
    "expires_one_ms_inside_skew": {
        "issued_at_unix_ms": NOW - 60_000,
        "expires_at_unix_ms": NOW - SKEW + 1,
    },
    "window_exactly_max": {"issued_at_unix_ms": NOW, "expires_at_unix_ms": NOW + WINDOW},
    "zero_length_window": {"issued_at_unix_ms": NOW, "expires_at_unix_ms": NOW},
    "request_id_8_chars": {"request_id": "Ab3_-xyz"},
    "request_id_64_chars": {"request_id": "A" * 64},
    "request_id_local_inside": {"request_id": "not-local-0001"},
}


@pytest.mark.parametrize("overrides", ACCEPTED_HEADERS.values(), ids=ACCEPTED_HEADERS.keys())
def test_header_at_the_edges_is_accepted(overrides: dict[str, object]) -> None:
    opened = open_allow(signed(allow_payload(**overrides)))
    assert opened.header.request_id == opened.message.header.request_id


def test_opened_request_carries_message_bytes_digest_keyid_and_header() -> None:
    payload = allow_payload()
    opened = open_allow(signed(payload))
    assert opened.message == pb.AllowRequest.FromString(payload)
    assert opened.payload == payload
    assert opened.payload_sha256 == hashlib.sha256(payload).digest()
    assert opened.payload_type == ALLOW_TYPE
    assert opened.keyid == KEYID_A
    assert opened.header == RequestHeader(
        agent_id=AGENT,
        request_id=REQUEST_ID,
        issued_at_ms=NOW,
        expires_at_ms=NOW + 60_000,
    )


@pytest.mark.parametrize(
    "message_type", [pb.AllowRequest, pb.RevokeRequest, pb.SyncRequest, pb.EraseRequest]
)
def test_each_rpc_accepts_only_its_own_payload_type(message_type: type[pb.AllowRequest]) -> None:
    payload = message_type(header=header()).SerializeToString()
    own = signed(payload, payload_type=payload_type_for(message_type))
    assert open_envelope(own, message_type, POLICY, NOW).message.header.agent_id == AGENT
    for other in (pb.AllowRequest, pb.RevokeRequest, pb.SyncRequest, pb.EraseRequest):
        if other is not message_type:
            with pytest.raises(InvalidArgument) as caught:
                open_envelope(own, other, POLICY, NOW)  # type: ignore[type-var]
            assert caught.value.reason == "wrong_payload_type"


# ---------------------------------------------------------------------------------------------
# Key ids and rotation


ROTATION = {
    "old_key_only": (((KEY_A, KEYID_A),), KEYID_A),
    "new_key_only": (((KEY_B, KEYID_B),), KEYID_B),
    "both_keys_first_wins": (((KEY_B, KEYID_B), (KEY_A, KEYID_A)), KEYID_B),
    "retired_key_then_new_key": (((KEY_C, KEYID_C), (KEY_B, KEYID_B)), KEYID_B),
    "bad_signature_then_good_one": (((KEY_C, KEYID_A), (KEY_B, KEYID_B)), KEYID_B),
    "empty_keyid_skipped": (((KEY_A, ""), (KEY_A, KEYID_A)), KEYID_A),
}


@pytest.mark.parametrize(("signers", "keyid"), ROTATION.values(), ids=ROTATION.keys())
def test_any_signature_verifying_under_the_key_it_names_authenticates(
    signers: tuple[tuple[Ed25519PrivateKey, str], ...], keyid: str
) -> None:
    assert open_allow(signed(signers=signers)).keyid == keyid


def test_key_removed_from_trust_no_longer_authenticates() -> None:
    only_b = TrustPolicy(AGENT, {KEYID_B: KEY_B.public_key()})
    with pytest.raises(Unauthenticated) as caught:
        open_envelope(signed(signers=((KEY_A, KEYID_A),)), pb.AllowRequest, only_b, NOW)
    assert caught.value.reason == "unknown_key"


def test_policy_may_name_keys_freely() -> None:
    policy = TrustPolicy(AGENT, {"cp-2025": KEY_C.public_key()})
    envelope = signed(signers=((KEY_C, "cp-2025"),))
    assert open_envelope(envelope, pb.AllowRequest, policy, NOW).keyid == "cp-2025"


def test_no_trusted_keys_means_nothing_authenticates() -> None:
    with pytest.raises(Unauthenticated) as caught:
        open_envelope(signed(), pb.AllowRequest, TrustPolicy(AGENT, {}), NOW)
    assert caught.value.reason == "unknown_key"


# ---------------------------------------------------------------------------------------------
# Exact bytes


def reordered_payload() -> bytes:
    """The same AllowRequest as ``allow_payload()``, entries before header: other bytes."""
    entries_only = pb.AllowRequest()
    entries_only.entries.add(address="198.51.100.7", ttl_seconds=3600, subject="agent007")
    header_only = pb.AllowRequest(header=header())
    return entries_only.SerializeToString() + header_only.SerializeToString()


def test_semantically_equal_reserialization_does_not_verify() -> None:
    canonical, reordered = allow_payload(), reordered_payload()
    assert canonical != reordered
    assert pb.AllowRequest.FromString(canonical) == pb.AllowRequest.FromString(reordered)
    envelope = signed(canonical)
    envelope.payload = reordered
    with pytest.raises(Unauthenticated) as caught:
        open_allow(envelope)
    assert caught.value.reason == "bad_signature"


def test_signature_over_the_received_bytes_verifies_and_they_are_kept_as_received() -> None:
    reordered = reordered_payload()
    opened = open_allow(signed(reordered))
    assert opened.payload == reordered
    assert opened.payload_sha256 == hashlib.sha256(reordered).digest()
    assert opened.message == pb.AllowRequest.FromString(allow_payload())


def test_unknown_fields_in_a_signed_payload_are_covered_and_ignored() -> None:
    payload = allow_payload() + b"\xa0\x06\x01"  # field 100, varint 1
    opened = open_allow(signed(payload))
    assert opened.payload == payload
    assert opened.message.header.request_id == REQUEST_ID


# ---------------------------------------------------------------------------------------------
# PAE and payload types

# RFC 8032 section 7.1, TEST 1 key; signature cross-checked with `openssl pkeyutl -sign -rawin`.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
HELLO_SIG = bytes.fromhex(
    "e031d7dd99f8aa904abc48fb99a13c3bdbbd6e35c49cf2cb9f25d5509d8f5c94"
    "7c0d22dc2f7403a45bdf24e8f7a41fd23c7b25e898386e8c6c31be8abee60007"
)

PAE_VECTORS = {
    # The DSSE specification's own example.
    "dsse_spec_example": (
        "http://example.com/HelloWorld",
        b"hello world",
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world",
    ),
    "empty_type_and_body": ("", b"", b"DSSEv1 0  0 "),
    "type_length_counts_utf8_bytes": ("\u00e9", b"", b"DSSEv1 2 \xc3\xa9 0 "),
    "body_is_binary_and_embedded_verbatim": ("t", b"\x00 \n", b"DSSEv1 1 t 3 \x00 \n"),
    "lengths_without_leading_zeros": (
        "a" * 10,
        b"b" * 100,
        b"DSSEv1 10 " + b"a" * 10 + b" 100 " + b"b" * 100,
    ),
}


@pytest.mark.parametrize(
    ("ptype", "body", "expected"), PAE_VECTORS.values(), ids=PAE_VECTORS.keys()
)
def test_pae_matches_the_dsse_v1_encoding(ptype: str, body: bytes, expected: bytes) -> None:
    assert pae(ptype, body) == expected


def test_signature_is_ed25519_over_the_pae_known_answer() -> None:
    key = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED)
    envelope = sign_payload("http://example.com/HelloWorld", b"hello world", [(key, "k")])
    assert envelope.signatures[0].sig == HELLO_SIG


@pytest.mark.parametrize(
    ("message_type", "expected"),
    [
        (pb.AllowRequest, "application/vnd.vicifast.agent.v1.AllowRequest+proto"),
        (pb.RevokeRequest, "application/vnd.vicifast.agent.v1.RevokeRequest+proto"),
        (pb.SyncRequest, "application/vnd.vicifast.agent.v1.SyncRequest+proto"),
        (pb.EraseRequest, "application/vnd.vicifast.agent.v1.EraseRequest+proto"),
    ],
)
def test_payload_type_names_the_request_message(
    message_type: type[pb.AllowRequest], expected: str
) -> None:
    assert payload_type_for(message_type) == expected


def test_only_signed_requests_have_a_payload_type() -> None:
    with pytest.raises(TypeError):
        payload_type_for(pb.GetStateRequest)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Values


def test_trust_policy_is_a_snapshot_of_the_keys() -> None:
    keys = {KEYID_A: KEY_A.public_key()}
    policy = TrustPolicy(AGENT, keys)
    keys[KEYID_B] = KEY_B.public_key()
    assert policy.keyids == (KEYID_A,)
    with pytest.raises(TypeError):
        policy.trusted_keys[KEYID_B] = KEY_B.public_key()  # type: ignore[index]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"agent_id": "", "trusted_keys": {}},
        {"agent_id": AGENT, "trusted_keys": {"": KEY_A.public_key()}},
        {"agent_id": AGENT, "trusted_keys": {"k" * 257: KEY_A.public_key()}},
        {"agent_id": AGENT, "trusted_keys": {}, "clock_skew_ms": -1},
        {"agent_id": AGENT, "trusted_keys": {}, "max_window_ms": -1},
    ],
)
def test_trust_policy_refuses_unusable_settings(kwargs: dict[str, object]) -> None:
    # A programming/config error, not a request outcome: it has no reason word to match.
    with pytest.raises(ValueError):  # noqa: PT011
        TrustPolicy(**kwargs)  # type: ignore[arg-type]


def test_trust_policy_refuses_a_private_key_as_trusted_key() -> None:
    with pytest.raises(TypeError):
        TrustPolicy(AGENT, {KEYID_A: KEY_A})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("request_id", "ok"),
    [
        ("abcdefgh", True),
        ("A-b_C-d_" * 8, True),
        ("abcdefg", False),
        ("a" * 65, False),
        ("abcd efgh", False),
        ("abcdefgh\n", False),
        ("local-abc", False),
        ("Local-abc", True),
    ],
)
def test_request_id_format(request_id: str, ok: bool) -> None:
    if ok:
        assert check_request_id(request_id) == request_id
    else:
        with pytest.raises(InvalidArgument) as caught:
            check_request_id(request_id)
        assert caught.value.reason == "invalid_request_id"


def test_request_header_value_cannot_hold_an_inverted_window() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        RequestHeader(AGENT, REQUEST_ID, issued_at_ms=2, expires_at_ms=1)
