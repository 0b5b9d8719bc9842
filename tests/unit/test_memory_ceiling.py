"""Memory has a ceiling: an over-cap request is refused by its count on the wire, before one
entry of it is built, and the largest request the default config admits, replacing a full
table, fits the unit's MemoryMax with a quarter to spare (the arithmetic of the README's
"Known misses", from measured figures)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import agent.rpc.convert
from agent.config import AgentConfig, FirewallConfig, LimitsConfig, parse_config
from agent.errors import ResourceExhausted
from agent.rpc.convert import allow_command, revoke_command, sync_command
from agent.rpc.pb import agent_pb2
from agent.state import RequestMeta

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vicifast-agent.service"
# Measured with bench.rpc's sync_max (README, "Known misses"): the daemon's RSS before a Sync
# replacing a full table, and what each entry of such a Sync adds at its peak, worst case
# (IPv6 /64 entries), rounded up.
BASE_MB = 140
PEAK_KB_PER_ENTRY = 5.2


def memory_max_mb() -> float:
    for line in UNIT.read_text().splitlines():
        if line.startswith("MemoryMax="):
            value = line.partition("=")[2]
            assert value.endswith("M"), value
            return float(value[:-1])
    raise AssertionError("the unit has no MemoryMax")


def largest_admitted() -> int:
    limits, firewall = LimitsConfig(), FirewallConfig()
    return min(
        limits.max_entries_per_request,
        limits.max_entries,
        firewall.set_size_ipv4 + firewall.set_size_ipv6,
    )


def test_the_largest_admitted_sync_replacing_a_full_table_fits_three_quarters_of_memory_max() -> (
    None
):
    peak_mb = BASE_MB + largest_admitted() * PEAK_KB_PER_ENTRY / 1024
    assert peak_mb <= 0.75 * memory_max_mb()


def meta() -> RequestMeta:
    now = int(time.time() * 1000)
    return RequestMeta("cap-1", "Sync", now, now + 60_000, bytes(32), "cp")


def config(cap: int) -> AgentConfig:
    return parse_config(
        'agent_id = "t"\n[firewall]\npermit_test_ranges = true\n'
        f"[limits]\nmax_entries_per_request = {cap}\nmax_entries = {cap}\n"
    )


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Addresses of the entries built into values."""
    made: list[str] = []
    real = agent.rpc.convert.make_allow_entry

    def counted(**kwargs: Any) -> Any:
        made.append(kwargs["address"])
        return real(**kwargs)

    monkeypatch.setattr(agent.rpc.convert, "make_allow_entry", counted)
    return made


def _entries(n: int) -> list[agent_pb2.AllowEntry]:
    # Not one of them valid: were any built, the refusal would be invalid_address.
    return [agent_pb2.AllowEntry(address="not-an-address", ttl_seconds=60) for _ in range(n)]


@pytest.mark.parametrize("rpc", ["Allow", "Sync"])
def test_an_over_cap_request_is_refused_before_any_entry_is_built(
    built: list[str], rpc: str
) -> None:
    cfg = config(4)

    def convert() -> object:
        if rpc == "Allow":
            return allow_command(agent_pb2.AllowRequest(entries=_entries(5)), meta(), cfg)
        return sync_command(agent_pb2.SyncRequest(entries=_entries(5)), meta(), cfg)

    with pytest.raises(ResourceExhausted) as refused:
        convert()
    assert refused.value.reason == "request_too_large"
    assert built == []


def test_an_over_cap_revoke_is_refused_before_any_address_is_read() -> None:
    cfg = config(4)
    with pytest.raises(ResourceExhausted) as refused:
        revoke_command(agent_pb2.RevokeRequest(addresses=["not-an-address"] * 5), meta(), cfg)
    assert refused.value.reason == "request_too_large"


def test_a_request_at_the_cap_is_built() -> None:
    cfg = config(2)
    entries = [
        agent_pb2.AllowEntry(address=f"198.18.0.{i}", ttl_seconds=600, subject="a") for i in (1, 2)
    ]
    cmd = sync_command(agent_pb2.SyncRequest(entries=entries), meta(), cfg)
    assert [e.address.text for e in cmd.entries] == ["198.18.0.1", "198.18.0.2"]
