"""Control-plane API figures: the real daemon called over real mTLS by the project's client.

Owns the judging of ``bench.rpc_worker``'s readings (percentiles, rates, ratios, targets) and
the two daemons it measures, each in a scratch namespace it deletes. Every call is a signed
envelope verified by the daemon and committed durably (SQLite, synchronous=FULL) before it is
answered; the clients run in the daemon's namespace, so no relay sits in the timed path.

* Allow latency and throughput: a daemon holding 10,000 entries (one Sync), then single-entry
  Allows of new addresses, first one caller at a time, then 64 concurrent callers (one grpc.aio
  channel in one worker process, envelopes signed before the clock starts; the note shows the
  client's CPU use so a client-bound figure would show itself).
* Allow latency under a flood of idle connections: the same daemon, single-entry Allows one
  caller at a time while ``bench.flood`` keeps 2,000 idle TCP connections open to its API port
  from 40 loopback sources (re-opening those the daemon closes at its handshake timeout, as an
  attacker would). The daemon's ``[api] max_connections`` is raised to hold all 2,000 (the
  default 1,024 would reset half of them at once), so this is the cost of holding them.
* Sync of 100,000: an empty daemon, one Sync of 100,000 new entries, against raw ``nft -f``
  adding the same elements (same timeouts, same comments) to a set of the same type, in the same
  run; the daemon's VmHWM is reset right before the Sync, so its peak is the Sync's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench import Figure, procfs
from bench.agentlab import SET_SIZE, bench_agent, work
from bench.flood import Flood

PRELOAD = 10_000
SEQUENTIAL_WARMUP = 100
SEQUENTIAL = 1_000
CALLERS = 64
CONCURRENT_WARMUP = 256
CONCURRENT = 3_000
SYNC = 100_000
RAW_REPEATS = 3
SETTLE_S = 2.0
IDLE_CONNECTIONS = 2_000
IDLE_PER_SOURCE = 50
IDLE_WARMUP = 50
IDLE_CALLS = 3_000  # about 9 s: at least one round of handshake timeouts and re-opens
# (the quiet reference takes the IDLE_WARMUP + IDLE_CALLS addresses below IDLE_FIRST)
# Room for the flood and the bench's own connection (the default caps: 1,024 and 64).
IDLE_API_TOML = "max_connections = 2100\nmax_connections_per_source = 64"
# Address indexes (see bench.rpc_worker.address): disjoint ranges per phase.
SEQUENTIAL_FIRST = PRELOAD
CONCURRENT_FIRST = 20_000
IDLE_FIRST = 32_000


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def allow_figures(seq: dict[str, Any], conc: dict[str, Any]) -> list[Figure]:
    latencies = seq["latencies_s"]
    rate = conc["count"] / conc["elapsed_s"]
    cpu = {who: conc[f"{who}_cpu_s"] / conc["elapsed_s"] for who in ("daemon", "client")}
    held = f"daemon holding {PRELOAD // 1000}k entries"
    return [
        Figure(
            "rpc.allow_p50_ms",
            statistics.median(latencies) * 1000,
            "ms",
            3.0,
            f"1 entry, 1 caller, {len(latencies)} calls, {held}",
        ),
        Figure("rpc.allow_p99_ms", p99(latencies) * 1000, "ms", 10.0),
        Figure(
            "rpc.allow_concurrent_per_s",
            rate,
            "1/s",
            note=f"{conc['callers']} callers, {conc['count']} calls; CPU-s per s: "
            f"daemon {cpu['daemon']:.2f}, client {cpu['client']:.2f}",
            target_min=2000.0,
        ),
    ]


def idle_connections_figures(
    idle: dict[str, Any], flood: dict[str, Any], quiet: dict[str, Any]
) -> list[Figure]:
    latencies = idle["latencies_s"]
    reference = quiet["latencies_s"]
    return [
        Figure(
            "rpc.allow_p99_ms_idle_conns",
            p99(latencies) * 1000,
            "ms",
            10.0,
            f"1 entry, 1 caller, {len(latencies)} calls while {IDLE_CONNECTIONS} idle TCP "
            f"connections are kept open (held {flood.get('held_min', 0)}-"
            f"{flood.get('held_max', 0)}, {flood.get('reopened', 0)} re-opened after the "
            f"handshake timeout); p50 {statistics.median(latencies) * 1000:.1f} ms; "
            f"the same daemon just before, without them: p99 {p99(reference) * 1000:.1f} ms",
        )
    ]


def run_idle_connections() -> list[Figure]:
    """Only the idle-connection figure: its own daemon holding ``PRELOAD`` entries."""
    with bench_agent("vf-bench-idle", api_toml=IDLE_API_TOML) as agent:
        work(agent, "sync", first=0, count=PRELOAD, set_size=SET_SIZE, raw_repeats=0)
        # The machine's own noise, measured in the same run: the same calls without the flood.
        quiet = work(
            agent,
            "allow_seq",
            first=IDLE_FIRST - IDLE_CALLS - IDLE_WARMUP,
            warmup=IDLE_WARMUP,
            count=IDLE_CALLS,
        )
        with Flood(agent.netns, agent.api_target(), IDLE_CONNECTIONS, IDLE_PER_SOURCE) as flood:
            idle = work(agent, "allow_seq", first=IDLE_FIRST, warmup=IDLE_WARMUP, count=IDLE_CALLS)
    return idle_connections_figures(idle, flood.result, quiet)


def sync_figures(sync: dict[str, Any], rss_after_mb: float) -> list[Figure]:
    raw = sync["raw_s"]
    sync_s = sync["sync_s"]
    raw_s = statistics.median(raw)
    return [
        Figure(
            "rpc.sync_100k_ratio",
            sync_s / raw_s,
            "x nft -f",
            3.0,
            f"Sync {sync_s:.2f} s (client build+sign {sync['client_build_sign_s']:.2f} s) "
            f"vs nft -f {raw_s:.2f} s",
        ),
        Figure("rpc.sync_100k_s", sync_s, "s", note="end to end, empty daemon"),
        Figure("rpc.sync_100k_nft_s", raw_s, "s", note=f"raw nft -f, median of {len(raw)}"),
        Figure(
            "rpc.sync_100k_peak_rss_mb",
            sync["peak_rss_mb"],
            "MB",
            300.0,
            "daemon VmHWM, reset right before the Sync",
        ),
        Figure(
            "daemon.rss_mb_100k",
            rss_after_mb,
            "MB",
            200.0,
            f"daemon VmRSS holding the Sync's entries, {SETTLE_S:.0f} s after it",
        ),
    ]


def run() -> list[Figure]:
    with bench_agent("vf-bench-rpc") as agent:
        work(agent, "sync", first=0, count=PRELOAD, set_size=SET_SIZE, raw_repeats=0)
        seq = work(
            agent,
            "allow_seq",
            first=SEQUENTIAL_FIRST,
            warmup=SEQUENTIAL_WARMUP,
            count=SEQUENTIAL,
        )
        conc = work(
            agent,
            "allow_conc",
            first=CONCURRENT_FIRST,
            warmup=CONCURRENT_WARMUP,
            count=CONCURRENT,
            callers=CALLERS,
        )
    allow = allow_figures(seq, conc) + run_idle_connections()
    with bench_agent("vf-bench-sync") as agent:
        sync = work(agent, "sync", first=0, count=SYNC, set_size=SET_SIZE, raw_repeats=RAW_REPEATS)
        # Holding the entries, not answering the Sync: the daemon gives memory back on its
        # first idle turn (within a second), so this is read once that has passed.
        time.sleep(SETTLE_S)
        rss_after = procfs.rss_mb(agent.pid)
    return allow + sync_figures(sync, rss_after)
