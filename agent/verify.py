"""Keeps the kernel's table equal to the agent's state while the daemon runs: drift repair.

Owns the verification thread. It wakes on nf_tables change notifications (someone ran
``nft flush ruleset``, ``systemctl reload nftables``, deleted the table, a set, a rule or an
element) and repairs at once; a periodic check (``[verify] interval_s``) is the backstop. Both
go through ``reconcile.converge`` as a task on the engine's writer thread, so a repair never
races a request. Every check, periodic or woken by a notification, compares the whole table
but the allow sets' elements (chains, rules, sets, objects, static sources: a terse listing and
a few small netlink dumps, ~1 ms with 100,000 entries); the allow elements (with their
timeouts and comments) are compared when notifications say their set changed or were lost,
and once per ``[verify] elements_interval_s``: listing 100,000 elements costs over a second of
CPU, and the kernel reports every change of an element to the listener.

It also keeps the coexistence report (other tables' chains that would drop what the agent
allows) fresh: at start, when another table changes, and with each periodic check.

Readers on other threads (metrics, GetState, the local socket) use the plain attributes:
``drift_repairs``, ``last_verified_at_ms``, ``in_sync``, ``shadowing``, ``last_error``.
``drift_repairs`` counts repairs after start-up, structure-only ones included; those raise no
event (events and ``state_version`` are per entry), so this counter is where they show.
Never flushes or touches another table.

A repair now and then is a sysadmin's slip; repairs that keep coming mean something keeps
changing the table back - most often a second agent (another state directory, the same
table) or a firewall manager reloading in a loop, each undoing the other's work many times a
second. ``RepairRate`` counts repairs over the last ``STORM_WINDOW_S``; from ``STORM_REPAIRS``
on the verifier reports ``repair_storm`` (the status line, the local ``status``, the
``vicifast_agent_drift_repair_storm`` metric and its alert) and logs it once
(``REASON=repair_storm``), and again when it has calmed down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

from agent.engine import Engine
from agent.errors import AgentError
from agent.reconcile import FULL, STRUCTURE, Convergence, Scope, converge_task
from agent.rules import render
from agent.rules.monitor import NftMonitor, Touch
from agent.rules.shadowing import Shadow, read_shadowing
from agent.rules.table import FirewallTable
from agent.store import Store
from agent.supervise import HEARTBEAT_S, Supervision

log = logging.getLogger(__name__)
RETRY_AFTER_FAILURE_S = 1.0
# Repairs within this many seconds, and how many of them make a storm: a sysadmin's flush or a
# few `systemctl reload nftables` stay well below; two agents fighting reach it in a second.
STORM_WINDOW_S = 60.0
STORM_REPAIRS = 30


class RepairRate:
    """Pure: repairs in the last ``window_s`` seconds, from the times they happened (passed in,
    monotonic seconds). Keeps at most one time per repair of the window."""

    def __init__(self, window_s: float = STORM_WINDOW_S, storm: int = STORM_REPAIRS) -> None:
        self.window_s = window_s
        self.storm = storm
        self._times: deque[float] = deque()

    def add(self, now: float) -> None:
        self._times.append(now)
        self._forget(now)

    def count(self, now: float) -> int:
        self._forget(now)
        return len(self._times)

    def stormy(self, now: float) -> bool:
        return self.count(now) >= self.storm

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()


class Verifier:
    def __init__(
        self,
        *,
        engine: Engine,
        store: Store,
        table: FirewallTable,
        monitor: NftMonitor,
        interval_s: float,
        elements_interval_s: float,
        on_change: Callable[[], None] = lambda: None,
        supervision: Supervision | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.table = table
        self.monitor = monitor
        self.interval_s = interval_s
        self.elements_interval_s = elements_interval_s
        self.on_change = on_change
        self.drift_repairs = 0
        self.rate = RepairRate()
        self._rate_lock = threading.Lock()
        self._storm_logged = False
        self.last_verified_at_ms = 0
        self.in_sync = True
        self.last_error = ""
        self.shadowing: tuple[Shadow, ...] = ()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        # A supervised loop (agent.supervise): "verify", with the netlink monitor it waits on
        # as "monitor". After a failed turn the next one checks every element (``_missed``).
        self.supervision = supervision if supervision is not None else Supervision()
        self._missed = False
        self._next_check = 0.0
        self._next_full = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for name in ("verify", "monitor"):
            self.supervision.watch(name)
        self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for name in ("verify", "monitor"):
            self.supervision.unwatch(name)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- checks ------------------------------------------------------------------------------

    def record(self, conv: Convergence, *, startup: bool = False) -> None:
        """Account for one finished convergence (also the daemon's start-up one)."""
        self.last_verified_at_ms = self.engine.now_ms()
        self.in_sync = True
        self.last_error = ""
        if conv.drift and not startup:
            self.drift_repairs += 1
            with self._rate_lock:
                self.rate.add(time.monotonic())
            # During a storm each repair is not logged again (tens a second): the storm is,
            # once, and the counters go on.
            if not self._storm_logged:
                log.warning(
                    "drift repaired: %s",
                    conv.describe(),
                    extra={"REASON": "drift_repaired"},
                )
        self._log_storm()
        self.on_change()

    @property
    def recent_repairs(self) -> int:
        """Repairs within the last ``STORM_WINDOW_S`` (any thread may read it)."""
        with self._rate_lock:
            return self.rate.count(time.monotonic())

    @property
    def repair_storm(self) -> bool:
        """Whether repairs keep coming: something keeps changing the table back."""
        return self.recent_repairs >= self.rate.storm

    def _log_storm(self) -> None:
        storm = self.repair_storm
        if storm and not self._storm_logged:
            log.error(
                "%d drift repairs in the last %.0f s: something keeps changing the agent's table "
                "(a second agent on the same table, or a firewall reloading in a loop?)",
                self.recent_repairs,
                self.rate.window_s,
                extra={"REASON": "repair_storm"},
            )
        elif self._storm_logged and not storm:
            log.warning("drift repairs have calmed down", extra={"REASON": "repair_storm"})
        self._storm_logged = storm

    def verify(self, scope: Scope) -> Convergence | None:
        """Run one convergence on the engine's writer thread; None if it failed (logged)."""

        task = converge_task(self.store, self.table, self.engine.now_ms, scope)
        try:
            conv: Convergence = self.engine.run_task(task)
        except AgentError as exc:
            self.in_sync = False
            self.last_error = exc.message
            log.error("verification failed: %s", exc.message, extra={"REASON": exc.reason})
            self.on_change()
            return None
        self.record(conv)
        return conv

    def refresh_shadowing(self) -> None:
        cfg = self.table.cfg
        try:
            found = read_shadowing(
                self.table.nft,
                own_table=cfg.table,
                own_priority=cfg.chain_priority,
                protected=[port for p in cfg.profiles for port in p.ports],
            )
        except (AgentError, KeyError, ValueError, TypeError) as exc:
            log.warning("could not check other tables for shadowing: %s", exc)
            return
        if tuple(found) != self.shadowing:
            for s in found:
                log.warning(
                    "another table would drop what the agent allows: %s",
                    s.describe(),
                    extra={"REASON": "shadowed"},
                )
            self.shadowing = tuple(found)
            self.on_change()

    def _scope_for(self, touch: Touch) -> Scope:
        if touch.lost:
            return FULL
        ours = {render.allow_set(p.name, fam) for p in self.table.cfg.profiles for fam in (4, 6)}
        return Scope(structure=True, sets=frozenset(touch.sets & ours))

    def _run(self) -> None:
        now = time.monotonic()
        self._next_check = now + self.interval_s
        self._next_full = now + self.elements_interval_s
        while not self._stopping:
            pause = self.supervision.guarded("verify", self._turn)
            if pause:
                self._failed_turn(pause)
        with contextlib.suppress(OSError):
            self.monitor.close()

    def _failed_turn(self, pause: float) -> None:
        """After an unexpected fault: say the table is unverified, wait out the back-off (or a
        stop), and make the next turn compare everything."""
        self.in_sync = False
        self.last_error = "verification failed unexpectedly; retrying"
        self._missed = True
        self.on_change()
        select.select([self._wake_r], [], [], pause)

    def _wait(self, timeout: float) -> Touch:
        """The monitor's news; a failing monitor is a fault of its own ("monitor"), backed off
        from, and reported as lost notifications so that the table is checked in full."""
        if not self.supervision.due("monitor"):  # backing off: the periodic checks cover it
            select.select([self._wake_r], [], [], timeout)
            return Touch()
        try:
            self.supervision.checkpoint("monitor")
            touch = self.monitor.wait(timeout, self._wake_r)
        except Exception as exc:  # noqa: BLE001  # a broken socket or an unparsable message
            self.supervision.fault("monitor", exc)
            return Touch(lost=True)
        self.supervision.beat("monitor")
        return touch

    def _turn(self) -> None:
        # Waking at least every HEARTBEAT_S even when nothing happens: the turn's completion is
        # this loop's heartbeat, which the watchdog needs.
        timeout = 0.0 if self._missed else max(0.0, self._next_check - time.monotonic())
        touch = self._wait(min(HEARTBEAT_S, timeout))
        if self._missed:
            touch, self._missed = touch.merge(Touch(lost=True)), False
        if self._stopping:
            return
        now = time.monotonic()
        if touch.ours:
            ok = self.verify(self._scope_for(touch)) is not None
            if touch.lost and ok:
                self._next_full = now + self.elements_interval_s
        elif now >= self._next_check:
            full = now >= self._next_full
            ok = self.verify(FULL if full else STRUCTURE) is not None
            if full and ok:
                self._next_full = now + self.elements_interval_s
        else:
            ok = True
        if touch.elsewhere or now >= self._next_check:
            self.refresh_shadowing()
        if now >= self._next_check or not ok:
            delay = self.interval_s if ok else RETRY_AFTER_FAILURE_S
            self._next_check = time.monotonic() + delay
