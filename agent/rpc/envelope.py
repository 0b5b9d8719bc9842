"""Opens signed requests: DSSE v1 PAE, Ed25519 verification over the received bytes, header checks.

Owns steps 1-6 of PROTOCOL.md "Order of checks" and nothing after them (replay, field validation,
caps and ordering are later stages). Pure: no I/O, no grpc, no clock (``now_ms`` is passed in);
it never re-serializes a payload and never parses one before a trusted signature verified it.

Reason words, in the order the checks run (the first failure wins):

=====================  ==================  ==================================================
reason                 error               when
=====================  ==================  ==================================================
malformed_envelope     Unauthenticated     no signature, more than ``MAX_SIGNATURES``, or a
                                           keyid longer than ``MAX_KEYID_BYTES``
unknown_key            Unauthenticated     no signature names a trusted key (empty or unknown
                                           keyids only)
bad_signature          Unauthenticated     some signature names a trusted key, none verifies
wrong_payload_type     InvalidArgument     ``payload_type`` is not exactly the RPC's type
unparsable_payload     InvalidArgument     the payload does not parse as the RPC's message
missing_header         InvalidArgument     the message has no ``header``
wrong_agent            PermissionDenied    ``header.agent_id`` is not this agent's id
invalid_window         Unauthenticated     ``expires_at < issued_at``
window_too_long        Unauthenticated     ``expires_at - issued_at`` above the maximum window
request_not_yet_valid  Unauthenticated     ``issued_at > now + skew``
request_expired        Unauthenticated     ``expires_at <= now - skew``
invalid_request_id     InvalidArgument     not 8..64 of ``[A-Za-z0-9_-]``, or begins with the
                                           ``local-`` prefix reserved for on-host grants
=====================  ==================  ==================================================

Within the window check the shape of the window (inverted, too long) is judged before the
clock, so a malformed window gets the same answer whatever the agent's time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from agent.errors import InvalidArgument, PermissionDenied, Unauthenticated
from agent.rpc.pb import agent_pb2
from agent.state import LOCAL_PREFIX, is_local

__all__ = [
    "MAX_KEYID_BYTES",
    "MAX_SIGNATURES",
    "PAYLOAD_TYPE_PREFIX",
    "PAYLOAD_TYPE_SUFFIX",
    "REASONS",
    "SIGNED_REQUEST_TYPES",
    "OpenedRequest",
    "RequestHeader",
    "SignedRequest",
    "SignedRequestT",
    "TrustPolicy",
    "check_header",
    "check_request_id",
    "open_envelope",
    "pae",
    "payload_type_for",
    "verify_signatures",
]

PAYLOAD_TYPE_PREFIX: Final = "application/vnd.vicifast.agent.v1."
PAYLOAD_TYPE_SUFFIX: Final = "+proto"
# Caps on the envelope itself: they bound the verification work one request can demand.
MAX_SIGNATURES: Final = 8
MAX_KEYID_BYTES: Final = 256
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")

REASONS: Final = frozenset(
    {
        "malformed_envelope",
        "unknown_key",
        "bad_signature",
        "wrong_payload_type",
        "unparsable_payload",
        "missing_header",
        "wrong_agent",
        "invalid_window",
        "window_too_long",
        "request_not_yet_valid",
        "request_expired",
        "invalid_request_id",
    }
)

SignedRequest = (
    agent_pb2.AllowRequest
    | agent_pb2.RevokeRequest
    | agent_pb2.SyncRequest
    | agent_pb2.EraseRequest
)
SignedRequestT = TypeVar(
    "SignedRequestT",
    agent_pb2.AllowRequest,
    agent_pb2.RevokeRequest,
    agent_pb2.SyncRequest,
    agent_pb2.EraseRequest,
)
SIGNED_REQUEST_TYPES: Final[tuple[type[SignedRequest], ...]] = (
    agent_pb2.AllowRequest,
    agent_pb2.RevokeRequest,
    agent_pb2.SyncRequest,
    agent_pb2.EraseRequest,
)


def payload_type_for(message_type: type[SignedRequest]) -> str:
    """``application/vnd.vicifast.agent.v1.<Message>+proto`` for one of the signed requests."""
    if message_type not in SIGNED_REQUEST_TYPES:
        raise TypeError(f"{message_type.__name__} is not a signed request message")
    return f"{PAYLOAD_TYPE_PREFIX}{message_type.DESCRIPTOR.name}{PAYLOAD_TYPE_SUFFIX}"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what each signature is computed over.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with LEN the byte length in ASCII
    decimal; the type is measured and embedded as UTF-8.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def check_request_id(request_id: str) -> str:
    """Return ``request_id`` if it is well-formed, else raise ``invalid_request_id``."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            "invalid_request_id", f"{request_id[:80]!r} is not 8..64 characters of [A-Za-z0-9_-]"
        )
    if is_local(request_id):
        # Local (on-host) grants carry this prefix in state and events: a signed request with
        # it could pass for one.
        raise InvalidArgument(
            "invalid_request_id",
            f"request ids beginning with {LOCAL_PREFIX!r} are reserved for local grants",
        )
    return request_id


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """A checked request header: the audience matched, the window was valid when it arrived."""

    agent_id: str
    request_id: str
    issued_at_ms: int
    expires_at_ms: int

    def __post_init__(self) -> None:
        check_request_id(self.request_id)
        if self.expires_at_ms < self.issued_at_ms:
            raise ValueError("a RequestHeader's window cannot end before it starts")


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """What a signed request must satisfy on this agent: whose keys, which audience, what time.

    ``trusted_keys`` maps key id to public key; it is copied into a read-only mapping, so a policy
    is a snapshot (a reload builds a new one).
    """

    agent_id: str
    trusted_keys: Mapping[str, Ed25519PublicKey]
    clock_skew_ms: int = 30_000
    max_window_ms: int = 300_000

    def __post_init__(self) -> None:
        if not self.agent_id:
            raise ValueError("agent_id must not be empty")
        if self.clock_skew_ms < 0 or self.max_window_ms < 0:
            raise ValueError("clock_skew_ms and max_window_ms must not be negative")
        keys = dict(self.trusted_keys)
        for keyid, key in keys.items():
            # An empty or over-long keyid could never be named by an acceptable signature.
            if not keyid or len(keyid.encode("utf-8")) > MAX_KEYID_BYTES:
                raise ValueError(f"trusted key id {keyid[:80]!r} is empty or too long")
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"trusted key {keyid!r} is not an Ed25519 public key")
        object.__setattr__(self, "trusted_keys", MappingProxyType(keys))

    @property
    def keyids(self) -> tuple[str, ...]:
        """The trusted key ids, sorted (what GetState reports)."""
        return tuple(sorted(self.trusted_keys))


@dataclass(frozen=True, slots=True)
class OpenedRequest(Generic[SignedRequestT]):
    """A request that passed steps 1-6: authentic, for this RPC, for this agent, in its window.

    ``payload`` is the exact signed bytes and ``payload_sha256`` their digest (replay protection
    compares it); ``keyid`` names the trusted key whose signature verified first.
    """

    message: SignedRequestT
    header: RequestHeader
    payload_type: str
    payload: bytes
    payload_sha256: bytes
    keyid: str


def verify_signatures(
    envelope: agent_pb2.SignedEnvelope, trusted_keys: Mapping[str, Ed25519PublicKey]
) -> str:
    """Step 1: return the key id of the first signature that verifies under a trusted key.

    A signature is tried only against the key its own keyid names; empty and unknown keyids are
    skipped. Raises ``Unauthenticated`` (``malformed_envelope``, ``unknown_key``,
    ``bad_signature``).
    """
    signatures = envelope.signatures
    if not signatures:
        raise Unauthenticated("malformed_envelope", "the envelope carries no signature")
    if len(signatures) > MAX_SIGNATURES:
        raise Unauthenticated(
            "malformed_envelope",
            f"{len(signatures)} signatures, at most {MAX_SIGNATURES} accepted",
        )
    for signature in signatures:
        if len(signature.keyid.encode("utf-8")) > MAX_KEYID_BYTES:
            raise Unauthenticated(
                "malformed_envelope", f"a keyid is longer than {MAX_KEYID_BYTES} bytes"
            )
    message = pae(envelope.payload_type, envelope.payload)
    named_trusted_key = False
    for signature in signatures:
        key = trusted_keys.get(signature.keyid) if signature.keyid else None
        if key is None:
            continue
        named_trusted_key = True
        try:
            key.verify(signature.sig, message)
        except InvalidSignature:
            continue
        return signature.keyid
    if named_trusted_key:
        raise Unauthenticated("bad_signature", "no signature verifies under the key it names")
    raise Unauthenticated(
        "unknown_key", "no signature names a trusted key id (see GetState.trusted_keyids)"
    )


def check_header(
    header: agent_pb2.RequestHeader, policy: TrustPolicy, now_ms: int
) -> RequestHeader:
    """Steps 4-6: audience, validity window, request id format."""
    if header.agent_id != policy.agent_id:
        raise PermissionDenied(
            "wrong_agent",
            f"request is for agent {header.agent_id[:80]!r}, this is {policy.agent_id!r}",
        )
    issued, expires = header.issued_at_unix_ms, header.expires_at_unix_ms
    if expires < issued:
        raise Unauthenticated(
            "invalid_window", f"expires_at {expires} is before issued_at {issued}"
        )
    if expires - issued > policy.max_window_ms:
        raise Unauthenticated(
            "window_too_long",
            f"window of {expires - issued} ms exceeds the maximum of {policy.max_window_ms} ms",
        )
    if issued > now_ms + policy.clock_skew_ms:
        raise Unauthenticated(
            "request_not_yet_valid",
            f"issued_at {issued} is more than {policy.clock_skew_ms} ms after now ({now_ms})",
        )
    if expires <= now_ms - policy.clock_skew_ms:
        raise Unauthenticated(
            "request_expired",
            f"expired at {expires}; now is {now_ms} (skew allowance {policy.clock_skew_ms} ms)",
        )
    return RequestHeader(
        agent_id=header.agent_id,
        request_id=check_request_id(header.request_id),
        issued_at_ms=issued,
        expires_at_ms=expires,
    )


def open_envelope(
    envelope: agent_pb2.SignedEnvelope,
    message_type: type[SignedRequestT],
    policy: TrustPolicy,
    now_ms: int,
) -> OpenedRequest[SignedRequestT]:
    """Run steps 1-6 on an envelope that arrived on the RPC taking ``message_type``.

    Raises the ``AgentError`` of the first failing check (see the module docstring).
    """
    keyid = verify_signatures(envelope, policy.trusted_keys)
    expected_type = payload_type_for(message_type)
    if envelope.payload_type != expected_type:
        raise InvalidArgument(
            "wrong_payload_type",
            f"got {envelope.payload_type[:200]!r}, this RPC takes {expected_type!r}",
        )
    payload = envelope.payload
    try:
        message = message_type.FromString(payload)
    except DecodeError as exc:
        raise InvalidArgument(
            "unparsable_payload", f"payload is not a valid {message_type.DESCRIPTOR.name}"
        ) from exc
    if not message.HasField("header"):
        raise InvalidArgument("missing_header", "the request carries no header")
    header = check_header(message.header, policy, now_ms)
    return OpenedRequest(
        message=message,
        header=header,
        payload_type=expected_type,
        payload=payload,
        payload_sha256=hashlib.sha256(payload).digest(),
        keyid=keyid,
    )
