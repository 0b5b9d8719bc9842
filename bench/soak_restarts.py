"""Soak: ``kill -9`` of the real daemon during concurrent applies; nothing acknowledged is lost.

Owns one throwaway daemon (``agent.devlab.DevAgent``) in a scratch network namespace, a loopback
relay to it, and the client threads that drive it; everything is removed on exit. It never
touches the host namespace's ruleset (``nft`` runs only inside the scratch namespace).

Each cycle: client threads apply Allows and Revokes through the real client over mTLS (each
thread owns its own addresses, so the order of its acknowledgements is the order of its
operations), the daemon is killed with SIGKILL at a random moment, the clients stop, the daemon
is started again (READY=1), and then every address whose last operation was acknowledged is
checked both in GetState and in the kernel's allow set: an acknowledged Allow (ADDED, REFRESHED)
must be present, an acknowledged Revoke (REMOVED, NOT_FOUND) absent. An operation that failed
(the daemon died under it) may or may not have applied, so its address is not judged until its
next acknowledged operation. STALE changes nothing and keeps the address's judged state.

Figures (``scenario()``): cycles, acknowledged operations, lost (acknowledged but not found as
acknowledged: must be 0), addresses on which GetState and the kernel disagree after a restart
(every address, uncertain ones included: must be 0), uncertain operations (failed under a kill),
the wall time, and the slowest restart to READY. Bounded: ``SOAK_RESTART_CYCLES`` (default 100)
cycles and a deadline of ``SOAK_RESTART_DEADLINE_S`` (default 900 s), after which it stops and
says so (fewer cycles, exit 1).

Run alone: ``python -m bench.soak_restarts`` (root: namespaces); exits 1 when anything was lost.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.devlab import DevAgent, TcpRelay, scratch_netns
from agent.rpc.client import AgentCallError, AgentClient, Entry
from agent.rpc.pb import agent_pb2

TABLE = "vicifast"
PROFILE = "agent"
WORKERS = 4
ADDRESSES_PER_WORKER = 64  # 198.18.64.0/24 .. : test addresses only
TRAFFIC_S = (0.1, 0.5)  # how long the clients run before each kill (uniform)
CALL_TIMEOUT_S = 3.0
READY_TIMEOUT_S = 60.0
ALLOWED = {agent_pb2.ADDED, agent_pb2.REFRESHED}
REVOKED = {agent_pb2.REMOVED, agent_pb2.NOT_FOUND}


def cycles() -> int:
    return int(os.environ.get("SOAK_RESTART_CYCLES", "100"))


def deadline_s() -> float:
    return float(os.environ.get("SOAK_RESTART_DEADLINE_S", "900"))


def address(worker: int, n: int) -> str:
    return f"198.18.{64 + worker}.{n + 1}"


@dataclass
class Ledger:
    """What the agent acknowledged, per address: True allowed, False revoked, None unknown."""

    known: dict[str, bool | None] = field(default_factory=dict)
    acknowledged: int = 0
    uncertain: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked(self, addr: str, allowed: bool) -> None:
        with self.lock:
            self.known[addr] = allowed
            self.acknowledged += 1

    def stale(self) -> None:
        with self.lock:
            self.acknowledged += 1  # acknowledged, changed nothing: the judged state holds

    def failed(self, addr: str) -> None:
        with self.lock:
            self.known[addr] = None
            self.uncertain += 1

    def judged(self) -> dict[str, bool]:
        with self.lock:
            return {a: v for a, v in self.known.items() if v is not None}


class Clients:
    """WORKERS threads applying Allows and Revokes while ``running`` is set."""

    def __init__(self, agent: DevAgent, relay: TcpRelay, ledger: Ledger) -> None:
        self.agent, self.relay, self.ledger = agent, relay, ledger
        self.running = threading.Event()
        self.stopping = False
        self.idle = [threading.Event() for _ in range(WORKERS)]
        self.threads = [
            threading.Thread(target=self._work, args=(w,), name=f"soak-{w}", daemon=True)
            for w in range(WORKERS)
        ]
        for t in self.threads:
            t.start()

    def resume(self) -> None:
        for e in self.idle:
            e.clear()
        self.running.set()

    def pause(self) -> None:
        """Stop issuing operations; return once no operation is in flight."""
        self.running.clear()
        for e in self.idle:
            if not e.wait(CALL_TIMEOUT_S * 3):
                raise RuntimeError("a client call did not return")

    def close(self) -> None:
        self.stopping = True
        self.running.set()
        for t in self.threads:
            t.join(timeout=CALL_TIMEOUT_S * 3)

    def _client(self) -> AgentClient:
        c = self.agent.client(self.relay.address)
        c.attempts = 1  # a failure is reported, not hidden: it makes the address uncertain
        c.timeout_s = CALL_TIMEOUT_S
        return c

    def _work(self, worker: int) -> None:
        rng = random.Random(worker)
        while not self.stopping:
            if not self.running.is_set():
                self.idle[worker].set()
                self.running.wait()
                continue
            # A fresh channel per burst: a channel that saw the daemon die backs off its
            # reconnects for longer and longer.
            with self._client() as client:
                while self.running.is_set() and not self.stopping:
                    self._one(client, worker, rng)

    def _one(self, client: AgentClient, worker: int, rng: random.Random) -> None:
        addr = address(worker, rng.randrange(ADDRESSES_PER_WORKER))
        allow = rng.random() < 0.6
        try:
            if allow:
                result = client.allow([Entry(addr, 3600, f"soak-{worker}", PROFILE)])
            else:
                result = client.revoke([addr], profile=PROFILE)
        except AgentCallError:
            self.ledger.failed(addr)
            time.sleep(0.02)  # the daemon is down: do not spin
            return
        status = result.results[0].status
        if status == agent_pb2.STALE:
            self.ledger.stale()
        elif status in ALLOWED or status in REVOKED:
            self.ledger.acked(addr, status in ALLOWED)
        else:
            raise RuntimeError(f"unexpected status {status}")


def kernel_allowed(netns: str) -> set[str]:
    listed = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "set", "inet", TABLE, "allow4_agent"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    out: set[str] = set()
    for item in json.loads(listed.stdout)["nftables"]:
        for raw in item.get("set", {}).get("elem", ()):
            elem = raw["elem"] if isinstance(raw, dict) else {"val": raw}
            out.add(str(elem["val"]))
    return out


def state_allowed(agent: DevAgent, relay: TcpRelay) -> set[str]:
    """GetState's addresses, asked on a fresh channel until the restarted daemon answers."""
    give_up = time.monotonic() + READY_TIMEOUT_S
    while True:
        with agent.client(relay.address) as c:
            c.timeout_s = CALL_TIMEOUT_S
            try:
                return {e.address for e in c.state().entries if e.profile == PROFILE}
            except AgentCallError:
                if time.monotonic() > give_up:
                    raise
        time.sleep(0.05)  # the listener is not accepting yet


def lost(ledger: Ledger, in_state: set[str], in_kernel: set[str]) -> list[str]:
    """Addresses whose acknowledged state is not what GetState or the kernel holds."""
    return [
        a
        for a, allowed in ledger.judged().items()
        if (a in in_state) != allowed or (a in in_kernel) != allowed
    ]


@contextmanager
def soak_agent() -> Iterator[tuple[DevAgent, TcpRelay]]:
    with (
        tempfile.TemporaryDirectory(prefix="vf-soak-") as tmp,
        scratch_netns("vf-soak") as netns,
        DevAgent(Path(tmp), netns, table=TABLE) as agent,
    ):
        agent.start(timeout=READY_TIMEOUT_S)
        relay = agent.relay()
        try:
            yield agent, relay
        finally:
            relay.close()


def scenario() -> dict[str, float]:
    """``cycles()`` kill -9 / restart cycles under concurrent applies; the figures."""
    rng = random.Random(20261207)
    ledger = Ledger()
    started = time.monotonic()
    slowest_ready = 0.0
    lost_total = 0
    mismatched = 0  # addresses GetState and the kernel disagree on, uncertain ones included
    done = 0
    with soak_agent() as (agent, relay):
        clients = Clients(agent, relay, ledger)
        try:
            for _ in range(cycles()):
                if time.monotonic() - started > deadline_s():
                    break
                clients.resume()
                time.sleep(rng.uniform(*TRAFFIC_S))  # the applies run meanwhile
                agent.kill()  # SIGKILL, wherever the daemon was
                clients.pause()
                t0 = time.monotonic()
                agent.start(timeout=READY_TIMEOUT_S)
                slowest_ready = max(slowest_ready, time.monotonic() - t0)
                in_state, in_kernel = state_allowed(agent, relay), kernel_allowed(agent.netns)
                lost_total += len(lost(ledger, in_state, in_kernel))
                mismatched += len(in_state ^ in_kernel)
                done += 1
        finally:
            clients.close()
    return {
        "restarts.cycles": float(done),
        "restarts.acknowledged_ops": float(ledger.acknowledged),
        "restarts.uncertain_ops": float(ledger.uncertain),
        "restarts.lost": float(lost_total),
        "restarts.state_kernel_mismatches": float(mismatched),
        "restarts.slowest_ready_s": round(slowest_ready, 3),
        "restarts.time_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    figures = scenario()
    print(json.dumps(figures, indent=2))
    complete = figures["restarts.cycles"] == cycles()
    clean = figures["restarts.lost"] == 0 and figures["restarts.state_kernel_mismatches"] == 0
    return 0 if clean and complete else 1


if __name__ == "__main__":
    sys.exit(main())
