"""Frozen value types shared by every layer: addresses, allow entries, kernel elements.

Values validate in their constructor, so an invalid one cannot exist; this module does no I/O
and knows nothing of configuration (``agent.policy`` turns untrusted text into these values).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field

from agent.errors import InvalidArgument

SUBJECT_MAX_CHARS = 64
ELEMENT_COMMENT_MAX_BYTES = 128
# Unicode categories a subject must not contain: controls, format characters, line and paragraph
# separators (PROTOCOL.md "Subject"), plus lone surrogates, which have no UTF-8 encoding at all
# (protobuf never delivers one; the local socket might). Quotes and ';' are ordinary text.
FORBIDDEN_SUBJECT_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# An IPv4 address in normal form: four decimal octets, no leading zeros. Matching it is an
# order of magnitude cheaper than ``ipaddress``, and IPv4 is most of what a dialer sees.
IPV4_NORMAL = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def check_subject(subject: str) -> str:
    """Return ``subject`` unchanged if it is a valid subject, else raise ``invalid_subject``."""
    if len(subject) > SUBJECT_MAX_CHARS:
        raise InvalidArgument(
            "invalid_subject", f"subject has {len(subject)} characters, at most 64 allowed"
        )
    if subject.isascii() and subject.isprintable():
        return subject  # printable ASCII has no control, format or separator character
    for ch in subject:
        if unicodedata.category(ch) in FORBIDDEN_SUBJECT_CATEGORIES:
            raise InvalidArgument(
                "invalid_subject",
                f"subject contains control/format character U+{ord(ch):04X}",
            )
    return subject


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A normalised allow address: a bare IPv4/IPv6 address, or an IPv6 /64 prefix.

    ``text`` is the normal form used in results and state ("198.18.0.7", "2001:db8::1",
    "2001:db8:1:2::/64"). Construct through ``agent.policy.normalize_address``.
    """

    text: str

    def __post_init__(self) -> None:
        if IPV4_NORMAL.fullmatch(self.text):
            return
        net = ipaddress.ip_network(self.text, strict=True)
        expected = (
            str(net.network_address) if net.prefixlen == net.max_prefixlen else net.compressed
        )
        if expected != self.text:
            raise ValueError(f"Address {self.text!r} is not in normal form ({expected!r})")

    def __hash__(self) -> int:
        # The generated hash builds a tuple per call; dict lookups of 100,000 keys add up.
        return hash(self.text)

    @classmethod
    def trusted(cls, text: str) -> Address:
        """An address from a source that only ever holds normal forms (the agent's own store),
        without checking it again: loading 100,000 entries must not parse each one twice."""
        address = object.__new__(cls)
        object.__setattr__(address, "text", text)
        return address

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.text)

    @property
    def family(self) -> int:
        """4 or 6."""
        return 4 if ":" not in self.text else 6

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    @property
    def element(self) -> str:
        """The value stored in the kernel set.

        A /64 entry is stored as its network address in a plain (non-interval) set, and the
        rule masks the packet's source to /64 before the lookup: cheaper than an interval set
        and immune to the overlap/partial-delete pitfalls of interval sets.
        """
        if ":" not in self.text:
            return self.text
        return str(self.network.network_address)


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """A validated request to admit ``address`` to ``profile`` for ``ttl_seconds``."""

    address: Address
    profile: str
    ttl_seconds: int
    subject: str = ""
    key: EntryKey = field(init=False, repr=False, compare=False)  # made once, used often

    def __post_init__(self) -> None:
        if self.ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive after defaulting")
        if not self.profile:
            raise ValueError("profile must be resolved before an AllowEntry is made")
        check_subject(self.subject)
        object.__setattr__(self, "key", EntryKey(self.profile, self.address))


@dataclass(frozen=True, slots=True, order=True)
class EntryKey:
    """What identifies an entry: one address in one profile."""

    profile: str
    address: Address

    def __hash__(self) -> int:
        # Equal keys have equal addresses; the same address in two profiles only shares a
        # bucket. Every state change looks keys up many times (16 per entry of a Sync).
        return hash(self.address.text)


@dataclass(frozen=True, slots=True)
class Element:
    """One element to write into a kernel allow set."""

    key: EntryKey
    timeout_s: int
    comment: str

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            # An add without a timeout turns an existing timed element into a permanent one on
            # Debian 12's kernel (RULESET.md), so a non-positive timeout is a programming error.
            raise ValueError("every element needs an explicit positive timeout")
        fits = self.comment.isascii() and len(self.comment) <= ELEMENT_COMMENT_MAX_BYTES
        if not fits and len(self.comment.encode()) > ELEMENT_COMMENT_MAX_BYTES:
            # libnftables' JSON path drops 253-byte comments and exit()s the process at 254+.
            raise ValueError("element comments are limited to 128 bytes of UTF-8")


@dataclass(frozen=True, slots=True)
class ObservedElement:
    """One element as the kernel reports it: whole seconds, as libnftables lists them."""

    key: EntryKey
    timeout_s: int
    expires_s: int
    comment: str
