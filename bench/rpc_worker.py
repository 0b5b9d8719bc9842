"""Worker of ``bench.rpc`` (and ``bench.daemon``): the control plane's side, run inside the
agent's namespace so no relay sits in the timed path: ``python -m bench.rpc_worker SCENARIO JSON``.

Owns its own client connections and, for the Sync comparison, a scratch table of its own
(``vfbenchraw``, deleted before it returns); it never touches the agent's table. It measures, it
does not judge: it prints raw timings as one JSON line and leaves percentiles, ratios and
targets to its caller. ``JSON`` carries the connection (see ``bench.agentlab.connection``) and
the scenario's parameters.

Scenarios:

* ``allow_seq``  - single-entry Allows one after another with the project's client (building and
  signing each envelope inside the timed call, as the control plane would);
* ``allow_conc`` - single-entry Allows from many concurrent callers on one grpc.aio channel.
  Envelopes are built and signed before the clock starts, and the client's own CPU time is
  reported, so the figure is the agent's throughput, not this process's;
* ``sync``       - one Sync of many entries with ``AgentClient.sync`` (build, sign, send, answer),
  against raw ``nft -f`` of the same elements into a set of the same type, in the same run.
* ``sync_max``   - the largest Sync a config admits (``v4`` + ``v6`` entries), replacing a table
  as full (other addresses of both families): the daemon's peak RSS during the second Sync;
* ``revoke_seq`` - single-address Revokes one after another, each source with a live conntrack
  flow (inserted with ``conntrack -I``), and how many flows were left once the cuts were done;
* ``mass_expiry``- one Sync whose entries all expire together, then single Allows one after
  another until every one of them has expired: each Allow's latency and how many expiries its
  answer's state_version shows since the previous one;
* ``count``      - how many elements the agent's allow set holds.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from agent.rpc.client import AgentCallError, AgentClient, ClientIdentity, Entry
from agent.rpc.pb import agent_pb2, agent_pb2_grpc
from agent.rpc.signing import new_request_id
from agent.rules.render import allow_set, element_comment
from bench import procfs
from bench.netns import worker_main

FIRST_ADDRESS = ipaddress.IPv4Address("198.18.0.1")  # 198.18.0.0/15: 131,071 from here on
PROFILE = "agent"
OK_STATUSES = frozenset({agent_pb2.ADDED, agent_pb2.REFRESHED, agent_pb2.REMOVED})
RAW_TABLE = "vfbenchraw"


# --- entries -----------------------------------------------------------------------------------


def address(i: int) -> str:
    return str(FIRST_ADDRESS + i)


def entry(i: int) -> Entry:
    """The ``i``-th bench grant: a distinct address, a realistic subject, a varied TTL."""
    return Entry(
        address(i),
        ttl_seconds=3600 + i % 600,
        subject=f"agent-{i:06d}@dialer-{i % 40:02d}.example.com",
        profile=PROFILE,
    )


def entries(first: int, count: int) -> list[Entry]:
    return [entry(i) for i in range(first, first + count)]


def address6(i: int) -> str:
    """The ``i``-th bench IPv6 source, each in a /64 of its own (the default policy's unit)."""
    return f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1"


def entry6(i: int) -> Entry:
    return Entry(
        address6(i),
        ttl_seconds=3600 + i % 600,
        subject=f"agent-{i:06d}@dialer-{i % 40:02d}.example.com",
        profile=PROFILE,
    )


# --- connections -------------------------------------------------------------------------------


def identity(conn: dict[str, Any]) -> ClientIdentity:
    return ClientIdentity.from_files(
        ca=Path(conn["ca"]),
        cert=Path(conn["cert"]),
        key=Path(conn["key"]),
        signing_key=Path(conn["signing_key"]),
        keyid=conn["keyid"],
    )


def client(conn: dict[str, Any], timeout_s: float = 60.0) -> AgentClient:
    # One attempt: a retry would hide a failure inside a timing.
    return AgentClient(
        conn["target"],
        conn["agent_id"],
        identity(conn),
        server_name=conn["server_name"],
        timeout_s=timeout_s,
        attempts=1,
        retry_window_s=0,
    )


def aio_channel(conn: dict[str, Any]) -> grpc.aio.Channel:
    ident = identity(conn)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ident.ca_cert,
        private_key=ident.client_key,
        certificate_chain=ident.client_cert,
    )
    options = [("grpc.ssl_target_name_override", conn["server_name"])]
    return grpc.aio.secure_channel(conn["target"], creds, options=options)


def check(result: agent_pb2.ApplyResult, expected: int) -> None:
    bad = [r for r in result.results if r.status not in OK_STATUSES]
    if len(result.results) < expected or bad:
        raise RuntimeError(f"unexpected result: {len(result.results)} results, e.g. {bad[:1]}")


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# --- scenarios ---------------------------------------------------------------------------------


def scenario_allow_seq(p: dict[str, Any]) -> dict[str, Any]:
    first, warmup, count = p["first"], p["warmup"], p["count"]
    with client(p["conn"], timeout_s=p.get("timeout_s", 60.0)) as c:

        def one(i: int) -> None:
            check(c.allow([entry(i)]), 1)

        for i in range(first, first + warmup):
            one(i)
        timed_range = range(first + warmup, first + warmup + count)
        latencies = [timed(functools.partial(one, i)) for i in timed_range]
    return {"latencies_s": latencies}


async def _allow_concurrently(
    conn: dict[str, Any], envelopes: Sequence[agent_pb2.SignedEnvelope], callers: int
) -> float:
    async with aio_channel(conn) as channel:
        stub = agent_pb2_grpc.FirewallAgentStub(channel)
        queue: Iterator[agent_pb2.SignedEnvelope] = iter(envelopes)

        async def caller() -> None:
            for envelope in queue:  # shared: each envelope is sent by exactly one caller
                check(await stub.Allow(envelope, timeout=60), 1)

        await channel.channel_ready()
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.perf_counter() - started


def _client_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def scenario_allow_conc(p: dict[str, Any]) -> dict[str, Any]:
    first, warmup, count, callers = p["first"], p["warmup"], p["count"], p["callers"]
    pid = p["daemon_pid"]
    with client(p["conn"]) as c:
        signed = [c.envelope_allow([entry(i)]) for i in range(first, first + warmup + count)]
    asyncio.run(_allow_concurrently(p["conn"], signed[:warmup], callers))
    cpu_client, cpu_daemon = _client_cpu_s(), procfs.cpu_s(pid)
    elapsed = asyncio.run(_allow_concurrently(p["conn"], signed[warmup:], callers))
    return {
        "count": count,
        "callers": callers,
        "elapsed_s": elapsed,
        "client_cpu_s": _client_cpu_s() - cpu_client,
        "daemon_cpu_s": procfs.cpu_s(pid) - cpu_daemon,
    }


def _raw_set_file(directory: Path, grants: Sequence[Entry], size: int) -> tuple[Path, Path]:
    """The agent's set type in a scratch table, and the grants as nft would add them."""
    request_id = new_request_id()  # same length as the one the agent writes in each comment
    setup = directory / "raw-setup.nft"
    setup.write_text(
        f"add table inet {RAW_TABLE}\n"
        f"add set inet {RAW_TABLE} allow {{ type ipv4_addr; flags timeout; size {size}; }}\n"
        f"flush set inet {RAW_TABLE} allow\n"
    )
    elements = ",\n".join(
        f'{g.address} timeout {g.ttl_seconds}s comment "{element_comment(g.subject, request_id)}"'
        for g in grants
    )
    add = directory / "raw-add.nft"
    add.write_text(f"add element inet {RAW_TABLE} allow {{\n{elements}\n}}\n")
    return setup, add


def nft_file(path: Path) -> None:
    subprocess.run(["nft", "-f", str(path)], check=True)


def scenario_sync(p: dict[str, Any]) -> dict[str, Any]:
    """One Sync; around it ``raw_repeats`` raw adds (one before, the rest after)."""
    first, count, pid, repeats = p["first"], p["count"], p["daemon_pid"], p["raw_repeats"]
    grants = entries(first, count)
    raw_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        setup, add = _raw_set_file(Path(tmp), grants, p["set_size"])

        def raw() -> None:
            nft_file(setup)  # empties the scratch set, untimed
            raw_s.append(timed(lambda: nft_file(add)))

        try:
            for _ in range(min(1, repeats)):
                raw()
            with client(p["conn"], timeout_s=300) as c:
                build_s = timed(lambda: c.envelope_sync(grants))
                procfs.reset_peak_rss(pid)
                result: list[agent_pb2.ApplyResult] = []
                sync_s = timed(lambda: result.append(c.sync(grants)))
                peak = procfs.peak_rss_mb(pid)
                check(result[0], count)
            for _ in range(repeats - 1):
                raw()
        finally:
            subprocess.run(["nft", "delete", "table", "inet", RAW_TABLE], check=False)
    return {
        "count": count,
        "sync_s": sync_s,
        "client_build_sign_s": build_s,
        "raw_s": raw_s,
        "peak_rss_mb": peak,
        "after_rss_mb": procfs.rss_mb(pid),
    }


def scenario_sync_max(p: dict[str, Any]) -> dict[str, Any]:
    """A full table of ``v4`` + ``v6`` entries, then one Sync replacing all of them."""
    v4, v6, pid = p["v4"], p["v6"], p["daemon_pid"]
    full = [entry(i) for i in range(v4)] + [entry6(i) for i in range(v6)]
    other = [entry(i) for i in range(v4, 2 * v4)] + [entry6(i) for i in range(v6, 2 * v6)]
    with client(p["conn"], timeout_s=600) as c:
        check(c.sync(full), len(full))
        del full
        time.sleep(p.get("settle_s", 3.0))  # the daemon gives memory back on an idle turn
        before = procfs.rss_mb(pid)
        envelope = c.envelope_sync(other)
        del other
        procfs.reset_peak_rss(pid)
        started = time.perf_counter()
        result = c.send("Sync", envelope)
        elapsed = time.perf_counter() - started
        peak = procfs.peak_rss_mb(pid)
        check(result, v4 + v6)
        # One entry over the cap: refused by its count before its entries are built.
        over = [entry(i) for i in range(v4 + 1)] + [entry6(i) for i in range(v6)]
        refused = ""
        try:
            c.sync(over)
        except AgentCallError as exc:
            refused = exc.reason
        del over
        time.sleep(p.get("settle_s", 3.0))
        after_refused = procfs.rss_mb(pid)
    return {
        "count": v4 + v6,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "sync_s": elapsed,
        "refused": refused,
        "rss_after_refused_mb": after_refused,
    }


FLOW_ARGS = ("-p", "udp", "-d", "198.19.255.254", "--dport", "5060", "--timeout", "600")


def _insert_flow(source: str, sport: int) -> None:
    subprocess.run(
        ["conntrack", "-I", *FLOW_ARGS, "-s", source, "--sport", str(sport)],
        check=True,
        capture_output=True,
    )


def _flows_of(sources: set[str]) -> int:
    listing = subprocess.run(
        ["conntrack", "-L", "-p", "udp", "--dport", "5060"],
        capture_output=True,
        text=True,
        check=False,
    )
    return sum(
        1 for line in listing.stdout.splitlines() if any(f"src={s} " in line for s in sources)
    )


def scenario_revoke_seq(p: dict[str, Any]) -> dict[str, Any]:
    first, warmup, count = p["first"], p["warmup"], p["count"]
    indexes = range(first, first + warmup + count)
    with client(p["conn"], timeout_s=60) as c:
        check(c.allow([entry(i) for i in indexes]), len(indexes))
        for i in indexes if p.get("flows", True) else ():
            _insert_flow(address(i), 20_000 + i % 40_000)
        flows_before = _flows_of({address(i) for i in indexes})
        for i in indexes[:warmup]:
            check(c.revoke([address(i)]), 1)
        timed_range = indexes[warmup:]
        started = time.perf_counter()
        for i in timed_range:
            check(c.revoke([address(i)]), 1)
        elapsed = time.perf_counter() - started
    # The cuts run after the answers: wait (bounded) until the last one is done.
    sources = {address(i) for i in indexes}
    deadline = time.monotonic() + p.get("cut_deadline_s", 60.0)
    left = _flows_of(sources)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _flows_of(sources)
    return {
        "count": len(timed_range),
        "elapsed_s": elapsed,
        "flows_before": flows_before,
        "flows_left": left,
        "cuts_done_s": time.perf_counter() - started,
    }


def scenario_mass_expiry(p: dict[str, Any]) -> dict[str, Any]:
    count, ttl, probe_first = p["count"], p["ttl_s"], p["probe_first"]
    grants = [
        Entry(address(i), ttl_seconds=ttl, subject=f"agent-{i:06d}", profile=PROFILE)
        for i in range(count)
    ]
    with client(p["conn"], timeout_s=300) as c:
        # The daemon dates the entries while it decides, after the call began: they expire
        # ``ttl`` after a moment between these two.
        sent = time.monotonic()
        synced = c.sync(grants)
        sync_s = time.monotonic() - sent
        check(synced, count)
        expires_at = sent + ttl
        version = synced.state_version
        del grants
        readings: list[tuple[float, int]] = []  # (latency, expiries since the previous Allow)
        expired = 0
        i = probe_first
        deadline = expires_at + p.get("deadline_s", 120.0)
        # Start a little before the entries' time, so the first expiries meet an Allow.
        while time.monotonic() < expires_at - 1.0:
            time.sleep(0.05)
        while expired < count and time.monotonic() < deadline:
            started = time.perf_counter()
            result = c.allow(
                [Entry(address(i), ttl_seconds=3600, subject="probe", profile=PROFILE)]
            )
            latency = time.perf_counter() - started
            check(result, 1)
            jump = result.state_version - version - 1
            version = result.state_version
            expired += jump
            readings.append((latency, jump))
            i += 1
    return {"count": count, "expired": expired, "readings": readings, "sync_s": sync_s}


def count_elements(table: str) -> int:
    listing = subprocess.run(
        ["nft", "-j", "list", "set", "inet", table, allow_set(PROFILE, 4)],
        check=True,
        capture_output=True,
        text=True,
    )
    for item in json.loads(listing.stdout)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def scenario_count(p: dict[str, Any]) -> dict[str, Any]:
    return {"count": count_elements(p["table"])}


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "allow_seq": scenario_allow_seq,
    "allow_conc": scenario_allow_conc,
    "sync": scenario_sync,
    "count": scenario_count,
    "sync_max": scenario_sync_max,
    "revoke_seq": scenario_revoke_seq,
    "mass_expiry": scenario_mass_expiry,
}


def main(argv: list[str] | None = None) -> int:
    return worker_main("bench.rpc_worker", SCENARIOS, argv)


if __name__ == "__main__":
    sys.exit(main())
