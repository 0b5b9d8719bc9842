"""Signing side of the envelope and the Ed25519 key codecs both sides share.

Owns building and signing ``SignedEnvelope`` s (the control-plane client and tests use it), key-id
derivation, the PEM/base64 key formats, and turning the config's trusted keys into a
``TrustPolicy``. Pure: bytes in, bytes out; it reads no file and no clock (``now_ms`` is passed
in). Verification lives in ``agent.rpc.envelope``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.rpc.envelope import (
    SignedRequest,
    TrustPolicy,
    pae,
    payload_type_for,
)
from agent.rpc.pb import agent_pb2
from agent.state import is_local

__all__ = [
    "DEFAULT_VALIDITY_MS",
    "KEYID_PREFIX",
    "keyid_for",
    "make_header",
    "new_request_id",
    "private_key_from_pem",
    "private_key_to_pem",
    "public_key_from_b64",
    "public_key_to_b64",
    "sign_envelope",
    "sign_payload",
    "trust_policy_from_config",
    "trusted_keys_from_config",
]

KEYID_PREFIX = "ed25519:"
# Long enough for a retry or two against a lagging agent, well inside the default 300 s window.
DEFAULT_VALIDITY_MS = 120_000
_RAW_PUBLIC_KEY_BYTES = 32


def keyid_for(public_key: Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    return KEYID_PREFIX + hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in standard base64: the config's ``[signing.trusted_keys]``."""
    return base64.b64encode(_raw(public_key)).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a standard-base64 raw Ed25519 public key; ``ValueError`` if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc
    if len(raw) != _RAW_PUBLIC_KEY_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes; an Ed25519 public key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def private_key_to_pem(private_key: Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``); store it mode 0600."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """Parse an unencrypted PEM private key; ``ValueError`` unless it is Ed25519."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"a {type(key).__name__} is not an Ed25519 private key")
    return key


def trusted_keys_from_config(pairs: Iterable[tuple[str, str]]) -> dict[str, Ed25519PublicKey]:
    """Decode ``[signing.trusted_keys]`` (key id, base64) pairs; ``ConfigError`` naming the key."""
    keys: dict[str, Ed25519PublicKey] = {}
    for keyid, text in pairs:
        try:
            keys[keyid] = public_key_from_b64(text)
        except ValueError as exc:
            raise ConfigError(
                f'signing.trusted_keys."{keyid}"',
                f"{exc}; expected the raw 32-byte Ed25519 public key in base64",
            ) from exc
    return keys


def trust_policy_from_config(config: AgentConfig) -> TrustPolicy:
    """The verification policy a configuration asks for (built at start and on every reload)."""
    return TrustPolicy(
        agent_id=config.agent_id,
        trusted_keys=trusted_keys_from_config(config.signing.trusted_keys),
        clock_skew_ms=config.signing.clock_skew_s * 1000,
        max_window_ms=config.signing.max_window_s * 1000,
    )


def new_request_id() -> str:
    """A fresh random request id: 24 characters of ``[A-Za-z0-9_-]`` (144 bits)."""
    while True:
        request_id = secrets.token_urlsafe(18)
        if not is_local(request_id):
            return request_id


def make_header(
    agent_id: str,
    now_ms: int,
    *,
    request_id: str | None = None,
    valid_for_ms: int = DEFAULT_VALIDITY_MS,
) -> agent_pb2.RequestHeader:
    """A header for ``agent_id`` issued at ``now_ms`` and valid for ``valid_for_ms``."""
    return agent_pb2.RequestHeader(
        agent_id=agent_id,
        request_id=new_request_id() if request_id is None else request_id,
        issued_at_unix_ms=now_ms,
        expires_at_unix_ms=now_ms + valid_for_ms,
    )


def sign_payload(
    payload_type: str,
    payload: bytes,
    signers: Iterable[tuple[Ed25519PrivateKey, str]],
) -> agent_pb2.SignedEnvelope:
    """Sign exact ``payload`` bytes under ``payload_type`` with each (private key, keyid).

    Several signers give one envelope several signatures (key rotation). Tests use this to sign
    arbitrary bytes or a deliberately wrong type.
    """
    message = pae(payload_type, payload)
    envelope = agent_pb2.SignedEnvelope(payload_type=payload_type, payload=payload)
    for private_key, keyid in signers:
        envelope.signatures.add(keyid=keyid, sig=private_key.sign(message))
    return envelope


def sign_envelope(
    message: SignedRequest,
    private_key: Ed25519PrivateKey,
    keyid: str | None = None,
) -> agent_pb2.SignedEnvelope:
    """Serialize ``message`` and sign it; ``keyid`` defaults to ``keyid_for`` of the key.

    The payload type follows from the message's type.
    """
    if keyid is None:
        keyid = keyid_for(private_key.public_key())
    payload = message.SerializeToString(deterministic=True)
    return sign_payload(payload_type_for(type(message)), payload, [(private_key, keyid)])


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
