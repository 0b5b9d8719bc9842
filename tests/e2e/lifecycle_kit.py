"""What the lifecycle tests share: a background event watcher, a bounded poll, kernel read-outs.

``Watcher`` follows the daemon's WatchEvents stream on its own connection and lets a test wait
for an event (no sleeping: a condition variable wakes the waiter when an event arrives).
``poll_until`` is for what raises no event (a repaired structure only moves a counter): it
checks a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from netlab import Netns

from agent.devlab import DevAgent, TcpRelay
from agent.rpc.client import AgentCallError
from agent.rpc.pb import agent_pb2

Event = agent_pb2.AgentEvent
KIND = agent_pb2.AgentEvent


class Watcher:
    """Collects every event after ``since`` from a running daemon."""

    def __init__(self, agent: DevAgent, relay: TcpRelay, since: int) -> None:
        self.client = agent.client(relay.address)
        self.events: list[tuple[float, Any]] = []  # (monotonic arrival, event)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._follow, args=(since,), daemon=True)
        self._thread.start()

    def _follow(self, since: int) -> None:
        with contextlib.suppress(AgentCallError):
            for ev in self.client.watch(since):
                with self._cond:
                    self.events.append((time.monotonic(), ev))
                    self._cond.notify_all()

    def wait_for(self, match: Callable[[Any], bool], *, timeout: float) -> tuple[float, Any]:
        """The first (arrival time, event) matching ``match``; ``TimeoutError`` at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, ev in self.events:
                    if match(ev):
                        return at, ev
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [KIND.Kind.Name(e.kind) for _, e in self.events]
                    raise TimeoutError(f"no matching event within {timeout} s; got {kinds}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.close()
        self._thread.join(timeout=5)


POLL_INTERVAL_S = 0.01


def poll_until(condition: Callable[[], bool], *, timeout: float) -> float:
    """The monotonic time at which ``condition()`` first held; ``TimeoutError`` at the deadline.

    The time is taken after the check returned, so it is an upper bound of when it became true.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: a bounded wait between checks
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        pause.wait(POLL_INTERVAL_S)
    return time.monotonic()


def allow_set_addresses(ns: Netns, table: str, name: str) -> dict[str, int]:
    """Elements of one allow set in ``ns``: address -> seconds until it expires."""
    listed = ns.nft_json("list", "set", "inet", table, name)
    out: dict[str, int] = {}
    for item in listed["nftables"]:
        for raw in item.get("set", {}).get("elem", ()):
            elem = raw["elem"] if isinstance(raw, dict) else {"val": raw}
            val = elem["val"]
            key = val if isinstance(val, str) else f"{val['prefix']['addr']}/{val['prefix']['len']}"
            out[key] = int(elem.get("expires", 0))
    return out


def kernel_entries(ns: Netns, table: str) -> set[tuple[str, str]]:
    """(profile 'agent', address) of every element in the agent profile's allow sets."""
    found: set[tuple[str, str]] = set()
    for name in ("allow4_agent", "allow6_agent"):
        with contextlib.suppress(Exception):
            found |= {("agent", a) for a in allow_set_addresses(ns, table, name)}
    return found
