"""``make soak`` (``python -m bench.soak [NAME ...]``): long runs against the real daemon.

Owns the list of soak scenarios and the table it prints; each scenario owns a fresh daemon in a
scratch namespace (``bench.agentlab.bench_agent``) that it deletes, and sends traffic only over
that namespace's loopback (through a ``TcpRelay``) or from inside it. Every scenario is bounded
in count and in time, and returns ``dict[str, float]``: its figures, printed as one table. A
scenario that raises is reported as failed and the others still run; the exit status is 1 if
any failed. Nothing is written to ``bench/results.json``: these are endurance checks, not
performance figures.

A scenario is added with one line in ``SCENARIOS``: ``"name": "module:function"``, where the
function takes no argument and returns ``dict[str, float]`` (e.g. ``bench/soak_restarts.py``'s
``scenario``, here as ``kill_restarts``). A module that is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from agent.devlab import DevAgent
from agent.rpc.client import AgentCallError, AgentClient, Entry
from agent.rpc.pb import agent_pb2, agent_pb2_grpc
from bench import procfs
from bench.agentlab import bench_agent
from bench.flood import Flood

SCENARIOS: dict[str, str] = {
    "idle_connections": "bench.soak:idle_connections",
    "watchers": "bench.soak:watchers",
    "non_reading_watcher": "bench.soak:non_reading_watcher",
    "kill_restarts": "bench.soak_restarts:scenario",
}

Scenario = Callable[[], dict[str, float]]
KIND = agent_pb2.AgentEvent.Kind

# --- idle connections ----------------------------------------------------------------------
IDLE_CONNECTIONS = 2_000
IDLE_PER_SOURCE = 50  # 40 sources: each under the per-source cap, together over the total
IDLE_SECONDS = 30.0
# --- watchers -------------------------------------------------------------------------------
WATCHERS = 300
WATCHED_ALLOWS = 200
# --- a watcher that does not read -----------------------------------------------------------
NON_READER_EVENTS = 500_000
NON_READER_BATCH = 1_000  # addresses per Allow: each Allow refreshes them all, 1,000 events
NON_READER_MAX_S = 600.0


def p99_ms(latencies: list[float]) -> float:
    if len(latencies) < 2:
        return latencies[0] * 1000 if latencies else math.nan
    return statistics.quantiles(latencies, n=100)[98] * 1000


def _addresses(base: int, count: int) -> list[str]:
    """``count`` addresses of 198.18.0.0/15 from index ``base``."""
    return [
        f"198.{18 + (base + i) // 65_536}.{(base + i) // 256 % 256}.{(base + i) % 256}"
        for i in range(count)
    ]


def _client(agent: DevAgent, target: str) -> AgentClient:
    client = agent.client(target)
    client.attempts, client.retry_window_s = 1, 0  # a soak counts failures, it does not hide them
    return client


def _timed_allow(client: AgentClient, address: str) -> float | None:
    start = time.perf_counter()
    try:
        client.allow([Entry(address, ttl_seconds=3600)])
    except AgentCallError:
        return None
    return time.perf_counter() - start


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_connections() -> dict[str, float]:
    """2,000 idle TCP connections kept open for ``IDLE_SECONDS`` by ``bench.flood`` from 40
    loopback sources against the default caps, while one caller (connected before) sends
    Allows; then a new caller connects."""
    with bench_agent("vf-soak-idle") as agent:
        relay = agent.relay()
        try:
            client = _client(agent, relay.address)
            client.state()  # its connection exists before the flood
            base_fds = _fds(agent.pid)
            latencies: list[float] = []
            failures = 0
            max_fds = base_fds
            addresses = _addresses(1_000, 50_000)
            with Flood(agent.netns, agent.api_target(), IDLE_CONNECTIONS, IDLE_PER_SOURCE) as f:
                end = time.monotonic() + IDLE_SECONDS
                i = 0
                while time.monotonic() < end:
                    took = _timed_allow(client, addresses[i % len(addresses)])
                    failures += took is None
                    if took is not None:
                        latencies.append(took)
                    max_fds = max(max_fds, _fds(agent.pid))
                    i += 1
            client.close()
            fresh = _client(agent, relay.address)
            answered_after = _timed_allow(fresh, "198.19.200.1") is not None
            fresh.close()
            alive = agent.process is not None and agent.process.poll() is None
        finally:
            relay.close()
    return {
        "flood_connections": IDLE_CONNECTIONS,
        "held_by_daemon_max": f.result.get("held_max", math.nan),
        "reopened_by_flood": f.result.get("reopened", math.nan),
        "daemon_fds_max_over_idle": max_fds - base_fds,
        "allows": len(latencies),
        "allow_failures": failures,
        "allow_p99_ms": p99_ms(latencies),
        "new_caller_answered_after": float(answered_after),
        "daemon_alive": float(alive),
    }


def _aio_channel(agent: DevAgent, target: str, *, small_window: bool = False) -> grpc.aio.Channel:
    p = agent.pki
    creds = grpc.ssl_channel_credentials(
        root_certificates=p.ca_cert.read_bytes(),
        private_key=p.client.key.read_bytes(),
        certificate_chain=p.client.cert.read_bytes(),
    )
    options: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", "localhost")]
    if small_window:
        options.append(("grpc.http2.bdp_probe", 0))
    return grpc.aio.secure_channel(target, creds, options=options)


class _Loop:
    """An asyncio loop on a thread of its own, for the soak's streaming clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _watch(
    channel: grpc.aio.Channel, since: int, want: int, opened: asyncio.Event | None = None
) -> tuple[str, int]:
    """Read a stream until ``want`` events came: ("ok", n), or its refusal's reason word."""
    stub = agent_pb2_grpc.FirewallAgentStub(channel)
    call = stub.WatchEvents(agent_pb2.WatchEventsRequest(since_state_version=since))
    seen = 0
    try:
        async for _ in call:
            seen += 1
            if seen >= want:
                call.cancel()
                return "ok", seen
    except grpc.aio.AioRpcError as exc:
        return (exc.details() or "").split(":", 1)[0] or exc.code().name, seen
    return "ended", seen


def watchers() -> dict[str, float]:
    """300 WatchEvents streams against the default cap (64), then 200 single Allows: the
    open watchers get every event, the others ``too_many_watchers``, the Allows stay fast."""
    with bench_agent("vf-soak-watch") as agent:
        relay = agent.relay()
        loop = _Loop()
        try:
            client = _client(agent, relay.address)
            since = client.state().state_version
            channel = loop.run(_open(agent, relay.address))
            streams = [loop.submit(_watch(channel, since, WATCHED_ALLOWS)) for _ in range(WATCHERS)]
            deadline = time.monotonic() + 30
            while sum(s.done() for s in streams) < WATCHERS - 64 and time.monotonic() < deadline:
                time.sleep(0.1)  # the refused ones answer at once
            timed = [_timed_allow(client, a) for a in _addresses(60_000, WATCHED_ALLOWS)]
            latencies = [t for t in timed if t is not None]
            results = [s.result(timeout=120) for s in streams]
            loop.run(channel.close())
            client.close()
        finally:
            loop.close()
            relay.close()
    delivered = [n for word, n in results if word == "ok"]
    return {
        "watchers": WATCHERS,
        "watchers_open": len(delivered),
        "watchers_refused_too_many": sum(word == "too_many_watchers" for word, _ in results),
        "events_per_open_watcher_min": min(delivered, default=0),
        "allows": len(latencies),
        "allow_failures": WATCHED_ALLOWS - len(latencies),
        "allow_p99_ms": p99_ms(latencies),
    }


async def _open(agent: DevAgent, target: str, small_window: bool = False) -> grpc.aio.Channel:
    return _aio_channel(agent, target, small_window=small_window)


def non_reading_watcher() -> dict[str, float]:
    """A watcher that stops reading while 500,000 events happen (Allows refreshing the same
    1,000 addresses), bounded at ``NON_READER_MAX_S``: the daemon's memory stays flat, the
    watcher's stream ends (RESYNC_REQUIRED, or watcher_stalled once it waited its stall
    timeout), and a fresh watcher is served."""
    with bench_agent("vf-soak-nonreader") as agent:
        relay = agent.relay()
        loop = _Loop()
        try:
            client = _client(agent, relay.address)
            since = client.state().state_version
            channel = loop.run(_open(agent, relay.address, small_window=True))
            stub = agent_pb2_grpc.FirewallAgentStub(channel)
            call = stub.WatchEvents(agent_pb2.WatchEventsRequest(since_state_version=since))
            batch = [Entry(a, ttl_seconds=3600) for a in _addresses(10_000, NON_READER_BATCH)]
            client.allow(batch)  # the addresses exist: every later Allow refreshes them
            rss_start = procfs.rss_mb(agent.pid)
            procfs.reset_peak_rss(agent.pid)
            started = time.monotonic()
            events = NON_READER_BATCH
            failures = 0
            while events < NON_READER_EVENTS and time.monotonic() - started < NON_READER_MAX_S:
                try:
                    client.allow(batch)
                    events += NON_READER_BATCH
                except AgentCallError:
                    failures += 1
            took = time.monotonic() - started
            rss_peak = procfs.peak_rss_mb(agent.pid)
            ending = loop.run(_drain(call), timeout=300)
            fresh = loop.run(_watch(channel, 0, 1), timeout=60)
            loop.run(channel.close())
            client.close()
        finally:
            loop.close()
            relay.close()
    received, last_kind, word = ending
    return {
        "events": events,
        "seconds": took,
        "allow_failures": failures,
        "daemon_rss_start_mb": rss_start,
        "daemon_rss_peak_mb": rss_peak,
        "events_received": received,
        "ended_with_resync_required": float(last_kind == KIND.RESYNC_REQUIRED),
        "ended_with_watcher_stalled": float(word == "watcher_stalled"),
        "fresh_watcher_served": float(fresh[0] == "ok"),
    }


async def _drain(call: Any) -> tuple[int, int, str]:
    """Read what the stream still delivers: (count, last event's kind, refusal word)."""
    received, last = 0, 0
    try:
        async for event in call:
            received += 1
            last = event.kind
    except grpc.aio.AioRpcError as exc:
        return received, last, (exc.details() or "").split(":", 1)[0]
    return received, last, ""


# --- the runner -------------------------------------------------------------------------------


def load(target: str) -> Scenario | None:
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    fn: Scenario = getattr(module, function)
    return fn


def _rows(name: str, figures: dict[str, float], seconds: float) -> Iterator[tuple[str, ...]]:
    yield (name, "(wall time)", f"{seconds:.0f} s")
    for key, val in figures.items():
        text = "nan" if isinstance(val, float) and math.isnan(val) else f"{val:.4g}"
        yield ("", key, text)


def render(rows: list[tuple[str, ...]]) -> str:
    header = ("scenario", "figure", "value")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"scenarios to run (default all: {', '.join(SCENARIOS)})"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    rows: list[tuple[str, ...]] = []
    failed = False
    for name in args.names or list(SCENARIOS):
        fn = load(SCENARIOS[name])
        if fn is None:
            rows.append((name, "(skipped)", "module not present"))
            continue
        print(f"soak: {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            figures = fn()
        except Exception:  # noqa: BLE001 - one failed scenario must not hide the others
            traceback.print_exc()
            rows.append((name, "(FAILED)", f"{time.monotonic() - started:.0f} s"))
            failed = True
            continue
        rows.extend(_rows(name, figures, time.monotonic() - started))
    print(render(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
