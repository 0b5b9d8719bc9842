"""Daemon lifecycle figures: idle cost, restart, reboot restore, drift repair.

Owns one bench daemon (``bench.agentlab``) and its scratch namespaces, and the judging of what
it reads: /proc of the daemon for memory and CPU, READY=1 on the notify socket for readiness,
``bench.daemon_worker`` inside the namespace for drift repair. In order:

1. idle RSS with 0 entries (READY, then ``IDLE_SETTLE_S``);
2. one Sync of 100,000 entries (untimed here, see ``bench.rpc``), idle RSS with them, then the
   CPU it uses over ``BENCH_IDLE_S`` seconds (default 60) of idleness;
3. restart: SIGTERM -> the old process exits -> a new one says READY=1, then the kernel is
   checked to hold the 100,000 elements;
4. reboot: the daemon is stopped and started in a fresh namespace (an empty kernel) with the
   same state directory; time to READY=1, then the restored elements are counted;
5. drift: a Sync down to 10,000 entries, then ``nft flush ruleset`` until all are back (the
   median of ``DRIFT_REPEATS``). A repair that does not come within ``DRIFT_DEADLINE_S`` is
   reported as not measured (NaN), never as a number;
6. mass expiry: a fresh daemon, one Sync of 100,000 entries with the least TTL, then single
   Allows one after another until all of them have expired; the longest Allow while they do.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from agent.devlab import DevAgent
from bench import Figure, procfs
from bench.agentlab import SET_SIZE, TABLE, bench_agent, count_elements, work
from bench.netns import run_worker, scratch_netns

FULL = 100_000
DRIFT_ENTRIES = 10_000
DRIFT_REPEATS = 3
DRIFT_DEADLINE_S = 10.0
MASS_EXPIRY_TTL_S = 90  # more than a loaded machine takes for the Sync (the least TTL is 60)
IDLE_SETTLE_S = 2.0


def idle_window_s() -> float:
    return float(os.environ.get("BENCH_IDLE_S", "60"))


def _wait(seconds: float) -> None:
    # Idleness is what is measured here: there is nothing to await but time.
    time.sleep(seconds)


def _expect(agent: DevAgent, count: int, when: str) -> None:
    got = count_elements(agent)
    if got != count:
        raise RuntimeError(f"{when}: the kernel holds {got} elements, expected {count}")


def idle(agent: DevAgent) -> tuple[float, float, float]:
    """(RSS now in MB, CPU % over the idle window, the window in seconds)."""
    window = idle_window_s()
    _wait(IDLE_SETTLE_S)
    before, started = procfs.cpu_s(agent.pid), time.monotonic()
    _wait(window)
    used, elapsed = procfs.cpu_s(agent.pid) - before, time.monotonic() - started
    return procfs.rss_mb(agent.pid), 100 * used / elapsed, elapsed


def _forget_notifications(agent: DevAgent) -> None:
    # The next READY=1 must be the new process's, not one the old one left queued.
    if agent.notify is not None:
        agent.notify.drain()


def restart(agent: DevAgent) -> tuple[float, float]:
    """SIGTERM -> new process READY: (total seconds, seconds of it spent stopping)."""
    started = time.monotonic()
    agent.stop(timeout=60)
    stopped = time.monotonic()
    _forget_notifications(agent)
    agent.start(timeout=60)
    return time.monotonic() - started, stopped - started


def drift(agent: DevAgent) -> list[float | None]:
    work(agent, "sync", first=0, count=DRIFT_ENTRIES, set_size=SET_SIZE, raw_repeats=0)
    params = {
        "table": TABLE,
        "first": 0,
        "count": DRIFT_ENTRIES,
        "repeats": DRIFT_REPEATS,
        "deadline_s": DRIFT_DEADLINE_S,
    }
    result = run_worker(agent.netns, "bench.daemon_worker", "drift", json.dumps(params))
    repairs: list[float | None] = result["repairs_s"]
    return repairs


def drift_figure(repairs: list[float | None]) -> Figure:
    done = [r for r in repairs if r is not None]
    if not done or len(done) < len(repairs):
        return Figure(
            "daemon.drift_repair_ms",
            float("nan"),
            "ms",
            1000.0,
            f"NOT MEASURED: table and {DRIFT_ENTRIES // 1000}k entries not back within "
            f"{DRIFT_DEADLINE_S:.0f} s of nft flush ruleset (repairs: {repairs})",
        )
    return Figure(
        "daemon.drift_repair_ms",
        statistics.median(done) * 1000,
        "ms",
        1000.0,
        f"nft flush ruleset -> {DRIFT_ENTRIES // 1000}k entries back, median of {len(done)}; "
        f"all: {', '.join(f'{r * 1000:.0f}' for r in done)}",
    )


def mass_expiry_figure() -> Figure:
    """The longest single Allow while ``FULL`` entries of one Sync expire together: an upper
    bound of the writer's longest hold (it adds the call's own ~2 ms)."""
    name, target = "daemon.mass_expiry_writer_hold_ms", 50.0
    with bench_agent("vf-bench-expiry") as agent:
        got = work(agent, "mass_expiry", count=FULL, ttl_s=MASS_EXPIRY_TTL_S, probe_first=FULL)
    readings = got["readings"]
    during = [i for i, (_, expired) in enumerate(readings) if expired]
    if got["expired"] < FULL or not during or got["sync_s"] > MASS_EXPIRY_TTL_S / 2:
        return Figure(
            name,
            float("nan"),
            "ms",
            target,
            f"NOT MEASURED: {got['expired']} of {FULL} expiries seen, Sync took "
            f"{got['sync_s']:.0f} s of the {MASS_EXPIRY_TTL_S} s TTL",
        )
    window = readings[during[0] : during[-1] + 1]
    longest = max(latency for latency, _ in window)
    return Figure(
        name,
        longest * 1000,
        "ms",
        target,
        f"longest of {len(window)} sequential Allows answered while {FULL // 1000}k entries "
        f"expired together (Allow latency: an upper bound of the hold); median "
        f"{statistics.median(lat for lat, _ in window) * 1000:.1f} ms",
    )


def run() -> list[Figure]:
    figures: list[Figure] = []
    with bench_agent("vf-bench-daemon") as agent:
        _wait(IDLE_SETTLE_S)
        figures.append(
            Figure(
                "daemon.rss_idle_mb",
                procfs.rss_mb(agent.pid),
                "MB",
                80.0,
                "idle daemon holding 0 entries, VmRSS",
            )
        )
        work(agent, "sync", first=0, count=FULL, set_size=SET_SIZE, raw_repeats=0)
        rss, cpu, window = idle(agent)
        figures += [
            Figure(
                "daemon.rss_idle_mb_100k",
                rss,
                "MB",
                note="idle daemon holding 100k entries, VmRSS (informative)",
            ),
            Figure(
                "daemon.cpu_idle_pct",
                cpu,
                "%",
                1.0,
                f"utime+stime over {window:.0f} s idle with 100k entries (BENCH_IDLE_S)",
            ),
        ]

        total, stopping = restart(agent)
        _expect(agent, FULL, "after the restart")
        figures.append(
            Figure(
                "daemon.restart_ready_s",
                total,
                "s",
                2.0,
                f"SIGTERM -> READY=1, 100k entries; old process exited after {stopping:.2f} s",
            )
        )

        agent.stop(timeout=60)
        with scratch_netns("vf-bench-reboot") as rebooted:
            agent.netns = rebooted
            _forget_notifications(agent)
            started = time.monotonic()
            agent.start(timeout=60)
            restore = time.monotonic() - started
            _expect(agent, FULL, "after the reboot")
            figures.append(
                Figure(
                    "daemon.restore_100k_s",
                    restore,
                    "s",
                    3.0,
                    "fresh namespace, same state dir: start -> READY=1, 100k entries restored",
                )
            )
            figures.append(drift_figure(drift(agent)))
            agent.stop(timeout=60)
    figures.append(mass_expiry_figure())
    return figures
