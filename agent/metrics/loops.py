"""Scrape-time metrics of the daemon's supervised loops (``agent.supervise``).

Owns ``vicifast_agent_loop_faults_total`` and ``vicifast_agent_loop_stalled``, one series per loop,
present from the first scrape (0 until something happens). Reads the ``Supervision`` it was
handed and never changes it.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.metrics.collectors import PREFIX
from agent.supervise import Supervision


class LoopCollector(Collector):
    """Faults per loop since start, and which loops are stalled right now."""

    def __init__(self, supervision: Supervision) -> None:
        self.supervision = supervision

    def collect(self) -> Iterator[Metric]:
        faults = CounterMetricFamily(
            PREFIX + "loop_faults",
            "Unexpected exceptions caught in each of the daemon's loops, which went on after a "
            "back-off (see the journal: REASON=loop_fault LOOP=...).",
            labels=["loop"],
        )
        for name, count in self.supervision.faults().items():
            faults.add_metric([name], count)
        yield faults
        stalled = GaugeMetricFamily(
            PREFIX + "loop_stalled",
            "1 while a loop has made no progress within its deadline: the systemd watchdog is "
            "not fed then, and systemd restarts the daemon.",
            labels=["loop"],
        )
        now_stalled = set(self.supervision.stalled())
        for name in self.supervision.names:
            stalled.add_metric([name], int(name in now_stalled))
        yield stalled
