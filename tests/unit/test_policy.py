"""PROTOCOL.md "Requests" and "Precise rules" (Addresses, Subject, TTL, profile) as tables.

Every row is one sentence of the spec: an input, a policy, and the normal form or the reason word
the agent must answer with. Reason words are the contract; message text is never matched.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from agent import policy as policy_module
from agent.errors import ErrorKind, InvalidArgument
from agent.model import Address, AllowEntry, check_subject
from agent.policy import (
    DEFAULT_TTL_SECONDS,
    AddressPolicy,
    TtlBounds,
    make_allow_entry,
    normalize_address,
    normalize_address_exactly,
    resolve_profile,
    resolve_ttl,
)

P64 = AddressPolicy()  # the default: IPv6 entries are /64, no test ranges
P128 = AddressPolicy(ipv6_prefix=128)
P64_TEST = AddressPolicy(permit_test_ranges=True)
P128_TEST = AddressPolicy(ipv6_prefix=128, permit_test_ranges=True)


def value_error(call: Callable[..., object], *args: object, **kwargs: object) -> ValueError:
    """Programmer errors are plain ValueErrors without a reason word; STYLE.md forbids matching
    their text, so the exact type is what is pinned."""
    with pytest.raises(ValueError) as info:  # noqa: PT011
        call(*args, **kwargs)
    assert type(info.value) is ValueError
    return info.value


def refusal(call: Callable[..., object], *args: object) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call(*args)
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT
    return info.value


def test_default_policy_is_ipv6_slash_64_without_test_ranges() -> None:
    assert P64.ipv6_prefix == 64
    assert P64.permit_test_ranges is False


# --- addresses: accepted, and their normal form ---------------------------------------------

ACCEPTED = [
    # global IPv4, bare and as /32
    ("8.8.8.8", P64, "8.8.8.8"),
    ("1.1.1.1", P128, "1.1.1.1"),
    ("185.199.108.153", P64, "185.199.108.153"),
    ("8.8.8.8/32", P64, "8.8.8.8"),
    ("8.8.8.8/32", P128, "8.8.8.8"),
    # global IPv6 under the /128 policy: the bare address, RFC 5952
    ("2606:4700:4700::1111", P128, "2606:4700:4700::1111"),
    ("2606:4700:4700::1111/128", P128, "2606:4700:4700::1111"),
    ("2606:4700:4700:0:0:0:0:1111", P128, "2606:4700:4700::1111"),
    ("2606:4700:0:1:0:0:0:1", P128, "2606:4700:0:1::1"),
    ("2606:4700:0:0:1:0:0:1", P128, "2606:4700::1:0:0:1"),  # first of two equal runs
    ("2606:4700:1:0:1:1:1:1", P128, "2606:4700:1:0:1:1:1:1"),  # a lone 0 is not "::"
    ("2A00:1450:4001:81C::200E", P128, "2a00:1450:4001:81c::200e"),  # lower case
    ("2001:4860:4860::8888", P128, "2001:4860:4860::8888"),
    # IPv4-mapped IPv6 is its IPv4 address, under either policy
    ("::ffff:8.8.8.8", P64, "8.8.8.8"),
    ("::ffff:8.8.8.8", P128, "8.8.8.8"),
    ("::ffff:808:808", P128, "8.8.8.8"),
    ("::FFFF:8.8.8.8", P64, "8.8.8.8"),
    ("::ffff:8.8.8.8/128", P64, "8.8.8.8"),
    # the /64 policy widens an IPv6 address (or longer prefix) to its /64
    ("2606:4700:4700::1111", P64, "2606:4700:4700::/64"),
    ("2606:4700:4700::1111/128", P64, "2606:4700:4700::/64"),
    ("2a00:1450:4001:81c:1:2:3:4", P64, "2a00:1450:4001:81c::/64"),
    ("2a00:1450:4001:81c::/64", P64, "2a00:1450:4001:81c::/64"),
    ("2a00:1450:4001:81c:1::/80", P64, "2a00:1450:4001:81c::/64"),
    ("2a00:1450:4001:81c:0:0:0:0/64", P64, "2a00:1450:4001:81c::/64"),
    # documentation and benchmarking ranges only where the config permits them
    ("192.0.2.1", P64_TEST, "192.0.2.1"),
    ("198.51.100.7", P64_TEST, "198.51.100.7"),
    ("203.0.113.254", P64_TEST, "203.0.113.254"),
    ("198.18.0.1", P64_TEST, "198.18.0.1"),
    ("198.19.255.254", P128_TEST, "198.19.255.254"),
    ("2001:db8::1", P128_TEST, "2001:db8::1"),
    ("2001:db8:1:2::5", P64_TEST, "2001:db8:1:2::/64"),
    ("2001:db8:1:2::/64", P64_TEST, "2001:db8:1:2::/64"),
    # IPv6 groups of one to four hex digits, either case, with or without leading zeros
    ("2001:0DB8::0001", P128_TEST, "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", P128_TEST, "2001:db8::1"),
    ("2606:0470::1", P128, "2606:470::1"),
    ("2606:4700::01", P128, "2606:4700::1"),
    ("2606:4700:0000::1", P64, "2606:4700::/64"),
    ("2606:4700:00:1::/64", P64, "2606:4700:0:1::/64"),
    ("2A00:1450:4001:081C::200E", P128, "2a00:1450:4001:81c::200e"),
    ("::FFFF:0808:0808", P128, "8.8.8.8"),
]


@pytest.mark.parametrize(("text", "policy", "normal"), ACCEPTED)
def test_accepted_address_has_its_normal_form_which_maps_to_itself(
    text: str, policy: AddressPolicy, normal: str
) -> None:
    assert normalize_address(text, policy) == Address(normal)
    assert normalize_address(normal, policy) == Address(normal)


# --- addresses: refused, with the reason word -----------------------------------------------

NOT_GLOBAL = "address_not_global"
INVALID = "invalid_address"
TOO_SHORT = "prefix_too_short"
HOST_BITS = "host_bits_set"

REFUSED = [
    # everything
    ("0.0.0.0/0", P64, TOO_SHORT),
    ("::/0", P64, TOO_SHORT),
    ("::/0", P128, TOO_SHORT),
    # loopback, unspecified
    ("127.0.0.1", P64, NOT_GLOBAL),
    ("127.1.2.3", P64, NOT_GLOBAL),
    ("::1", P64, NOT_GLOBAL),
    ("::1", P128, NOT_GLOBAL),
    ("0.0.0.0", P64, NOT_GLOBAL),  # noqa: S104 (an address refused, not a bind)
    ("::", P64, NOT_GLOBAL),
    ("::", P128, NOT_GLOBAL),
    # link-local
    ("169.254.1.1", P64, NOT_GLOBAL),
    ("fe80::1", P64, NOT_GLOBAL),
    ("fe80::1", P128, NOT_GLOBAL),
    ("fe80::/64", P64, NOT_GLOBAL),
    # multicast: Python 3.11 calls 224.0.0.1 and 239.255.255.250 "global"; the agent must not
    ("224.0.0.1", P64, NOT_GLOBAL),
    ("239.255.255.250", P64, NOT_GLOBAL),
    ("::ffff:224.0.0.1", P64, NOT_GLOBAL),
    ("ff02::1", P128, NOT_GLOBAL),
    ("ff0e::1", P128, NOT_GLOBAL),
    ("ff0e::1", P64, NOT_GLOBAL),
    ("ff0e::/64", P64, NOT_GLOBAL),
    # broadcast and reserved
    ("255.255.255.255", P64, NOT_GLOBAL),
    ("::ffff:255.255.255.255", P64, NOT_GLOBAL),
    ("240.0.0.1", P64, NOT_GLOBAL),
    # private (RFC 1918, ULA) and CGNAT 100.64.0.0/10
    ("10.0.0.1", P64, NOT_GLOBAL),
    ("172.16.0.1", P64, NOT_GLOBAL),
    ("192.168.1.1", P64, NOT_GLOBAL),
    ("::ffff:10.0.0.1", P64, NOT_GLOBAL),
    ("fc00::1", P128, NOT_GLOBAL),
    ("fd12:3456::1", P64, NOT_GLOBAL),
    ("100.64.0.1", P64, NOT_GLOBAL),
    ("100.127.255.254", P64_TEST, NOT_GLOBAL),
    ("::ffff:100.64.0.1", P64, NOT_GLOBAL),
    # documentation and benchmarking ranges without permit_test_ranges
    ("192.0.2.1", P64, NOT_GLOBAL),
    ("198.51.100.7", P64, NOT_GLOBAL),
    ("203.0.113.254", P128, NOT_GLOBAL),
    ("198.18.0.1", P64, NOT_GLOBAL),
    ("198.19.255.254", P64, NOT_GLOBAL),
    ("2001:db8::1", P128, NOT_GLOBAL),
    ("2001:db8:1:2::/64", P64, NOT_GLOBAL),
    # permit_test_ranges permits exactly those ranges, nothing private next to them
    ("10.0.0.1", P64_TEST, NOT_GLOBAL),
    ("127.0.0.1", P128_TEST, NOT_GLOBAL),
    ("224.0.0.1", P64_TEST, NOT_GLOBAL),
    # zone ids
    ("fe80::1%eth0", P64, INVALID),
    ("2606:4700::1%1", P128, INVALID),
    # leading zeros: IPv4 octets (octal to some parsers) and prefix lengths; IPv6 groups are
    # RFC 4291 text with them (ACCEPTED) but never longer than four hex digits
    ("08.8.8.8", P64, INVALID),
    ("8.8.8.010", P64, INVALID),
    ("8.8.08.8", P128, INVALID),
    ("::ffff:08.8.8.8", P64, INVALID),
    ("2001:0DB8::08.8.8.8", P128_TEST, INVALID),
    ("2606:04700::1", P128, INVALID),
    ("2606:4700::00001", P128, INVALID),
    ("2606:4700:00000::1", P64, INVALID),
    ("8.8.8.8/032", P64, INVALID),
    ("2606:4700::/064", P64, INVALID),
    ("2606:4700::1/0128", P128, INVALID),
    # surrounding white space
    (" 8.8.8.8", P64, INVALID),
    ("8.8.8.8 ", P64, INVALID),
    ("8.8.8.8\n", P64, INVALID),
    ("\t2606:4700::1", P128, INVALID),
    ("8.8.8.8\u00a0", P64, INVALID),
    ("2606:4700::/64 ", P64, INVALID),
    # host bits set
    ("2606:4700::1/64", P64, HOST_BITS),
    ("2606:4700::1/64", P128, HOST_BITS),
    ("8.8.8.8/24", P64, HOST_BITS),
    ("2606:4700:1:2::1/96", P64, HOST_BITS),
    # prefix shorter than the policy
    ("2606:4700::/48", P64, TOO_SHORT),
    ("2606:4700:1::/63", P64, TOO_SHORT),
    ("2606:4700:1:2::/64", P128, TOO_SHORT),
    ("2606:4700:1:2::/127", P128, TOO_SHORT),
    ("::ffff:0:0/96", P64, TOO_SHORT),
    # IPv4 entries are single addresses
    ("8.8.8.0/24", P64, TOO_SHORT),
    ("8.8.8.8/31", P64, TOO_SHORT),
    ("198.18.0.0/15", P64_TEST, TOO_SHORT),
    # junk
    ("hello", P64, INVALID),
    ("8.8.8", P64, INVALID),
    ("1.1.1.1.1", P64, INVALID),
    ("8.8.8.8/33", P64, INVALID),
    ("8.8.8.8/", P64, INVALID),
    ("8.8.8.8/+32", P64, INVALID),
    ("8.8.8.8/32/32", P64, INVALID),
    ("/32", P64, INVALID),
    ("0x8.8.8.8", P64, INVALID),
    ("\uff18.8.8.8", P64, INVALID),  # fullwidth digit 8
    ("8.8.8.8/\u0663\u0662", P64, INVALID),  # Arabic-Indic "32"
    ("2606:4700::g", P128, INVALID),
    ("2606::1::2", P128, INVALID),
    ("2606:4700::1/129", P128, INVALID),
    ("[2606:4700::1]", P128, INVALID),
    ("8.8.8.8\u200b", P64, INVALID),
    ("8.8.8.8\x00", P64, INVALID),
    # empty
    ("", P64, INVALID),
    ("", P128, INVALID),
]


@pytest.mark.parametrize(("text", "policy", "reason"), REFUSED)
def test_refused_address_names_the_reason(text: str, policy: AddressPolicy, reason: str) -> None:
    assert refusal(normalize_address, text, policy).reason == reason


@pytest.mark.parametrize("text", ["::2", "::8.8.8.8", "::1:0:0:2", "2001:db8:1:2::5"])
def test_slash_64_policy_judges_the_64_an_entry_admits(text: str) -> None:
    # '::2' is global to Python 3.11, but its /64 '::/64' holds ::1, :: and ::ffff:0:0/96.
    assert refusal(normalize_address, text, P64).reason == NOT_GLOBAL


def test_address_policy_refuses_other_ipv6_prefixes() -> None:
    for prefix in (0, 48, 63, 65, 96, 127, 129):
        value_error(AddressPolicy, ipv6_prefix=prefix)


# --- TTL --------------------------------------------------------------------------------------

DEFAULT_BOUNDS = TtlBounds()
NARROW = TtlBounds(minimum=10, maximum=100, default=50)

TTL_OK = [
    (0, DEFAULT_BOUNDS, 86400),
    (60, DEFAULT_BOUNDS, 60),
    (61, DEFAULT_BOUNDS, 61),
    (3600, DEFAULT_BOUNDS, 3600),
    (604800, DEFAULT_BOUNDS, 604800),
    (0, NARROW, 50),
    (10, NARROW, 10),
    (100, NARROW, 100),
]


@pytest.mark.parametrize(("ttl", "bounds", "resolved"), TTL_OK)
def test_ttl_zero_means_default_and_bounds_are_inclusive(
    ttl: int, bounds: TtlBounds, resolved: int
) -> None:
    assert resolve_ttl(ttl, bounds) == resolved


TTL_REFUSED = [
    (1, DEFAULT_BOUNDS),
    (59, DEFAULT_BOUNDS),
    (604801, DEFAULT_BOUNDS),
    (2**32 - 1, DEFAULT_BOUNDS),  # uint32 max on the wire
    (-1, DEFAULT_BOUNDS),
    (9, NARROW),
    (101, NARROW),
]


@pytest.mark.parametrize(("ttl", "bounds"), TTL_REFUSED)
def test_ttl_outside_bounds_is_invalid_ttl(ttl: int, bounds: TtlBounds) -> None:
    assert refusal(resolve_ttl, ttl, bounds).reason == "invalid_ttl"


def test_default_ttl_bounds_match_the_protocol() -> None:
    assert (DEFAULT_BOUNDS.minimum, DEFAULT_BOUNDS.maximum, DEFAULT_BOUNDS.default) == (
        60,
        604800,
        86400,
    )
    assert DEFAULT_TTL_SECONDS == 86400


@pytest.mark.parametrize(
    ("minimum", "maximum", "default"),
    [(0, 100, 50), (100, 10, 50), (10, 100, 5), (10, 100, 101)],
)
def test_inconsistent_ttl_bounds_cannot_exist(minimum: int, maximum: int, default: int) -> None:
    value_error(TtlBounds, minimum=minimum, maximum=maximum, default=default)


# --- subject ----------------------------------------------------------------------------------

SUBJECT_OK = [
    "",
    "bob",
    "a" * 64,
    "\u00e9" * 64,  # 64 characters, 128 bytes: the limit counts characters
    "\u4e2d" * 64,  # 192 bytes
    "\U0001f600" * 64,  # 256 bytes
    'O\'Brien; "Bobby" Tables',
    "agent 007",
    "x;flush ruleset}",
    "back\\slash",
    "e\u0301",  # combining accent (Mn) is ordinary text
    "\u05e9\u05dc\u05d5\u05dd",  # right-to-left script, without override characters
]


@pytest.mark.parametrize("subject", SUBJECT_OK)
def test_valid_subject_is_kept_unchanged(subject: str) -> None:
    assert check_subject(subject) == subject


SUBJECT_REFUSED = [
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("\U0001f600" * 65, id="65-emoji"),
    pytest.param("bob\x00", id="NUL-Cc"),
    pytest.param("bob\n", id="LF-Cc"),
    pytest.param("a\tb", id="TAB-Cc"),
    pytest.param("a\x7fb", id="DEL-Cc"),
    pytest.param("a\x85b", id="NEL-Cc"),
    pytest.param("a\u200bb", id="ZWSP-Cf"),
    pytest.param("\ufeffbob", id="BOM-Cf"),
    pytest.param("bob\u202e", id="RLO-Cf"),
    pytest.param("a\u00adb", id="soft-hyphen-Cf"),
    pytest.param("\U0001f469\u200d\U0001f4bb", id="ZWJ-emoji-sequence-Cf"),
    pytest.param("a\u2028b", id="LS-Zl"),
    pytest.param("a\u2029b", id="PS-Zp"),
    pytest.param("a\ud800b", id="lone-surrogate-Cs"),
]


@pytest.mark.parametrize("subject", SUBJECT_REFUSED)
def test_subject_too_long_or_with_forbidden_category_is_refused(subject: str) -> None:
    assert refusal(check_subject, subject).reason == "invalid_subject"


# --- profile ----------------------------------------------------------------------------------

PROFILES = ("agent", "admin")

PROFILE_CASES = [
    ("", "agent", "agent"),
    ("", "admin", "admin"),
    ("agent", "agent", "agent"),
    ("admin", "agent", "admin"),
]


@pytest.mark.parametrize(("name", "default", "resolved"), PROFILE_CASES)
def test_empty_profile_means_default(name: str, default: str, resolved: str) -> None:
    assert resolve_profile(name, PROFILES, default) == resolved


def test_a_named_profile_resolves_to_the_configured_string_not_the_requests_copy() -> None:
    requested = "".join(["ag", "ent"])  # equal to a configured name, but another object
    resolved = resolve_profile(requested, PROFILES, "admin")
    assert resolved == requested
    assert resolved is next(p for p in PROFILES if p == requested)


@pytest.mark.parametrize("name", ["nope", "Agent", " agent", "agent ", "agent\x00"])
def test_unknown_profile_is_refused(name: str) -> None:
    assert refusal(resolve_profile, name, PROFILES, "agent").reason == "unknown_profile"


# --- one whole entry --------------------------------------------------------------------------


def entry(**overrides: object) -> AllowEntry:
    fields: dict[str, object] = {
        "address": "2606:4700:4700::1111",
        "ttl_seconds": 0,
        "subject": "bob",
        "profile": "",
    }
    fields.update(overrides)
    return make_allow_entry(
        **fields,  # type: ignore[arg-type]
        policy=P64,
        bounds=DEFAULT_BOUNDS,
        profiles=PROFILES,
        default_profile="agent",
    )


def test_allow_entry_is_built_from_normalised_fields() -> None:
    assert entry() == AllowEntry(
        address=Address("2606:4700:4700::/64"), profile="agent", ttl_seconds=86400, subject="bob"
    )
    assert entry(address="::ffff:8.8.8.8", ttl_seconds=60, profile="admin").key.address == Address(
        "8.8.8.8"
    )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("address", "10.0.0.1", NOT_GLOBAL),
        ("address", " 8.8.8.8", INVALID),
        ("ttl_seconds", 59, "invalid_ttl"),
        ("subject", "a" * 65, "invalid_subject"),
        ("subject", "bob\n", "invalid_subject"),
        ("profile", "nope", "unknown_profile"),
    ],
)
def test_allow_entry_refuses_any_bad_field(field: str, value: object, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        entry(**{field: value})
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl_seconds": 0},
        {"ttl_seconds": -5},
        {"profile": ""},
    ],
)
def test_allow_entry_value_cannot_hold_unresolved_fields(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "address": Address("8.8.8.8"),
        "profile": "agent",
        "ttl_seconds": 60,
        "subject": "bob",
    }
    fields.update(kwargs)
    value_error(AllowEntry, **fields)


def test_allow_entry_value_refuses_bad_subject() -> None:
    with pytest.raises(InvalidArgument) as info:
        AllowEntry(Address("8.8.8.8"), "agent", 60, "a\u2028b")
    assert info.value.reason == "invalid_subject"


@pytest.mark.parametrize("text", ["2606:4700::1/128", "8.8.8.8/32", "2606:4700::1:0:0:0:1", "x"])
def test_address_value_refuses_text_not_in_normal_form(text: str) -> None:
    value_error(Address, text)


def _outcome(fn: Callable[[str, AddressPolicy], Address], text: str, policy: AddressPolicy) -> str:
    try:
        return fn(text, policy).text
    except InvalidArgument as exc:
        return f"refused:{exc.reason}"


def _ipv4_probes() -> list[str]:
    """Both edges of every special block, one address either side of each, and a spread of
    ordinary addresses, each bare and as /32, plus spellings the fast path must not take."""
    ints: set[int] = {0, 1, 2**32 - 2, 2**32 - 1}
    for blocks in (policy_module._V4_SPECIAL, policy_module._V4_TEST):
        for lo, hi in zip(blocks.firsts, blocks.lasts, strict=True):
            ints |= {lo - 1, lo, lo + 1, hi - 1, hi, hi + 1}
    rng = random.Random(4)
    ints |= {rng.randrange(2**32) for _ in range(20_000)}
    texts = [str(ipaddress.IPv4Address(n)) for n in sorted(ints) if 0 <= n < 2**32]
    texts += [t + "/32" for t in texts[::7]]
    texts += ["01.2.3.4", "1.2.3.04", "1.2.3.4/032", "1.2.3.4 ", "1.2.3.256", "1.2.3", "1.2.3.4/31"]
    return texts


@pytest.mark.parametrize("permit", [False, True], ids=["global-only", "test-ranges"])
def test_ipv4_fast_path_agrees_with_the_exact_path(permit: bool) -> None:
    policy = AddressPolicy(permit_test_ranges=permit)
    probes = _ipv4_probes()
    fast_taken = sum(1 for t in probes if policy_module._fast_ipv4(t, policy) is not None)
    assert fast_taken > len(probes) // 2  # the comparison really exercises the fast path
    differing = [
        (t, _outcome(normalize_address, t, policy), _outcome(normalize_address_exactly, t, policy))
        for t in probes
        if _outcome(normalize_address, t, policy) != _outcome(normalize_address_exactly, t, policy)
    ]
    assert differing == []


def test_trusted_address_skips_the_check_and_equals_a_checked_one() -> None:
    assert Address.trusted("2001:db8:1:2::/64") == Address("2001:db8:1:2::/64")
    assert Address.trusted("198.18.0.1").family == 4
    value_error(Address, "198.018.0.1")
