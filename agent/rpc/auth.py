"""Caller identity from the mTLS peer certificate, and the allow-list check.

The TLS layer already proved the chain to the client CA (a caller without a valid certificate
never reaches a handler); this module only decides whether that identity may call. Every
servicer, the health service included, calls ``CallerPolicy.identify`` first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.errors import PermissionDenied, Unauthenticated


@functools.lru_cache(maxsize=64)
def certificate_identities(pem: bytes) -> tuple[str, ...]:
    """URI SANs first, then the subject CN: the names a configured identity may match.

    Cached by the certificate's bytes: every call of a connection presents the same one, and
    parsing it each time is a tenth of a millisecond per call.
    """
    cert = x509.load_pem_x509_certificate(pem)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        pass
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(names)


class PeerContext(Protocol):
    """The part of a gRPC servicer context (plain or asyncio) that names the TLS peer."""

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def presented_identity(context: PeerContext) -> str:
    """The first identity the peer's certificate names, allowed or not, for logs of refusals
    (a control plane's machine identity, never a person's)."""
    pems = [
        bytes(p) for p in context.auth_context().get("x509_pem_cert", ()) if isinstance(p, bytes)
    ]
    names = certificate_identities(pems[0]) if pems else ()
    return names[0] if names else "(none)"


class CallerPolicy:
    """Which verified client identities may call; replaced whole on reload."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)

    def identify(self, context: PeerContext) -> str:
        """The caller's identity, or ``PermissionDenied`` when it is not allowed."""
        auth = context.auth_context()
        pems = [bytes(p) for p in auth.get("x509_pem_cert", ()) if isinstance(p, bytes)]
        if not pems:
            # Only reachable over a non-TLS transport, which the server never opens.
            raise Unauthenticated("no_client_certificate", "a client certificate is required")
        names = certificate_identities(pems[0])
        if not self.allowed:
            return names[0] if names else "(anonymous)"
        for name in names:
            if name in self.allowed:
                return name
        raise PermissionDenied(
            "caller_not_allowed", f"identity {', '.join(names) or '(none)'} is not allowed"
        )
