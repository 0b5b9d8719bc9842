"""What the metrics read from the daemon at scrape time: a small read-only protocol.

Owns the boundary between the metrics and the rest of the daemon. The collectors see only this
protocol and plain values, never the engine, the store or the table, so a scrape can never change
state and a test can hand in a stand-in. Every method is called from the HTTP listener's thread
and must be cheap, thread-safe and free of side effects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.rules.readback import CounterValue
from agent.state import Entry


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """The daemon's own figures about its table, as of the call.

    ``drift_repairs``, ``expiries``, ``flows_cut`` and ``flow_cut_failures`` are totals since
    the process started (Prometheus counters restart with the process); ``last_verified_at_ms``
    is 0 until a verification succeeded.
    """

    in_sync: bool
    last_verified_at_ms: int
    drift_repairs: int
    expiries: int
    shadowing: bool
    flows_cut: int
    flow_cut_failures: int
    # Drift repairs keep coming (``agent.verify.RepairRate``): something fights over the table.
    repair_storm: bool = False

    def __post_init__(self) -> None:
        totals = (self.drift_repairs, self.expiries, self.flows_cut, self.flow_cut_failures)
        if min(self.last_verified_at_ms, *totals) < 0:
            raise ValueError(f"figures must not be negative: {self}")


class MetricsSource(Protocol):
    """Implemented by the daemon; a stand-in in tests."""

    def snapshot(self) -> tuple[Sequence[Entry], int]:
        """Entries the kernel enforces now and the state version (``Engine.snapshot``)."""
        ...

    def metrics_status(self) -> SourceStatus: ...


class CounterSource(Protocol):
    """The table's named counters, read from the kernel at each call (``NamedCounterReader``)."""

    def read(self) -> Mapping[str, CounterValue]: ...

    def close(self) -> None: ...
