"""What sysadmins type first: durations with units, counts in English, expiry as a time.

``--ttl`` takes seconds or ``90m``, ``1h``, ``2d`` on both halves (the daemon and the agent see
seconds); ``list`` and ``ctl state`` print when an entry expires, in UTC and as time left."""

from __future__ import annotations

from typing import Any

import pytest

from agent.__main__ import main
from agent.errors import InvalidArgument
from agent.local.client import LocalClient
from agent.policy import AddressPolicy, normalize_address
from agent.rpc.client import AgentClient, Entry
from agent.terminal import counted, parse_duration, when

DURATIONS = [
    ("0", 0),
    ("60", 60),
    ("3600", 3600),
    ("90s", 90),
    ("90m", 5400),
    ("1h", 3600),
    ("2d", 172_800),
    ("1w", 604_800),
    ("1h30m", 5400),
    ("1d12h", 129_600),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations_with_units_are_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "1", "1 h", "1H", "-5m", "+5m", "1.5h", "1h 30m", "30m1", "1y", "٣m", "1hh"]
)
def test_anything_else_is_refused_not_guessed(text: str) -> None:
    if text == "1":  # a bare number is seconds
        assert parse_duration(text) == 1
        return
    with pytest.raises(ValueError, match="90m, 1h, 2d"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 entries"), (1, "1 entry"), (2, "2 entries"), (11, "11 entries")]
)
def test_counts_are_english(n: int, text: str) -> None:
    assert counted(n, "entry", "entries") == text


def test_expiry_is_a_utc_time_and_the_time_left() -> None:
    now = 1_700_000_000_000
    assert when(now + 5_400_000, now) == "2023-11-14T23:43:20Z (in 1h 30m)"
    assert when(now - 60_000, now) == "2023-11-14T22:12:20Z (1m 0s ago)"
    assert when(0, now) == "-"


@pytest.mark.parametrize(("ttl", "seconds"), [("1h", 3600), ("90m", 5400), ("600", 600)])
def test_local_allow_sends_the_duration_in_seconds(
    ttl: str, seconds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: dict[str, Any] = {}

    def call(self: LocalClient, op: str, **args: Any) -> dict[str, Any]:
        sent.update(op=op, **args)
        return {
            "request_id": "local-1",
            "state_version": 1,
            "results": [],
            "ttl_s": 1,
            "ttl_capped": False,
        }

    monkeypatch.setattr(LocalClient, "call", call)
    assert main(["allow", "198.18.0.9", "--ttl", ttl, "--socket", "/nonexistent", "--json"]) == 0
    assert (sent["op"], sent["ttl"]) == ("allow", seconds)


@pytest.mark.parametrize(("ttl", "seconds"), [("2d", 172_800), ("1h30m", 5400), ("0", 0)])
def test_ctl_allow_sends_the_duration_in_seconds(
    ttl: str, seconds: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    signed: list[Entry] = []

    def envelope_allow(self: AgentClient, entries: list[Entry], request_id: str) -> Any:
        signed.extend(entries)
        raise KeyboardInterrupt  # stop before sending: the entries are what is checked

    monkeypatch.setattr(AgentClient, "envelope_allow", envelope_allow)
    assert main(["dev-pki", str(tmp_path), "--json"]) == 0
    argv = ["ctl", "allow", "198.18.0.9", "--ttl", ttl, "--connection", str(tmp_path / "ctl.toml")]
    assert main(argv) == 130
    assert [e.ttl_seconds for e in signed] == [seconds]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("sip.example.com", "host names are not accepted"),
        ("sip", "host names are not accepted"),
        ("010.1.2.3", "leading zero"),
        ("198.18.0", "four decimal octets"),
        ("2001:db8::12345", "1 to 4 hex digits"),
    ],
)
def test_an_address_mistake_is_named_in_plain_words(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize_address(text, AddressPolicy(permit_test_ranges=True))
    assert info.value.reason == "invalid_address"
    assert words in info.value.detail
    assert "junk" not in info.value.detail
