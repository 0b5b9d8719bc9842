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
* The largest Sync the default config admits (its caps, IPv6 first) replacing a table as
  full, in a daemon with the default config: its peak RSS against the unit's MemoryMax.
* Sequential single-address Revokes, each source with a live conntrack flow: the rate, and
  whether every flow was cut afterwards.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from agent.config import FirewallConfig, LimitsConfig
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
HEADROOM = 0.75  # the largest request must peak below this share of MemoryMax
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "vicifast-agent.service"
REVOKE_WARMUP = 50
REVOKES = 1_000
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


def memory_max_mb(unit: Path = UNIT) -> float:
    """The unit's ``MemoryMax`` in MB (MiB, as systemd reads ``M``)."""
    for line in unit.read_text().splitlines():
        if line.startswith("MemoryMax="):
            value = line.partition("=")[2].strip()
            scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}[value[-1]]
            return float(value[:-1]) * scale
    raise RuntimeError(f"no MemoryMax in {unit}")


def largest_request() -> tuple[int, int]:
    """(IPv4, IPv6) entries of the largest Sync the default config admits: as many as the caps
    allow, IPv6 first (a /64 is an interval: more kernel and libnftables memory per entry)."""
    limits, firewall = LimitsConfig(), FirewallConfig()
    largest = min(
        limits.max_entries_per_request,
        limits.max_entries,
        firewall.set_size_ipv4 + firewall.set_size_ipv6,
    )
    v6 = min(largest, firewall.set_size_ipv6)
    return largest - v6, v6


def sync_max_figure() -> Figure:
    """Peak RSS of the largest Sync the default config admits, replacing a table as full."""
    cap = memory_max_mb()
    v4, v6 = largest_request()
    with bench_agent("vf-bench-max", firewall_toml="", extra_toml="") as agent:
        got = work(agent, "sync_max", v4=v4, v6=v6)
    return Figure(
        "rpc.sync_max_peak_rss_mb",
        got["peak_rss_mb"],
        "MB",
        HEADROOM * cap,
        f"default config: Sync of {v4} IPv4 + {v6} IPv6 entries replacing as many, "
        f"{got['sync_s']:.1f} s; VmHWM (reset before it; {got['rss_before_mb']:.0f} MB before); "
        f"target {HEADROOM:.0%} of MemoryMax={cap:.0f}M; one entry more refused "
        f"({got['refused'] or 'NOT REFUSED'}), {got['rss_after_refused_mb']:.0f} MB after",
    )


def revoke_seq_figure() -> Figure:
    """Sequential single-address Revokes, each source with a live conntrack flow."""
    with bench_agent("vf-bench-revoke") as agent:
        got = work(agent, "revoke_seq", first=0, warmup=REVOKE_WARMUP, count=REVOKES)
        # The same daemon's sequential Allows, for scale: both are bound by the per-call cost.
        allows = work(agent, "allow_seq", first=2 * REVOKES, warmup=REVOKE_WARMUP, count=REVOKES)
    allow_rate = len(allows["latencies_s"]) / sum(allows["latencies_s"])
    return Figure(
        "rpc.revoke_seq_per_s",
        got["count"] / got["elapsed_s"],
        "1/s",
        note=f"{got['count']} Revokes, 1 caller, each source with a conntrack flow; flows "
        f"{got['flows_before']} -> {got['flows_left']} left {got['cuts_done_s']:.1f} s after "
        f"the first timed Revoke; sequential Allows in the same daemon: {allow_rate:.0f}/s",
        target_min=300.0,
    )


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
    return [*allow, *sync_figures(sync, rss_after), sync_max_figure(), revoke_seq_figure()]
