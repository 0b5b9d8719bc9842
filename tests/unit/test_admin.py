"""The local socket's pure parts (policy, wire) and the CLI's rendering."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.admin import (
    format_audit,
    format_entries,
    format_outcome,
    format_status,
    format_why,
    why_exit_code,
)
from agent.config import parse_config
from agent.errors import (
    ConfigError,
    ErrorKind,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from agent.local.access import (
    Peer,
    RateLimiter,
    authorize,
    authorize_history,
    local_request_id,
    local_ttl,
)
from agent.local.wire import (
    LocalCallError,
    LocalRequest,
    decode_answer,
    decode_request,
    encode_error,
    encode_result,
)
from agent.policy import TtlBounds
from agent.state import LOCAL_PREFIX

BOUNDS = TtlBounds(minimum=60, maximum=604800, default=86400)


@pytest.mark.parametrize(
    ("requested", "cap", "seconds", "capped"),
    [
        (0, 3600, 3600, True),  # the default (a day) is longer than the cap
        (600, 3600, 600, False),
        (3600, 3600, 3600, False),
        (999_999, 3600, 3600, True),  # longer than ttl.max too: capped, not refused
        (0, 10_000_000, 86400, False),
        (999_999, 10_000_000, 604800, True),  # the cap never exceeds ttl.max
    ],
)
def test_local_grants_are_capped(requested: int, cap: int, seconds: int, capped: bool) -> None:
    ttl = local_ttl(requested, BOUNDS, cap)
    assert (ttl.seconds, ttl.capped) == (seconds, capped)


def test_a_local_ttl_below_the_minimum_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        local_ttl(5, BOUNDS, 3600)
    assert err.value.reason == "invalid_ttl"


def test_local_request_ids_carry_the_prefix_remote_envelopes_may_not_use() -> None:
    ids = {local_request_id() for _ in range(100)}
    assert len(ids) == 100
    for rid in ids:
        assert rid.startswith(LOCAL_PREFIX)
        assert 8 <= len(rid) <= 64


@pytest.mark.parametrize(
    ("peer", "gid", "allowed"),
    [
        (Peer(1, 0, 0), None, True),
        (Peer(1, 1000, 1000), None, False),
        (Peer(1, 1000, 1000), 1000, True),  # primary group
        (Peer(1, 1000, 100, (5, 1000)), 1000, True),  # supplementary group
        (Peer(1, 1000, 100, (5, 6)), 1000, False),
    ],
)
def test_only_root_and_group_members_may_connect(
    peer: Peer, gid: int | None, allowed: bool
) -> None:
    if allowed:
        authorize(peer, gid)
    else:
        with pytest.raises(PermissionDenied) as err:
            authorize(peer, gid)
        assert err.value.reason == "local_peer_not_allowed"


def test_only_root_reads_the_history() -> None:
    authorize_history(Peer(pid=1, uid=0, gid=0))
    with pytest.raises(PermissionDenied) as refused:
        authorize_history(Peer(pid=1, uid=1000, gid=50, groups=(50,)))
    assert refused.value.reason == "local_root_only"


def test_rate_limit_allows_a_burst_then_refills_per_peer() -> None:
    limiter = RateLimiter(per_minute=6, burst=3)
    for _ in range(3):
        limiter.take(1000, 0.0)
    with pytest.raises(ResourceExhausted) as err:
        limiter.take(1000, 0.0)
    assert err.value.reason == "rate_limited"
    limiter.take(0, 0.0)  # another peer has its own bucket
    limiter.take(1000, 10.0)  # one token back after 10 s at 6/min
    with pytest.raises(ResourceExhausted):
        limiter.take(1000, 10.0)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json\n", "bad_request"),
        (b"[1, 2]\n", "bad_request"),
        (b'{"args": {}}\n', "bad_request"),
        (b'{"op": "allow", "args": []}\n', "bad_request"),
        (b'{"op": "flush"}\n', "unknown_op"),
        (b"\xff\xfe\n", "bad_request"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_request(line)
    assert err.value.reason == reason


def test_requests_and_answers_round_trip() -> None:
    req = LocalRequest("allow", {"addresses": ["198.18.0.7"], "ttl": 60})
    assert decode_request(req.encode()) == req
    assert decode_answer(encode_result({"x": 1})) == {"x": 1}
    with pytest.raises(LocalCallError) as err:
        decode_answer(encode_error(ResourceExhausted("rate_limited", "retry in 2 s")))
    assert (err.value.kind, err.value.reason) == (ErrorKind.RESOURCE_EXHAUSTED, "rate_limited")


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('socket = "relative.sock"', "local.socket"),
        (f'socket = "/{"x" * 120}"', "local.socket"),
        ('group = "Bad Group"', "local.group"),
        ("ttl_cap_s = 0", "local.ttl_cap_s"),
        ("ttl_cap_s = 30", "local.ttl_cap_s"),  # below ttl.min
        ("rate_limit_burst = 0", "local.rate_limit_burst"),
        ("rate_limit_per_minute = true", "local.rate_limit_per_minute"),
        ("enabled = 1", "local.enabled"),
        ("sokcet = '/run/x.sock'", "local.sokcet"),
    ],
)
def test_local_config_errors_name_the_key(toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f'agent_id = "a1"\n[local]\n{toml}\n')
    assert err.value.key == key


def test_local_config_defaults() -> None:
    local = parse_config('agent_id = "a1"\n').local
    assert (str(local.socket), local.group, local.ttl_cap_s) == (
        "/run/vicifast-agent/local.sock",
        "",
        3600,
    )
    assert local.enabled


# --- rendering --------------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "agent_id": "a1",
    "version": "0.1.0",
    "pid": 42,
    "started_at_ms": 0,
    "now_ms": 7_200_000,
    "state_version": 17,
    "entries": 3,
    "local_entries": 1,
    "entries_by_profile": {"agent": 3},
    "in_sync": True,
    "last_verified_at_ms": 7_190_000,
    "drift_repairs": 2,
    "shadowing": [{"description": "ip filter chain input (priority 0) drops 5060/udp"}],
    "table": "inet vicifast",
    "listen": {"api": "[::]:7443", "metrics": "127.0.0.1:9617", "local": "/run/x.sock"},
}


def test_status_shows_what_a_sysadmin_looks_for() -> None:
    text = format_status(STATUS)
    for needle in (
        "a1",
        "3 (1 local",
        "state_version: 17",
        "in sync",
        "10s ago",
        "2 drift",
        "[::]:7443",
        "/run/x.sock",
        "SHADOWING",
        "ip filter chain input",
    ):
        assert needle in text
    assert "OUT OF SYNC" in format_status({**STATUS, "in_sync": False, "shadowing": []})


NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def _listed(n: int) -> dict[str, Any]:
    entry = {
        "address": "198.18.0.7",
        "profile": "agent",
        "subject": "",
        "expires_at_ms": NOW_MS + 3_599_000,
        "expires_in_s": 3599,
        "source": "local",
        "request_id": "local-0011223344556677",
    }
    return {"state_version": 5, "now_ms": NOW_MS, "entries": [entry] * n}


def test_list_is_a_table_with_absolute_and_relative_expiry() -> None:
    lines = format_entries(_listed(1)).splitlines()
    assert lines[0].split() == ["ADDRESS", "PROFILE", "SUBJECT", "EXPIRES", "SOURCE", "REQUEST"]
    assert lines[1].split() == [
        "198.18.0.7",
        "agent",
        "-",
        "2023-11-14T23:13:19Z",
        "(in",
        "59m",
        "59s)",
        "local",
        "local-0011223344556677",
    ]


@pytest.mark.parametrize(
    ("n", "summary"),
    [(0, "0 entries (state_version 5)"), (1, "1 entry (state_version 5)"), (2, "2 entries")],
)
def test_list_counts_entries_in_english(n: int, summary: str) -> None:
    assert format_entries(_listed(n)).splitlines()[-1].startswith(summary)


def test_audit_rows_are_a_table_in_utc_with_dashes_for_what_does_not_apply() -> None:
    erase = {
        "at_ms": 1_700_000_000_123,
        "action": "erase",
        "profile": "",
        "address": "",
        "subject": "",
        "request_id": "req-0011223344556677",
        "caller": "spiffe://vicifast/control-plane",
        "keyid": "k1",
        "detail": "2 entries revoked",
    }
    lines = format_audit({"now_ms": 0, "rows": [erase]}).splitlines()
    assert lines[0].split()[:2] == ["TIME", "ACTION"]
    assert lines[1].split() == [
        "2023-11-14T22:13:20Z",
        "erase",
        "-",
        "-",
        "-",
        "req-0011223344556677",
        "spiffe://vicifast/control-plane",
        "2",
        "entries",
        "revoked",
    ]
    assert lines[2] == "1 audit row"


def test_an_outcome_says_when_the_ttl_was_capped() -> None:
    result = {
        "request_id": "local-x",
        "state_version": 3,
        "ttl_s": 3600,
        "ttl_capped": True,
        "results": [
            {
                "address": "198.18.0.7",
                "profile": "agent",
                "status": "ADDED",
                "expires_at_ms": 3_600_000,
                "reason": "",
            }
        ],
    }
    text = format_outcome(result, now_ms=0)
    assert "capped" in text
    assert "ADDED" in text
    assert "1h 0m" in text


def _why(admitted: bool, outcomes: list[str]) -> dict[str, Any]:
    return {
        "packet": {"address": "198.18.0.7", "port": 5060, "protocol": "udp"},
        "agent": {
            "admission": "allowed" if admitted else "dropped",
            "admitted": admitted,
            "explanation": "because",
            "state_entry": None,
        },
        "other_chains": [
            {
                "chain": "ip filter input",
                "priority": 0,
                "policy": "accept",
                "outcome": o,
                "reason": "r",
            }
            for o in outcomes
        ],
    }


@pytest.mark.parametrize(
    ("admitted", "outcomes", "code"),
    [
        (True, [], 0),
        (True, ["accepts"], 0),
        (True, ["drops"], 1),
        (True, ["may_drop"], 1),
        (False, [], 1),
    ],
)
def test_why_exit_code_says_whether_the_packet_gets_in(
    admitted: bool, outcomes: list[str], code: int
) -> None:
    result = _why(admitted, outcomes)
    assert why_exit_code(result) == code
    text = format_why(result)
    assert ("verdict: admitted" in text) == (code == 0)
    json.dumps(result)
