"""Supervision of the daemon's long-lived loops: heartbeats, faults, back-off, stalls.

Owns the bookkeeping that keeps every loop of the daemon alive and the watchdog honest: each loop
runs its turns through ``Supervision.guarded``, which turns any unexpected exception into a
logged, counted fault and a back-off instead of the end of the thread, and records a heartbeat
after every turn that completed. ``stalled`` names the loops whose last completed turn is older
than their deadline: the daemon feeds systemd's watchdog only while that is empty, so a loop that
is dead, stuck, or failing on every turn gets the daemon restarted.

Pure: the clock is passed in; nothing here starts a thread, sleeps or touches the kernel. A fault
is logged with a reason word (an errno name, an ``AgentError`` reason or the exception's class)
and where it was raised, never with the exception's message: that may name an address.

Test seam (``FaultInjector``): inert unless the process was started with
``VICIFAST_AGENT_FAULT_DIR`` set; see its docstring and the README's "Supervision" section.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.errors import AgentError

log = logging.getLogger("vicifast-agent.supervise")

# Each loop's deadline: how long after its last completed turn it counts as stalled. An idle loop
# completes a turn at least every HEARTBEAT_S (it wakes on a timeout when nothing happens); the
# deadlines leave room for the longest legitimate turn of each loop. systemd's WatchdogSec (30 s
# in the shipped unit) comes on top, so a turn longer than its deadline (a 100,000-entry Sync on
# the writer) costs a few missed pings, not a restart.
HEARTBEAT_S = 1.0
LOOP_DEADLINES: Mapping[str, float] = {
    # The engine's writer thread: request groups, tasks (repairs); turns every second when idle.
    "writer": 2.5,
    # Expiry and conntrack cuts run on the writer between groups and on each idle turn.
    "expiry": 2.5,
    "conntrack": 2.5,
    # The verification thread: drift repair (a task on the writer, which may be busy with a
    # large Sync) and the netlink monitor it waits on.
    "verify": 10.0,
    "monitor": 10.0,
    # The gRPC event loop, the local socket's and the metrics listener's accept loops.
    "grpc": 5.0,
    "local": 5.0,
    "metrics": 5.0,
    # The daemon's main thread: signals, reload, retention, status; it feeds the watchdog.
    "main": 5.0,
}
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
FAULT_DIR_ENV = "VICIFAST_AGENT_FAULT_DIR"


def fault_reason(exc: BaseException) -> str:
    """A stable word for ``exc``: its errno name, its reason word, or its class name."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    if isinstance(exc, AgentError):
        return exc.reason
    return type(exc).__name__


def fault_site(exc: BaseException) -> str:
    """Where ``exc`` was raised: ``file.py:line function`` of the innermost frame (no message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} {last.name}"


class Supervision:
    """Heartbeats, fault counts and back-off of named loops (thread-safe, clock passed in)."""

    def __init__(
        self,
        deadlines: Mapping[str, float] = LOOP_DEADLINES,
        *,
        clock: Callable[[], float] = time.monotonic,
        injector: Callable[[str], None] | None = None,
    ) -> None:
        self.deadlines = dict(deadlines)
        self.clock = clock
        self.injector = injector
        self._lock = threading.Lock()
        self._faults = dict.fromkeys(self.deadlines, 0)
        self._last_beat: dict[str, float] = {}  # watched loops only
        self._streak = dict.fromkeys(self.deadlines, 0)
        self._resume_at = dict.fromkeys(self.deadlines, 0.0)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.deadlines)

    def watch(self, name: str) -> None:
        """From now on ``name`` must beat within its deadline (a loop that started)."""
        with self._lock:
            self._last_beat[self._known(name)] = self.clock()

    def unwatch(self, name: str) -> None:
        """``name`` stopped on purpose (shutdown): no longer expected to beat."""
        with self._lock:
            self._last_beat.pop(name, None)

    def beat(self, name: str) -> None:
        """A turn of ``name`` completed: it made progress now; its back-off starts over."""
        with self._lock:
            if name in self._last_beat:
                self._last_beat[name] = self.clock()
            self._streak[self._known(name)] = 0

    def fault(self, name: str, exc: BaseException) -> float:
        """Count and log an unexpected exception of loop ``name``; return its back-off (s)."""
        with self._lock:
            self._faults[self._known(name)] += 1
            self._streak[name] += 1
            delay: float = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (self._streak[name] - 1))
            self._resume_at[name] = self.clock() + delay
        reason = fault_reason(exc)
        log.error(
            "%s loop: unexpected %s at %s; going on in %.1f s",
            name,
            reason,
            fault_site(exc),
            delay,
            extra={"REASON": "loop_fault", "LOOP": name, "FAULT": reason},
        )
        return delay

    def due(self, name: str) -> bool:
        """Whether ``name`` is out of its back-off (for work done on another loop's turns)."""
        return self.clock() >= self._resume_at[self._known(name)]

    def guarded(self, name: str, turn: Callable[[], object]) -> float:
        """Run one turn of loop ``name``: 0.0 when it completed (a beat), else the back-off the
        loop should wait before its next turn (the fault was counted and logged)."""
        try:
            self.checkpoint(name)
            turn()
        except Exception as exc:  # noqa: BLE001  # the point: no exception ends a loop
            return self.fault(name, exc)
        self.beat(name)
        return 0.0

    def checkpoint(self, name: str) -> None:
        """The fault-injection seam at the top of each turn (a no-op unless enabled)."""
        if self.injector is not None:
            self.injector(name)

    def faults(self) -> dict[str, int]:
        """Faults per loop since start (every loop present, 0 when none)."""
        with self._lock:
            return dict(self._faults)

    def stalled(self) -> tuple[str, ...]:
        """Watched loops whose last completed turn is older than their deadline."""
        now = self.clock()
        with self._lock:
            return tuple(
                name for name, last in self._last_beat.items() if now - last > self.deadlines[name]
            )

    def _known(self, name: str) -> str:
        if name not in self.deadlines:
            raise KeyError(f"unknown loop {name!r}")
        return name


class FaultInjector:
    """TEST ONLY: raise or hang in a loop on request, through files in a directory.

    Enabled only when the daemon starts with ``VICIFAST_AGENT_FAULT_DIR=<dir>`` in its
    environment (the packaged unit never sets it; ``from_env`` returns None otherwise, and the
    loops then skip the seam entirely). At the top of each turn of loop ``<name>``, a file
    ``<dir>/<name>`` is read and removed (so it acts once) and its one line obeyed:

    - ``raise EMFILE`` (any errno name): ``OSError`` with that errno;
    - ``raise`` alone: ``RuntimeError``, an unexpected bug;
    - ``hang <seconds>``: the turn blocks that long, as a stuck call would.
    """

    def __init__(self, directory: Path, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.directory = directory
        self.sleep = sleep

    @staticmethod
    def from_env(env: Mapping[str, str] = os.environ) -> FaultInjector | None:
        path = env.get(FAULT_DIR_ENV, "")
        if not path:
            return None
        log.warning(
            "fault injection enabled (%s): for tests only", FAULT_DIR_ENV, extra={"REASON": "test"}
        )
        return FaultInjector(Path(path))

    def __call__(self, name: str) -> None:
        path = self.directory / name
        try:
            order = path.read_text().split()
            path.unlink()
        except OSError:
            return
        if order[:1] == ["hang"]:
            self.sleep(float(order[1]) if len(order) > 1 else 3600.0)
        elif order[:1] == ["raise"]:
            if len(order) > 1:
                code = getattr(errno, order[1])
                raise OSError(code, os.strerror(code))
            raise RuntimeError("injected fault")
