"""The accept gate's bookkeeping (agent.rpc.gate) and its configuration: pure, no sockets."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from agent.rpc.gate import GateCounts, GateLimits, descriptors_needed, source_key

MINIMAL = 'agent_id = "a1"\n'


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("198.18.0.7", "198.18.0.7"),
        ("::ffff:198.18.0.7", "198.18.0.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64(peer: str, key: str) -> None:
    assert source_key(peer) == key


def test_counts_refuse_over_the_per_source_cap_then_over_the_total() -> None:
    counts = GateCounts(GateLimits(3, 2, handshake_timeout_s=5))
    assert counts.admit("a") is None
    assert counts.admit("a") is None
    assert counts.admit("a") == "too_many_connections_from_source"
    assert counts.admit("b") is None
    assert counts.admit("c") == "too_many_connections"
    counts.release("a")
    assert counts.admit("c") is None
    assert (counts.total, dict(counts.by_source)) == (3, {"a": 1, "b": 1, "c": 1})
    for key in ("a", "b", "c"):
        counts.release(key)
    assert (counts.total, dict(counts.by_source)) == (0, {})


def test_descriptors_are_three_per_connection_plus_a_reserve() -> None:
    assert descriptors_needed(1024) == 4096


def test_connection_keys_have_safe_defaults() -> None:
    api = parse_config(MINIMAL).api
    assert (api.max_connections, api.max_connections_per_source) == (1024, 64)
    assert (api.handshake_timeout_s, api.max_connection_idle_s) == (5, 300)
    assert (api.max_connection_age_s, api.keepalive_s) == (3600, 60)
    assert (api.max_watchers, api.watch_buffer_events, api.watch_stall_timeout_s) == (64, 1000, 60)


@pytest.mark.parametrize(
    ("api", "key"),
    [
        ("max_connections = 10\nmax_connections_per_source = 11", "api.max_connections_per_source"),
        ("max_connections = 0", "api.max_connections"),
        ("handshake_timeout_s = 0", "api.handshake_timeout_s"),
        ("handshake_timeout_s = 31", "api.handshake_timeout_s"),
        ("max_connection_idle_s = 59", "api.max_connection_idle_s"),
        ("max_connection_age_s = 59", "api.max_connection_age_s"),
        ("keepalive_s = 5", "api.keepalive_s"),
        ("max_watchers = 0", "api.max_watchers"),
        ("watch_buffer_events = 10001", "api.watch_buffer_events"),
        ("watch_stall_timeout_s = true", "api.watch_stall_timeout_s"),
    ],
)
def test_bad_connection_keys_are_refused_naming_the_key(api: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + "[api]\n" + api + "\n")
    assert caught.value.key == key
