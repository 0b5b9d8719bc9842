"""The writer's expiry looks only at the entries whose time has come: a deadline left behind by a
refresh is dropped once passed, not looked at again before every group. The real table in a lab
namespace, the real store in a file, the writer's clock in the test's hand."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from tablekit import Rig

import agent.engine
from agent.engine import Engine
from agent.model import AllowEntry, EntryKey
from agent.state import AllowCmd, Decision, RequestMeta, StateView

T0 = 1_900_000_000_000


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> float:
        return self.ms / 1000


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def looked_at(monkeypatch: pytest.MonkeyPatch) -> list[list[EntryKey] | None]:
    """The keys each expiry looked at (None: every entry)."""
    calls: list[list[EntryKey] | None] = []
    real = agent.engine.expire

    def counted(view: StateView, now_ms: int, keys: Iterable[EntryKey] | None = None) -> Decision:
        keys = None if keys is None else list(keys)
        calls.append(keys)
        return real(view, now_ms, keys)

    monkeypatch.setattr(agent.engine, "expire", counted)
    return calls


@pytest.fixture
def engine(make_engine: Callable[..., Engine], clock: Clock) -> Engine:
    return make_engine(clock=clock)


def allow(rig: Rig, clock: Clock, n: int, address: str, ttl_s: int) -> AllowCmd:
    meta = RequestMeta(
        f"req-{n:04d}", "Allow", clock.ms, clock.ms + 60_000, n.to_bytes(32, "big"), "cp"
    )
    return AllowCmd(meta, (AllowEntry(rig.key(address).address, "agent", ttl_s, f"agent-{n}"),))


def test_a_passed_stale_deadline_is_looked_at_once_and_due_entries_alone_expire(
    rig: Rig, engine: Engine, clock: Clock, looked_at: list[list[EntryKey] | None]
) -> None:
    a, b = rig.key("198.18.9.1"), rig.key("198.18.9.2")
    engine.submit(allow(rig, clock, 1, "198.18.9.1", 60))
    engine.submit(allow(rig, clock, 2, "198.18.9.2", 3600))
    clock.ms += 1000
    engine.submit(allow(rig, clock, 3, "198.18.9.1", 600))  # a refresh: 60 s becomes stale

    clock.ms = T0 + 61_000  # the stale deadline has passed; nothing is due
    engine.submit(allow(rig, clock, 4, "198.18.9.3", 3600))
    assert looked_at == [[a]]  # the one key whose (stale) time had come, not every entry
    engine.submit(allow(rig, clock, 5, "198.18.9.4", 3600))
    assert looked_at == [[a]]  # and never again: nothing else is due
    assert engine.expiries == 0

    clock.ms = T0 + 1000 + 600_000  # the refreshed entry's time
    engine.submit(allow(rig, clock, 6, "198.18.9.5", 3600))
    assert looked_at == [[a], [a]]
    assert engine.expiries == 1
    live, _ = engine.snapshot()
    assert a not in {e.key for e in live}
    assert {b, rig.key("198.18.9.3"), rig.key("198.18.9.4")} < {e.key for e in live}
