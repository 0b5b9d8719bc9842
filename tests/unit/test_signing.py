"""The signing side: key ids, key formats, header and envelope building, config trust."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import parse_config
from agent.errors import ConfigError
from agent.rpc.envelope import (
    SignedRequest,
    TrustPolicy,
    check_request_id,
    open_envelope,
    pae,
    payload_type_for,
)
from agent.rpc.pb import agent_pb2 as pb
from agent.rpc.signing import (
    keyid_for,
    make_header,
    new_request_id,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_b64,
    public_key_to_b64,
    sign_envelope,
    sign_payload,
    trust_policy_from_config,
    trusted_keys_from_config,
)

AGENT = "dialer-01.example"
NOW = 1_700_000_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
RAW_PUBLIC = KEY.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw
)


def test_keyid_is_prefix_and_first_16_hex_of_sha256_of_raw_public_key() -> None:
    keyid = keyid_for(KEY.public_key())
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", keyid)
    assert keyid == "ed25519:" + hashlib.sha256(RAW_PUBLIC).hexdigest()[:16]


def test_different_keys_have_different_keyids() -> None:
    other = Ed25519PrivateKey.generate().public_key()
    assert keyid_for(other) != keyid_for(KEY.public_key())


def test_public_key_base64_is_the_raw_32_bytes_and_round_trips() -> None:
    text = public_key_to_b64(KEY.public_key())
    assert base64.b64decode(text) == RAW_PUBLIC
    assert keyid_for(public_key_from_b64(text)) == keyid_for(KEY.public_key())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(RAW_PUBLIC[:31]).decode(),
        base64.b64encode(RAW_PUBLIC + b"\x00").decode(),
        base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # urlsafe alphabet is not accepted
    ],
    ids=["empty", "junk", "31_bytes", "33_bytes", "urlsafe_alphabet"],
)
def test_public_key_from_b64_refuses_what_is_not_a_raw_key(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - codec errors carry no reason word
        public_key_from_b64(text)


def test_private_key_pem_round_trips_and_tolerates_a_leading_comment() -> None:
    pem = private_key_to_pem(KEY)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = private_key_from_pem(b"# DEV/TEST ONLY\n" + pem)
    message = pae("t", b"body")
    KEY.public_key().verify(loaded.sign(message), message)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    ],
    ids=["empty", "corrupt", "ecdsa_key"],
)
def test_private_key_from_pem_refuses_anything_but_an_ed25519_key(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - codec errors carry no reason word
        private_key_from_pem(data)


def test_new_request_ids_are_well_formed_and_distinct() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for request_id in ids:
        assert check_request_id(request_id) == request_id


def test_make_header_sets_audience_and_window_from_the_given_clock() -> None:
    header = make_header(AGENT, NOW, request_id="req-00000001", valid_for_ms=60_000)
    assert header == pb.RequestHeader(
        agent_id=AGENT,
        request_id="req-00000001",
        issued_at_unix_ms=NOW,
        expires_at_unix_ms=NOW + 60_000,
    )
    assert check_request_id(make_header(AGENT, NOW).request_id)


SIGNED_MESSAGES: list[SignedRequest] = [
    pb.AllowRequest(entries=[pb.AllowEntry(address="198.51.100.7")]),
    pb.RevokeRequest(subject="agent007"),
    pb.SyncRequest(),
    pb.EraseRequest(subject="agent007"),
]


@pytest.mark.parametrize("message", SIGNED_MESSAGES, ids=lambda m: type(m).__name__)
def test_signed_envelope_opens_on_the_agent(message: SignedRequest) -> None:
    message.header.CopyFrom(make_header(AGENT, NOW))
    envelope = sign_envelope(message, KEY)
    assert envelope.payload_type == payload_type_for(type(message))
    assert [s.keyid for s in envelope.signatures] == [keyid_for(KEY.public_key())]
    policy = TrustPolicy(AGENT, {keyid_for(KEY.public_key()): KEY.public_key()})
    opened = open_envelope(envelope, type(message), policy, NOW)  # type: ignore[type-var]
    assert opened.message == message
    assert opened.payload == envelope.payload


def test_sign_envelope_uses_the_given_keyid_and_deterministic_bytes() -> None:
    message = pb.AllowRequest(header=make_header(AGENT, NOW, request_id="req-00000001"))
    first = sign_envelope(message, KEY, "cp-2025")
    second = sign_envelope(message, KEY, "cp-2025")
    assert first.signatures[0].keyid == "cp-2025"
    assert first == second  # Ed25519 and deterministic serialization: same input, same bytes
    assert first.payload == message.SerializeToString(deterministic=True)


def test_sign_payload_adds_one_signature_per_signer_over_the_pae() -> None:
    other = Ed25519PrivateKey.generate()
    envelope = sign_payload("some/type", b"\x01\x02", [(KEY, "old"), (other, "new")])
    assert [s.keyid for s in envelope.signatures] == ["old", "new"]
    message = pae("some/type", b"\x01\x02")
    KEY.public_key().verify(envelope.signatures[0].sig, message)
    other.public_key().verify(envelope.signatures[1].sig, message)


def test_sign_envelope_refuses_unsigned_message_types() -> None:
    with pytest.raises(TypeError):
        sign_envelope(pb.GetStateRequest(), KEY)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# From configuration


def test_trust_policy_from_config_uses_agent_id_keys_and_tolerances_in_ms() -> None:
    keyid = keyid_for(KEY.public_key())
    config = parse_config(
        f'agent_id = "{AGENT}"\n'
        "[signing]\nclock_skew_s = 10\nmax_window_s = 60\n"
        "[signing.trusted_keys]\n"
        f'"{keyid}" = "{public_key_to_b64(KEY.public_key())}"\n'
    )
    policy = trust_policy_from_config(config)
    assert policy.agent_id == AGENT
    assert policy.keyids == (keyid,)
    assert (policy.clock_skew_ms, policy.max_window_ms) == (10_000, 60_000)
    header = make_header(AGENT, NOW, valid_for_ms=60_000)
    envelope = sign_envelope(pb.EraseRequest(header=header, subject="x"), KEY)
    assert open_envelope(envelope, pb.EraseRequest, policy, NOW).keyid == keyid


def test_a_trusted_key_that_is_not_a_key_is_a_config_error_naming_it() -> None:
    good = public_key_to_b64(KEY.public_key())
    with pytest.raises(ConfigError) as caught:
        trusted_keys_from_config([("good", good), ("cp-2025", "dG9vIHNob3J0")])
    assert caught.value.reason == "invalid_config"
    assert caught.value.key == 'signing.trusted_keys."cp-2025"'
