"""Field validation end to end: every invalid address class, TTL bounds, subjects, profiles,
duplicates, empty requests and caps - the code, the reason word, and nothing changed.

Refused Allows carry a valid entry before the bad one and refused Syncs would remove the held
entries, so a request applied even in part shows in the state and kernel snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from e2ekit import REASON_CODES, AgentRig, Answer, C, RawCaller, allow_entry, now_ms
from netlab import Lab

from agent.devlab import DevAgent
from agent.rpc.pb import agent_pb2

VALID = "198.18.5.1"


@pytest.fixture(scope="module")
def rig(shared: AgentRig) -> AgentRig:
    held = shared.raw.allow(
        allow_entry("198.18.0.20", 3600, "held"), allow_entry("2001:db8:0:20::", 3600, "held")
    )
    assert held.ok, held
    return shared


def _refused(rig: AgentRig, send: Iterator[Answer] | Answer, reason: str) -> None:
    answer = send if isinstance(send, Answer) else next(send)
    assert (answer.code, answer.reason) == (REASON_CODES[reason], reason), answer.message
    assert REASON_CODES[reason] == C.INVALID_ARGUMENT or reason in {
        "request_too_large",
        "entry_cap",
        "set_full",
    }


ADDRESSES = [
    # everything / nothing
    ("0.0.0.0/0", "prefix_too_short"),
    ("::/0", "prefix_too_short"),
    ("0.0.0.0", "address_not_global"),  # noqa: S104 (an address to refuse, not to bind)
    ("::", "address_not_global"),
    # loopback, private, shared, link-local, multicast, broadcast, reserved, ULA
    ("127.0.0.1", "address_not_global"),
    ("::1", "address_not_global"),
    ("10.1.2.3", "address_not_global"),
    ("172.16.0.1", "address_not_global"),
    ("192.168.1.1", "address_not_global"),
    ("100.64.0.1", "address_not_global"),
    ("169.254.1.1", "address_not_global"),
    ("fe80::1", "address_not_global"),
    ("224.0.0.1", "address_not_global"),
    ("239.1.2.3", "address_not_global"),
    ("ff02::1", "address_not_global"),
    ("ff0e::1", "address_not_global"),
    ("255.255.255.255", "address_not_global"),
    ("240.0.0.1", "address_not_global"),
    ("fd12:3456::1", "address_not_global"),
    # IPv4-mapped IPv6: judged as the IPv4 address it is
    ("::ffff:127.0.0.1", "address_not_global"),
    ("::ffff:10.0.0.1", "address_not_global"),
    ("::ffff:0:0/96", "prefix_too_short"),
    ("::ffff:198.18.0.0/120", "prefix_too_short"),
    # zone ids
    ("fe80::1%eth0", "invalid_address"),
    ("2001:db8::1%1", "invalid_address"),
    ("198.18.5.2%eth0", "invalid_address"),
    # leading zeros
    ("198.018.5.2", "invalid_address"),
    ("198.18.5.02", "invalid_address"),
    ("2001:db8::00001", "invalid_address"),  # IPv6 groups: at most four hex digits
    ("198.18.5.2/032", "invalid_address"),
    ("::ffff:198.018.5.2", "invalid_address"),
    # surrounding white space (and look-alikes)
    ("198.18.5.2 ", "invalid_address"),
    (" 198.18.5.2", "invalid_address"),
    ("\t198.18.5.2", "invalid_address"),
    ("198.18.5.2\n", "invalid_address"),
    ("2001:db8::1 ", "invalid_address"),
    ("198.18.5.2\u00a0", "invalid_address"),
    ("198.18.5.2\u200b", "invalid_address"),
    # host bits and short prefixes
    ("198.18.5.2/24", "host_bits_set"),
    ("2001:db8:0:1::1/64", "host_bits_set"),
    ("198.18.5.0/24", "prefix_too_short"),
    ("198.18.5.2/31", "prefix_too_short"),
    ("2001:db8::/48", "prefix_too_short"),
    # not an address
    ("", "invalid_address"),
    ("not-an-ip", "invalid_address"),
    ("198.18.5", "invalid_address"),
    ("198.18.5.256", "invalid_address"),
    ("198.18.5.2.1", "invalid_address"),
    ("0x7f.0.0.1", "invalid_address"),
    ("3323069698", "invalid_address"),
    ("2001:db8::g", "invalid_address"),
    ("2001:db8::1::2", "invalid_address"),
    ("198.18.5.2/33", "invalid_address"),
    ("198.18.5.2/-1", "invalid_address"),
    ("198.18.5.2/", "invalid_address"),
]


@pytest.mark.parametrize(("address", "reason"), ADDRESSES, ids=[repr(a) for a, _ in ADDRESSES])
def test_invalid_address_refuses_the_whole_request(
    rig: AgentRig, address: str, reason: str
) -> None:
    raw = rig.raw
    before = rig.observe()
    _refused(rig, raw.allow(allow_entry(VALID), allow_entry(address)), reason)
    _refused(rig, raw.sync(allow_entry(VALID), allow_entry(address)), reason)
    if address:  # an empty address list is a subject revoke, covered below
        _refused(rig, raw.revoke(["198.18.0.20", address]), reason)
    assert rig.observe() == before


TTLS = [1, 59, 604_801, 2**32 - 1]


@pytest.mark.parametrize("ttl", TTLS)
def test_ttl_outside_the_bounds_is_refused(rig: AgentRig, ttl: int) -> None:
    before = rig.observe()
    _refused(rig, rig.raw.allow(allow_entry(VALID), allow_entry("198.18.5.3", ttl)), "invalid_ttl")
    _refused(rig, rig.raw.sync(allow_entry("198.18.5.3", ttl)), "invalid_ttl")
    assert rig.observe() == before


BAD_SUBJECTS = [
    "nul\x00byte",
    "new\nline",
    "carriage\rreturn",
    "tab\there",
    "\x1b[31mred",
    "del\x7f",
    "next\x85line",
    "line\u2028separator",
    "paragraph\u2029separator",
    "\u202eright-to-left override",
    "zero\u200bwidth space",
    "\ufeffbom",
    "soft\u00adhyphen",
    "a" * 65,
    "é" * 65,
]


@pytest.mark.parametrize("subject", BAD_SUBJECTS, ids=[repr(s[:24]) for s in BAD_SUBJECTS])
def test_subject_injection_is_refused(rig: AgentRig, subject: str) -> None:
    raw = rig.raw
    before = rig.observe()
    _refused(rig, raw.allow(allow_entry(VALID, 600, subject)), "invalid_subject")
    _refused(rig, raw.sync(allow_entry(VALID, 600, subject)), "invalid_subject")
    _refused(rig, raw.revoke(subject=subject), "invalid_subject")
    _refused(rig, raw.erase(subject), "invalid_subject")
    assert rig.observe() == before


GOOD_SUBJECTS = [
    'O\'Brien "the boss"; DROP TABLE users; --',
    "a" * 64,
    "é" * 64,
    "\U0001f642" * 64,
    "名前 テスト",
    "",
]


@pytest.mark.parametrize("subject", GOOD_SUBJECTS, ids=[repr(s[:24]) for s in GOOD_SUBJECTS])
def test_printable_subjects_with_quotes_and_semicolons_are_kept_verbatim(
    rig: AgentRig, subject: str
) -> None:
    address = f"198.18.6.{GOOD_SUBJECTS.index(subject) + 1}"
    answer = rig.raw.allow(allow_entry(address, 600, subject))
    assert answer.ok, answer.message
    entry = next(e for e in rig.raw.state().entries if e.address == address)
    assert entry.subject == subject
    (element,) = [k for k in rig.observe().kernel if k[1] == address]
    comment = element[3]
    assert len(comment.encode()) <= 128
    assert comment.startswith(f"req={entry.request_id} sub=")


@pytest.mark.parametrize("profile", ["nope", "AGENT", "agent ", "agent\n"])
def test_unknown_profile_is_refused(rig: AgentRig, profile: str) -> None:
    before = rig.observe()
    _refused(rig, rig.raw.allow(allow_entry(VALID), allow_entry("198.18.5.4", 600, "", profile)),
             "unknown_profile")  # fmt: skip
    _refused(rig, rig.raw.revoke(["198.18.0.20"], profile=profile), "unknown_profile")
    assert rig.observe() == before


DUPLICATES = [
    ("198.18.5.5", "198.18.5.5"),
    ("198.18.5.5", "::ffff:198.18.5.5"),
    ("198.18.5.5/32", "198.18.5.5"),
    ("2001:db8:0:30::1", "2001:db8:0:30::2"),  # one /64 under the default policy
    ("2001:db8:0:30::", "2001:db8:0:30::/64"),
    ("2001:db8:0:30::1/128", "2001:DB8:0:30::7"),
]


@pytest.mark.parametrize(("first", "second"), DUPLICATES)
def test_duplicates_after_normalisation_are_refused(rig: AgentRig, first: str, second: str) -> None:
    before = rig.observe()
    _refused(rig, rig.raw.allow(allow_entry(first), allow_entry(second)), "duplicate_entry")
    _refused(rig, rig.raw.sync(allow_entry(first), allow_entry(second)), "duplicate_entry")
    _refused(rig, rig.raw.revoke([first, second]), "duplicate_entry")
    assert rig.observe() == before


def test_malformed_requests_are_refused(rig: AgentRig) -> None:
    raw = rig.raw
    before = rig.observe()
    _refused(rig, raw.allow(), "no_entries")
    _refused(rig, raw.revoke(), "invalid_revoke")
    _refused(rig, raw.revoke(["198.18.0.20"], subject="held"), "invalid_revoke")
    _refused(rig, raw.erase(""), "empty_subject")
    assert rig.observe() == before


NORMAL_FORMS = [
    ("198.18.7.1/32", "198.18.7.1"),
    ("::ffff:198.18.7.2", "198.18.7.2"),
    ("2001:db8:0:71::5", "2001:db8:0:71::/64"),
    ("2001:DB8:0:72::1/128", "2001:db8:0:72::/64"),
    ("2001:db8:0:73::/64", "2001:db8:0:73::/64"),
    # IPv6 groups with leading zeros, in either case, are RFC 4291 text (PROTOCOL.md)
    ("2001:0DB8:0000:0074::0001", "2001:db8:0:74::/64"),
    ("2001:0db8:0:0075::/64", "2001:db8:0:75::/64"),
]


@pytest.mark.parametrize(("text", "normal"), NORMAL_FORMS)
def test_accepted_addresses_are_reported_and_installed_in_normal_form(
    rig: AgentRig, text: str, normal: str
) -> None:
    answer = rig.raw.allow(allow_entry(text))
    assert answer.ok, answer.message
    assert answer.result is not None
    assert [r.address for r in answer.result.results] == [normal]
    seen = rig.observe()
    assert normal in seen.addresses
    assert normal.removesuffix("/64") in seen.elements


@pytest.mark.parametrize(("ttl", "expected"), [(60, 60), (604_800, 604_800), (0, 86_400)])
def test_ttl_bounds_are_inclusive_and_zero_means_the_default(
    rig: AgentRig, ttl: int, expected: int
) -> None:
    address = f"198.18.8.{ttl % 250 + 1}"
    sent = now_ms()
    answer = rig.raw.allow(allow_entry(address, ttl))
    assert answer.ok, answer.message
    assert answer.result is not None
    (result,) = answer.result.results
    assert sent + expected * 1000 <= result.expires_at_unix_ms <= now_ms() + expected * 1000
    (element,) = [k for k in rig.observe().kernel if k[1] == address]
    assert element[2] == expected  # the kernel element's timeout


# --- test ranges refused unless the config permits them ---------------------------------------


def _no_test_ranges(dev: DevAgent) -> None:
    text = dev.config_text().replace("permit_test_ranges = true", "permit_test_ranges = false")
    dev.write_config(text)


@pytest.fixture(scope="module")
def strict(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    directory = tmp_path_factory.mktemp("strict")
    # Its own namespace-local table, so it cannot meet the shared daemon's.
    with AgentRig.running(
        module_lab,
        directory,
        table="strict",
        api_listen="127.0.0.1:7444",
        metrics_listen="127.0.0.1:9618",
        configure=_no_test_ranges,
    ) as rig:
        yield rig


TEST_RANGE_ADDRESSES = [
    "198.18.0.2",
    "198.19.255.1",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "2001:db8::1",
    "2001:db8:ffff:ffff::/64",
    "::ffff:198.18.0.2",
]


@pytest.mark.parametrize("address", TEST_RANGE_ADDRESSES)
def test_test_ranges_are_refused_unless_permitted(strict: AgentRig, address: str) -> None:
    before = strict.observe()
    answer = strict.raw.allow(allow_entry(address))
    assert (answer.code, answer.reason) == (C.INVALID_ARGUMENT, "address_not_global")
    assert strict.observe() == before


# --- caps ----------------------------------------------------------------------------------


def _small_messages(dev: DevAgent) -> None:
    dev.write_config(dev.config_text().replace("[api]\n", "[api]\nmax_message_bytes = 4096\n"))


@pytest.fixture(scope="module")
def capped(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    """At most 4 entries per request, 5 in all, 3 in the IPv4 set, messages of 4 KiB;
    holding 3 IPv4 + 1 IPv6."""
    with AgentRig.running(
        module_lab,
        tmp_path_factory.mktemp("capped"),
        table="capped",
        api_listen="127.0.0.1:7445",
        metrics_listen="127.0.0.1:9619",
        firewall_toml="set_size_ipv4 = 3",
        extra_toml="[limits]\nmax_entries_per_request = 4\nmax_entries = 5\n",
        configure=_small_messages,
    ) as rig:
        full = rig.raw.allow(*(allow_entry(f"198.18.9.{i}") for i in (1, 2, 3)))
        assert full.ok, full
        one6 = rig.raw.allow(allow_entry("2001:db8:0:90::"))
        assert one6.ok, one6
        yield rig


def _five() -> list[agent_pb2.AllowEntry]:
    return [allow_entry(f"198.18.9.{i}") for i in (11, 12, 13, 14, 15)]


CAPS = [
    ("one more IPv4 than the set holds", lambda r: r.allow(allow_entry("198.18.9.4")), "set_full"),
    ("a Sync keeping the IPv4 set and adding to it",
     lambda r: r.sync(*(allow_entry(f"198.18.9.{i}") for i in (1, 2, 3, 4))), "set_full"),
    ("two IPv6 beyond max_entries",
     lambda r: r.allow(allow_entry("2001:db8:0:91::"), allow_entry("2001:db8:0:92::")),
     "entry_cap"),
    ("five entries in one Allow", lambda r: r.allow(*_five()), "request_too_large"),
    ("five entries in one Sync", lambda r: r.sync(*_five()), "request_too_large"),
    ("five addresses in one Revoke",
     lambda r: r.revoke([e.address for e in _five()]), "request_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "send", "reason"), CAPS, ids=[c[0] for c in CAPS])
def test_caps_refuse_the_whole_request(
    capped: AgentRig, what: str, send: Callable[[RawCaller], Answer], reason: str
) -> None:
    before = capped.observe()
    answer = send(capped.raw)
    assert (answer.code, answer.reason) == (C.RESOURCE_EXHAUSTED, reason), answer.message
    assert capped.observe() == before


def test_field_validation_comes_before_caps(capped: AgentRig) -> None:
    before = capped.observe()
    entries = [*_five()[:4], allow_entry("10.0.0.1")]
    answer = capped.raw.allow(*entries)
    assert (answer.code, answer.reason) == (C.INVALID_ARGUMENT, "address_not_global")
    assert capped.observe() == before


def test_refreshing_an_entry_of_a_full_set_is_not_capped(capped: AgentRig) -> None:
    before = capped.observe()
    answer = capped.raw.allow(allow_entry("198.18.9.1", 1200))
    assert answer.ok, answer.message
    assert answer.result is not None
    assert [r.status for r in answer.result.results] == [agent_pb2.REFRESHED]
    after = capped.observe()
    assert after.state_version == before.state_version + 1
    assert after.elements == before.elements


def _oversized(raw: RawCaller) -> Answer:
    return raw.allow(*(allow_entry(f"198.18.9.{i}", 600, "x" * 64) for i in range(20, 80)))


def test_a_message_over_the_size_cap_is_resource_exhausted(capped: AgentRig) -> None:
    before = capped.observe()
    assert _oversized(capped.raw).code == C.RESOURCE_EXHAUSTED
    assert capped.observe() == before


def test_a_message_over_the_size_cap_has_a_reason_word(capped: AgentRig) -> None:
    assert _oversized(capped.raw).reason == "request_too_large"
