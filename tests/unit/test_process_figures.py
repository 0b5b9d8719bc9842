"""The process figures are exported under the unit's ProcSubset=pid, which hides /proc/stat."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from agent.metrics.collectors import ProcessFigures


def _proc_without_stat(tmp_path: Path) -> Path:
    """A /proc as ProcSubset=pid shows it to the daemon: its own pid directory, no stat file."""
    (tmp_path / "self").symlink_to(f"/proc/{os.getpid()}")
    return tmp_path


def _scrape(collector: type[ProcessCollector], proc: Path) -> str:
    registry = CollectorRegistry()
    collector(proc=str(proc), registry=registry)
    return generate_latest(registry).decode()


def test_the_library_collector_exports_nothing_without_proc_stat(tmp_path: Path) -> None:
    # The reason for ProcessFigures: if this starts passing the workaround can go.
    assert "process_resident_memory_bytes" not in _scrape(
        ProcessCollector, _proc_without_stat(tmp_path)
    )


def test_memory_descriptors_and_start_time_are_exported_without_proc_stat(tmp_path: Path) -> None:
    text = _scrape(ProcessFigures, _proc_without_stat(tmp_path))
    for name in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert f"\n{name} " in text, name
    start = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("process_start_time_seconds ")
    )
    # The boot time from the clock, as /proc/stat's btime would give it: this process started
    # within the last day, not in 1970.
    assert time.time() - 86_400 < start <= time.time() + 1
