"""Memory has a ceiling: an over-cap request (counted on the wire) is refused without one entry
of it held as a value, and the largest request the default config admits, replacing a full
table, fits the unit's MemoryMax with a quarter to spare (the arithmetic of the README's
"Known misses", from measured figures)."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import AgentConfig, FirewallConfig, LimitsConfig, parse_config
from agent.errors import InvalidArgument, ResourceExhausted
from agent.rpc.convert import allow_command, sync_command
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


N = 20_000


def _valid(n: int) -> list[agent_pb2.AllowEntry]:
    return [
        agent_pb2.AllowEntry(
            address=f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}",
            ttl_seconds=600,
            subject=f"agent-{i:06d}@dialer.example.com",
        )
        for i in range(n)
    ]


def _peak_kib(fn: Callable[[], object]) -> float:
    """Peak memory Python allocated while ``fn`` ran, what it returned still held."""
    tracemalloc.start()
    try:
        kept = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return peak / 1024


@pytest.mark.parametrize("rpc", ["Allow", "Sync"])
def test_an_over_cap_request_is_refused_without_its_entries_held_as_values(rpc: str) -> None:
    """Field validation still comes first (PROTOCOL.md), entry by entry, but no entry of a
    request over the cap is kept: its peak is a fraction of what the admitted one holds."""
    over, at_cap = config(N - 1), config(N)

    def convert(cfg: AgentConfig) -> object:
        if rpc == "Allow":
            return allow_command(agent_pb2.AllowRequest(entries=_valid(N)), meta(), cfg)
        return sync_command(agent_pb2.SyncRequest(entries=_valid(N)), meta(), cfg)

    def refused() -> object:
        with pytest.raises(ResourceExhausted) as refusal:
            convert(over)
        assert refusal.value.reason == "request_too_large"
        return None

    admitted_kib = _peak_kib(lambda: convert(at_cap))
    refused_kib = _peak_kib(refused)

    assert refused_kib < admitted_kib / 2


def test_an_over_cap_request_with_a_bad_field_is_refused_for_the_field() -> None:
    entries = [*_valid(4), agent_pb2.AllowEntry(address="10.0.0.1", ttl_seconds=600)]
    with pytest.raises(InvalidArgument) as refused:
        allow_command(agent_pb2.AllowRequest(entries=entries), meta(), config(4))
    assert refused.value.reason == "address_not_global"


def test_a_request_at_the_cap_is_built() -> None:
    cfg = config(2)
    entries = [
        agent_pb2.AllowEntry(address=f"198.18.0.{i}", ttl_seconds=600, subject="a") for i in (1, 2)
    ]
    cmd = sync_command(agent_pb2.SyncRequest(entries=entries), meta(), cfg)
    assert [e.address.text for e in cmd.entries] == ["198.18.0.1", "198.18.0.2"]
