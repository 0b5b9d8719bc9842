"""A mass expiry does not hold the writer: Allows sent while tens of thousands of entries expire
together are answered between the expiry's slices, each in a fraction of the time the whole
expiry takes. The real table in a lab namespace, the real store in a file, the writer's wall
clock in the test's hand (monotonic time is real: the slices are sized by it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tablekit import Rig

from agent.engine import Engine
from agent.model import Address, AllowEntry
from agent.rules.conntrack import ForgetResult, Guard
from agent.state import AllowCmd, Limits, RequestMeta, SyncCmd
from agent.store import Store

T0_MS = 1_900_000_000_000
ENTRIES = 60_000


class Clock:
    def __init__(self) -> None:
        self.ms = T0_MS

    def __call__(self) -> float:
        return self.ms / 1000


def address(i: int) -> Address:
    return Address(f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}")


def meta(clock: Clock, n: int, rpc: str) -> RequestMeta:
    return RequestMeta(
        f"mass-{n:05d}", rpc, clock.ms, clock.ms + 60_000, n.to_bytes(32, "big"), "cp"
    )


def no_cut(addresses: object, guard: Guard) -> ForgetResult:
    return ForgetResult(0, 0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(rig: Rig, tmp_path: Path, clock: Clock) -> Iterator[Engine]:
    store = Store.open(tmp_path / "state.db")
    engine = Engine(
        store=store,
        table=rig.table,
        limits=Limits(max_entries=ENTRIES + 100, set_size={4: 65_536, 6: 1024}),
        profiles=("agent",),
        forget_window_ms=180_000,
        clock=clock,
        cut_flows=no_cut,
    )
    engine.load()
    engine.start()
    yield engine
    engine.stop()
    store.close()


def test_allows_are_answered_while_a_mass_expiry_is_in_progress(
    engine: Engine, clock: Clock
) -> None:
    entries = tuple(AllowEntry(address(i), "agent", 600, "agent-1") for i in range(ENTRIES))
    synced = engine.submit(SyncCmd(meta(clock, 0, "Sync"), entries), timeout=120)
    clock.ms += 601_000  # every synced entry is due at once
    began = time.monotonic()

    latencies: list[float] = []
    answered_during: list[int] = []  # entries still there when an Allow was answered
    n = 1
    deadline = time.monotonic() + 60
    while engine.entry_count > n - 1 and time.monotonic() < deadline:
        cmd = AllowCmd(
            meta(clock, n, "Allow"), (AllowEntry(address(ENTRIES + n), "agent", 3600, "a-2"),)
        )
        started = time.monotonic()
        outcome = engine.submit(cmd, timeout=30)
        latencies.append(time.monotonic() - started)
        answered_during.append(outcome.state_version - synced.state_version - n)
        n += 1

    whole_s = time.monotonic() - began
    assert engine.entry_count == n - 1  # the synced entries are gone, the Allows stay
    assert engine.expiries == ENTRIES
    expired_before = answered_during[0]
    assert expired_before < ENTRIES  # the first Allow did not wait for the whole expiry
    assert sum(1 for expired in answered_during if expired < ENTRIES) >= 3
    # Each waited for a slice or two (about 12 ms each), not for the expiry (about 1 s on the
    # dev machine; both grow alike on a loaded one).
    assert max(latencies) < whole_s / 3
