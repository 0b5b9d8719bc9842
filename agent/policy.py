"""Pure validation and normalisation of untrusted request fields (PROTOCOL.md "Precise rules").

Turns text from callers into ``agent.model`` values or raises ``InvalidArgument`` with a stable
reason word. No I/O and no knowledge of where the text came from.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from agent.errors import InvalidArgument
from agent.model import IPV4_NORMAL, Address, AllowEntry

DEFAULT_TTL_SECONDS = 86400

# The documentation and benchmarking ranges a config may permit for tests and demos.
TEST_RANGES: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("192.0.2.0/24"),
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("2001:db8::/32"),
)

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, slots=True)
class _V4Blocks:
    """IPv4 blocks as sorted, merged (first, last) integer bounds, for a bisect lookup."""

    firsts: tuple[int, ...]
    lasts: tuple[int, ...]

    @classmethod
    def of(cls, nets: Iterable[str]) -> _V4Blocks:
        merged: list[list[int]] = []
        for first, last in sorted(
            (int(n.network_address), int(n.broadcast_address))
            for n in map(ipaddress.IPv4Network, nets)
        ):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        return cls(tuple(f for f, _ in merged), tuple(last for _, last in merged))

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self.firsts, n) - 1
        return i >= 0 and n <= self.lasts[i]


# The IPv4 fast path (``_fast_ipv4``) answers only for addresses outside every block that
# ``ipaddress`` might judge non-global (IANA's special-purpose registry, multicast, reserved,
# with margin: 192.0.0.0/24 whole, 6to4 relays); anything inside one takes the exact slow path.
# Deferring too much only costs time, so this list may be a superset, never a subset.
_V4_SPECIAL = _V4Blocks.of(
    (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/3",
    )
)
_V4_TEST = _V4Blocks.of(str(r) for r in TEST_RANGES if r.version == 4)


def _fast_ipv4(text: str, policy: AddressPolicy) -> Address | None:
    """The normal form of a plainly global (or permitted test-range) IPv4 address written in
    normal form, as ``a.b.c.d`` or ``a.b.c.d/32``; ``None`` sends ``text`` the slow way."""
    bare = text[:-3] if text.endswith("/32") else text
    if IPV4_NORMAL.fullmatch(bare) is None:
        return None
    n = int.from_bytes(socket.inet_aton(bare), "big")  # the normal form just matched
    if policy.permit_test_ranges and n in _V4_TEST:
        return Address.trusted(bare)
    if n in _V4_SPECIAL:
        return None
    return Address.trusted(bare)


_DECIMAL = re.compile(r"[0-9]+")
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}")
# What an operator typing a host name (``sip.example.com``) writes: said so in plain words.
_HOST_NAME = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?")
_HEX_OCTET = re.compile(r"(^|\.)0[xX]")


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses an agent admits.

    ``ipv6_prefix`` is 128 (single addresses) or 64 (every IPv6 entry is its /64: softphones on
    privacy addresses change the low 64 bits, so operators often grant the whole /64). IPv4 is
    always per address (/32).
    """

    ipv6_prefix: int = 64
    permit_test_ranges: bool = False

    def __post_init__(self) -> None:
        if self.ipv6_prefix not in (64, 128):
            raise ValueError("ipv6_prefix must be 64 or 128")


@dataclass(frozen=True, slots=True)
class TtlBounds:
    minimum: int = 60
    maximum: int = 604800
    default: int = DEFAULT_TTL_SECONDS

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.default <= self.maximum:
            raise ValueError("TTL bounds need 1 <= minimum <= default <= maximum")


def _refuse(reason: str, text: str, why: str) -> InvalidArgument:
    return InvalidArgument(reason, f"{text!r}: {why}")


def _check_lexical(text: str) -> None:
    """Refuse the spellings ``ipaddress`` would accept but the protocol forbids."""
    if text != text.strip() or not text:
        raise _refuse("invalid_address", text, "empty or surrounded by white space")
    if "%" in text:
        raise _refuse("invalid_address", text, "zone ids are not accepted")
    addr, _, plen = text.partition("/")
    if "/" in text and not (_DECIMAL.fullmatch(plen) and (plen == "0" or plen[0] != "0")):
        raise _refuse("invalid_address", text, "prefix length must be a decimal without leading 0")
    if ":" in addr:
        head, _, tail = addr.rpartition(":")
        groups = [g for g in head.split(":") if g]
        if "." in tail:
            _check_ipv4_octets(text, tail)
        elif tail:
            groups.append(tail)
        # RFC 4291 text: one to four hex digits, either case, leading zeros allowed (the
        # normal form drops them); only IPv4 octets are ambiguous with leading zeros (octal).
        for g in groups:
            if not _HEX_GROUP.fullmatch(g):
                raise _refuse("invalid_address", text, f"group {g!r} is not 1 to 4 hex digits")
    else:
        _check_ipv4_octets(text, addr)


def _check_ipv4_octets(text: str, dotted: str) -> None:
    octets = dotted.split(".")
    if len(octets) != 4 or not all(_DECIMAL.fullmatch(o) for o in octets):
        if _HOST_NAME.fullmatch(dotted) and not _HEX_OCTET.search(dotted):
            raise _refuse(
                "invalid_address",
                text,
                "not an IP address (host names are not accepted: give the address itself)",
            )
        raise _refuse("invalid_address", text, "an IPv4 address is four decimal octets")
    for octet in octets:
        if len(octet) > 1 and octet[0] == "0":
            raise _refuse(
                "invalid_address",
                text,
                f"octet {octet!r} has a leading zero (some parsers read it as octal)",
            )


def _within(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    if isinstance(net, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return net.subnet_of(outer)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return net.subnet_of(outer)
    return False


def _is_admissible(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network, policy: AddressPolicy
) -> bool:
    if net.is_multicast:
        return False
    if policy.permit_test_ranges and any(_within(net, r) for r in TEST_RANGES):
        return True
    # Python 3.11's is_global: the protocol defines "global unicast" by it, minus multicast
    # (which 3.11 calls global).
    return net.network_address.is_global and net.broadcast_address.is_global


def normalize_address(text: str, policy: AddressPolicy) -> Address:
    """Validate ``text`` and return its normal form, or raise ``InvalidArgument``.

    ``a.b.c.d/32`` and ``x::y/128`` mean the bare address; an IPv4-mapped IPv6 address is its
    IPv4 address; under a /64 policy an IPv6 address or longer prefix becomes its /64.
    """
    return _fast_ipv4(text, policy) or normalize_address_exactly(text, policy)


def normalize_address_exactly(text: str, policy: AddressPolicy) -> Address:
    """``normalize_address`` without the IPv4 fast path: the reference it is tested against."""
    _check_lexical(text)
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise _refuse("invalid_address", text, "not an address or prefix") from exc
    net: ipaddress.IPv4Network | ipaddress.IPv6Network = iface.network
    if iface.ip != net.network_address:
        raise _refuse("host_bits_set", text, f"prefix has host bits set (did you mean {net}?)")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
        if net.prefixlen != 128:
            raise _refuse("prefix_too_short", text, "an IPv4-mapped entry must be one address")
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        net = ipaddress.ip_network(mapped)
    if net.version == 4:
        if net.prefixlen != 32:
            raise _refuse("prefix_too_short", text, "IPv4 entries are single addresses (/32)")
    elif net.prefixlen < policy.ipv6_prefix:
        raise _refuse(
            "prefix_too_short", text, f"IPv6 prefixes must be /{policy.ipv6_prefix} or longer"
        )
    if net.version == 6 and policy.ipv6_prefix == 64:
        # Judge what the entry really admits: the whole /64, not the address it was asked for.
        net = ipaddress.ip_network((net.network_address, 64), strict=False)
    if not _is_admissible(net, policy):
        raise _refuse("address_not_global", text, "not a global unicast address")
    if net.prefixlen == net.max_prefixlen:
        return Address(str(net.network_address))
    return Address(net.compressed)


def resolve_ttl(ttl_seconds: int, bounds: TtlBounds) -> int:
    """0 means the default; anything else must lie within the bounds."""
    if ttl_seconds == 0:
        return bounds.default
    if not bounds.minimum <= ttl_seconds <= bounds.maximum:
        raise InvalidArgument(
            "invalid_ttl",
            f"ttl_seconds {ttl_seconds} outside {bounds.minimum}..{bounds.maximum} (0 = default)",
        )
    return ttl_seconds


def resolve_profile(name: str, profiles: Iterable[str], default: str) -> str:
    """Empty means the default profile; anything else must be configured."""
    if not name:
        return default
    known = tuple(profiles)
    for configured in known:
        if configured == name:
            # The configuration's own string, not the request's equal copy: every entry of a
            # 100,000-entry Sync would otherwise keep a copy of its own (~5 MB in all).
            return configured
    raise InvalidArgument(
        "unknown_profile", f"profile {name!r} is not configured (known: {', '.join(known)})"
    )


def make_allow_entry(
    *,
    address: str,
    ttl_seconds: int,
    subject: str,
    profile: str,
    policy: AddressPolicy,
    bounds: TtlBounds,
    profiles: Iterable[str],
    default_profile: str,
) -> AllowEntry:
    """Validate every field of one requested entry and build the ``AllowEntry`` (which checks
    the subject itself: ``invalid_subject``)."""
    return AllowEntry(
        address=normalize_address(address, policy),
        profile=resolve_profile(profile, profiles, default_profile),
        ttl_seconds=resolve_ttl(ttl_seconds, bounds),
        subject=subject,
    )
