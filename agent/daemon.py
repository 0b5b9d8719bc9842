"""Daemon lifecycle: wire the parts, converge, serve, notify systemd, reload, shut down.

Owns the process: signals (SIGTERM/SIGINT stop, SIGHUP reloads, both handled at once, not on a
poll), sd_notify READY/STATUS/WATCHDOG/RELOADING/STOPPING, the verification thread, routine
retention and the recovery from a corrupt store. It never flushes or deletes the table on the
way out: entries keep working while the daemon is stopped, restarting or being upgraded.

Start-up order: take the state directory's lock (one daemon per state directory), read and
check the TLS material, trusted keys and metrics TLS files, see that the gRPC and metrics ports
are free (``agent.preflight``): nothing has touched the kernel yet, so a failure leaves the
ruleset as it was. Then open the store (a
corrupt one is moved aside and the entries are adopted from the kernel's table), listen to
nf_tables notifications, converge kernel and store (first start: install the table; restart:
adopt it; reboot: rebuild it with each entry's remaining timeout), start the writer and the
verifier, listen on the gRPC port, and only then READY=1.

Every long-lived loop (writer, expiry, conntrack cuts, verification, netlink monitor, gRPC event
loop, local socket, metrics listener, this main loop) is supervised (``agent.supervise``): an
unexpected exception is logged with a reason word, counted, and the loop goes on after a back-off.
WATCHDOG=1 is sent (when systemd asked for it with WATCHDOG_USEC) only while every loop has made
progress within its deadline, so a loop that is dead, stuck or failing on every turn gets the
daemon restarted; STATUS= and the metrics name the loop.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import systemd.daemon  # Debian's python3-systemd
import systemd.journal

from agent.config import AgentConfig, load_config
from agent.engine import Engine
from agent.errors import AgentError, Unavailable
from agent.local.server import serve_local
from agent.logprivacy import ExceptionsWithoutMessages
from agent.metrics import SourceStatus, start_metrics
from agent.metrics.http import TlsFiles
from agent.metrics.loops import LoopCollector
from agent.preflight import StateDirUnusable, StateLock, check_listen_free
from agent.reconcile import UNCHANGED_STARTUP, Scope, adopt_kernel, converge_task, startup_scope
from agent.rpc.auth import CallerPolicy
from agent.rpc.server import AgentServer, TlsMaterial
from agent.rpc.service import FirewallAgentService, Health, Settings
from agent.rpc.signing import trust_policy_from_config
from agent.rules.monitor import NftMonitor, ruleset_fingerprint
from agent.rules.nft import NftAdapter, limit_heap_arenas
from agent.rules.shadowing import Shadow
from agent.rules.table import FirewallTable
from agent.state import HISTORY, Entry, Event, EventKind, Limits, StateView, numbered
from agent.state_records import to_stored, to_stored_event
from agent.store import Store, StoreCorrupt, StoreError
from agent.store_records import CommitBatch
from agent.supervise import FaultInjector, Supervision
from agent.verify import Verifier

log = logging.getLogger("vicifast-agent")
PURGE_EVERY_S = 300.0
STOP_GRACE_S = 10.0
RELOAD_WAIT_S = 60.0  # a reload reads a few files: this only bounds a stuck main loop
HEAP_ARENAS = 2  # see agent.rules.nft.limit_heap_arenas
# Exit status for "the state directory cannot be used": the unit must not restart on it
# (RestartPreventExitStatus=), since a restart cannot fix a permission or I/O problem.
EXIT_STORE_UNUSABLE = 78
JOURNAL_FIELDS = ("REQUEST_ID", "CALLER", "RPC", "REASON", "LOOP", "FAULT")


_notify_failed = threading.Event()  # set once the first failure was logged


def _notify(message: str) -> None:
    """sd_notify through libsystemd's binding; a no-op when not under systemd.

    A notification that cannot be sent (the socket was removed, systemd went away) is logged
    once and otherwise ignored: systemd's bookkeeping must never stop the firewall.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        systemd.daemon.notify(message)
    except OSError as exc:
        if not _notify_failed.is_set():
            # Out of descriptors, say, or systemd went away: this message is lost (a missed
            # WATCHDOG=1 is made up by the next one), the caller's loop goes on.
            _notify_failed.set()
            log.warning(
                "cannot notify systemd (%s); carrying on without notifications",
                errno.errorcode.get(exc.errno or 0, "oserror"),
                extra={"REASON": "notify_failed"},
            )


def watchdog_interval_s() -> float | None:
    """Seconds systemd allows between WATCHDOG=1 pings, or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


class _FieldsFormatter(logging.Formatter):
    """stderr format: the message, then the structured fields journald would get (every
    upper-case record attribute, as ``JournalHandler`` sends them), so what reaches stderr -
    and the tests reading it - is what reaches the journal."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{k}={v!r}" for k, v in sorted(vars(record).items()) if k.isupper()]
        return f"{text} [{' '.join(fields)}]" if fields else text


def stderr_is_the_journal() -> bool:
    """Whether stderr is systemd's journal stream: $JOURNAL_STREAM names its device and inode
    (systemd.exec(5)). A shell started from a service inherits the variable with another stderr,
    and a foreground run from a terminal has none: both log to stderr."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging() -> None:
    """journald with structured fields when stderr is the journal (under the unit), stderr
    with the fields appended otherwise (``vicifast-agent run`` in a terminal).

    Callers pass fields as ``extra={"REQUEST_ID": ..., "REASON": ...}``; the journal handler
    sends every upper-case record attribute as a journal field.
    """
    handler: logging.Handler
    if stderr_is_the_journal():
        handler = systemd.journal.JournalHandler(SYSLOG_IDENTIFIER="vicifast-agent")
        # The level and logger travel as journal fields (PRIORITY, LOGGER): the message alone,
        # not basicConfig's "INFO:vicifast-agent:" prefix in front of every line.
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # No exception message reaches the log: it may name an address or a subject (privacy).
    handler.addFilter(ExceptionsWithoutMessages())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def settings_for(cfg: AgentConfig) -> Settings:
    return Settings(cfg, trust_policy_from_config(cfg), CallerPolicy(cfg.api.allowed_identities))


@dataclass(frozen=True, slots=True)
class Status:
    """The one-line summary systemd shows (``systemctl status``)."""

    entries: int
    in_sync: bool
    resync_required: bool
    shadowed: bool
    stalled: tuple[str, ...] = ()  # supervised loops without progress within their deadline
    repair_storm: bool = False

    def line(self) -> str:
        parts = [f"{self.entries} entries", "in sync" if self.in_sync else "NOT in sync"]
        if self.stalled:
            parts.append(f"STALLED: {', '.join(self.stalled)} (watchdog not fed)")
        if self.repair_storm:
            parts.append("UNHEALTHY: drift repairs keep coming (another agent on this table?)")
        if self.resync_required:
            parts.append("state rebuilt from the kernel, waiting for a Sync")
        if self.shadowed:
            parts.append("another table drops allowed traffic (see `vicifast-agent doctor`)")
        return ", ".join(parts)


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.cfg = load_config(config_path)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.wake = threading.Event()
        self.recovered_store: Path | None = None  # where a corrupt store was moved aside
        # Callers waiting for the verdict of the next reload (the local socket's "reload").
        self._reload_waiters: list[Future[AgentError | None]] = []
        self._reload_lock = threading.Lock()
        self._status: Status | None = None
        # Every loop's heartbeat and faults; the fault-injection seam only when a test asks.
        self.supervision = Supervision(injector=FaultInjector.from_env())
        self._next_purge = 0.0

    # --- what other parts read (metrics, GetState, the local socket, doctor) -----------------

    @property
    def drift_repairs(self) -> int:
        return self.verifier.drift_repairs

    @property
    def last_verified_at_ms(self) -> int:
        return self.verifier.last_verified_at_ms

    @property
    def resync_required(self) -> bool:
        """The store was rebuilt from the kernel and no Sync has been applied since."""
        return self.recovered_store is not None and self.engine.view.last_sync_issued_at_ms == 0

    @property
    def in_sync(self) -> bool:
        """The kernel's table was verified equal to the state, and the state is trustworthy; not
        while something keeps changing the table back (a repair storm)."""
        return self.verifier.in_sync and not self.resync_required and not self.verifier.repair_storm

    @property
    def shadowing(self) -> tuple[Shadow, ...]:
        return self.verifier.shadowing

    def snapshot(self) -> tuple[list[Entry], int]:
        """MetricsSource: entries the kernel enforces and the state version."""
        return self.engine.snapshot()

    def metrics_status(self) -> SourceStatus:
        """MetricsSource: the figures the metrics read at scrape time."""
        return SourceStatus(
            in_sync=self.in_sync,
            last_verified_at_ms=self.last_verified_at_ms,
            drift_repairs=self.drift_repairs,
            expiries=self.engine.expiries,
            shadowing=bool(self.shadowing),
            flows_cut=self.engine.flows_cut,
            flow_cut_failures=self.engine.flow_cut_failures,
            repair_storm=self.verifier.repair_storm,
        )

    def health(self) -> Health:
        return Health(
            in_sync=self.in_sync,
            last_verified_at_ms=self.last_verified_at_ms,
            drift_repairs=self.drift_repairs,
            recent_drift_repairs=self.verifier.recent_repairs,
            repair_storm=self.verifier.repair_storm,
        )

    # --- start --------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        # Everything needed to serve is read and checked before the kernel is first touched, so
        # a start that fails leaves the host's ruleset exactly as it was (README, "A start that
        # fails"). AgentError (bad TLS material, keys, the lock held) ends in ``run`` below.
        try:
            self.lock = StateLock.take(cfg.state.directory)
        except StateDirUnusable as exc:
            log.error(
                "cannot use the state directory: %s", exc.message, extra={"REASON": exc.reason}
            )
            return EXIT_STORE_UNUSABLE
        material = TlsMaterial.load(cfg)  # parsed, key matching its certificate
        settings = settings_for(cfg)  # the trusted signing keys decode
        metrics_tls = TlsFiles.of(cfg.metrics)
        if metrics_tls is not None:
            metrics_tls.context()
        check_listen_free("api.listen", cfg.api.listen)
        check_listen_free("metrics.listen", cfg.metrics.listen)
        try:
            self.store = self._open_store(cfg.state.directory / "state.db")
            # A store from before the ceiling existed (an upgrade) gets one now, not at its
            # first commit: a damage before that could not be recovered from above it.
            self.store.record_ceiling()
        except StoreError as exc:
            log.error(
                "cannot use the state database: %s", exc.message, extra={"REASON": exc.reason}
            )
            return EXIT_STORE_UNUSABLE
        # Listening before the first read-back, so no change made meanwhile goes unseen.
        self.monitor = NftMonitor(cfg.firewall.table)
        self.table = FirewallTable(cfg.firewall, NftAdapter(), quiet=self.monitor.not_listening)
        self.engine = self._make_engine(cfg)
        self.engine.load()
        if self.recovered_store is not None:
            self._adopt_kernel()
        conv = self.engine.run_task(
            converge_task(self.store, self.table, self.engine.now_ms, self._startup_scope())
        )
        features = self.table.probe()
        log.info(
            "kernel %s, nft %s, re-add refreshes timeout: %s, destroy: %s",
            features.kernel_release,
            features.nft_version,
            features.readd_updates_timeout,
            features.destroy_supported,
        )
        self.engine.start()
        self.verifier = Verifier(
            engine=self.engine,
            store=self.store,
            table=self.table,
            monitor=self.monitor,
            interval_s=cfg.verify.interval_s,
            elements_interval_s=cfg.verify.elements_interval_s,
            on_change=self.wake.set,
            supervision=self.supervision,
        )
        self.verifier.record(conv, startup=True)
        self.verifier.refresh_shadowing()
        self.verifier.start()
        self.service = FirewallAgentService(self.engine, settings, health=self.health)
        self.metrics = start_metrics(
            cfg,
            self,
            nft=self.table.nft,
            nft_version=features.nft_version,
            supervision=self.supervision,
        )
        self.metrics.registry.register(LoopCollector(self.supervision))
        self.server = AgentServer(
            cfg,
            self.service,
            interceptors=[self.metrics.interceptor],
            material=material,
            observer=self.metrics.transport,
        )
        self.metrics.transport.count_open(self.server.open_connections)
        self.server.start()
        self.server.supervise(self.supervision)
        # The on-host socket for the CLI (agent.local), counted like the gRPC API.
        self.local = serve_local(self, self.supervision, observe=self.metrics.requests.record_local)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        log.info(
            "ready: %d entries, state_version %d, startup: %s, listening on %s",
            self.engine.entry_count,
            self.engine.view.state_version,
            conv.describe(),
            cfg.api.listen,
        )
        _notify(f"READY=1\nSTATUS={self._current_status().line()}")
        self._loop()
        self._shutdown()
        return 0

    def _make_engine(self, cfg: AgentConfig) -> Engine:
        skew_ms = cfg.signing.clock_skew_s * 1000
        return Engine(
            store=self.store,
            table=self.table,
            limits=Limits(
                max_entries=cfg.limits.max_entries,
                set_size={4: cfg.firewall.set_size_ipv4, 6: cfg.firewall.set_size_ipv6},
            ),
            profiles=cfg.profile_names,
            forget_window_ms=cfg.signing.max_window_s * 1000 + skew_ms,
            history=HISTORY,
            supervision=self.supervision,
        )

    def _open_store(self, path: Path) -> Store:
        """Open the store; a corrupt one is moved aside (kept for inspection) and replaced."""
        try:
            return Store.open(path)
        except StoreCorrupt as exc:
            log.error("%s", exc.message, extra={"REASON": exc.reason})
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                src.rename(aside.with_name(aside.name + suffix))
        self.recovered_store = aside
        log.error(
            "moved the damaged state database to %s; rebuilding the entries from the kernel's "
            "table and asking the control plane for a Sync (RESYNC_REQUIRED)",
            aside,
            extra={"REASON": "store_corrupt"},
        )
        store = Store.open(path)
        try:
            version = store.resume_after_loss(int(time.time() * 1000))
        except BaseException:
            store.close()
            raise
        log.warning(
            "state_version continues from %d; signed requests issued before now are refused "
            "(issued_before_recovery)",
            version,
            extra={"REASON": "store_corrupt"},
        )
        return store

    def _startup_scope(self) -> Scope:
        stopped_at = self.store.take_stop_generation()
        try:
            current: int | None = ruleset_fingerprint()
        except OSError as exc:
            log.warning("cannot read the ruleset generation: %s", exc)
            current = None
        scope = startup_scope(stopped_at, current, intents=bool(self.store.pending_intents()))
        if scope is UNCHANGED_STARTUP:
            log.info(
                "ruleset unchanged since the last clean stop: "
                "the elements are adopted without listing them",
            )
        return scope

    def _record_stop_generation(self) -> None:
        try:
            self.store.record_stop_generation(ruleset_fingerprint())
        except (OSError, AgentError) as exc:
            log.warning("cannot record the ruleset generation; the next start lists it: %s", exc)

    def _adopt_kernel(self) -> None:
        """Fill a fresh store from the kernel's table; tell watchers a Sync is needed."""
        now = self.engine.now_ms()
        entries = adopt_kernel(self.table, now)

        def task(view: StateView) -> tuple[StateView, list[Event], int]:
            final = view.detached()
            final.entries.update({e.key: e for e in entries})
            events = numbered(
                [
                    Event(
                        EventKind.RESYNC_REQUIRED,
                        now,
                        None,
                        f"state database was damaged; {len(entries)} entries adopted from the "
                        "kernel's table; send a Sync",
                    )
                ],
                view.state_version,
            )
            final.state_version = events[-1].state_version
            self.store.commit(_adoption_batch(final.state_version, entries, events))
            return final, events, len(entries)

        self.engine.run_task(task)

    # --- running ------------------------------------------------------------------------------

    def _current_status(self) -> Status:
        return Status(
            entries=self.engine.entry_count,
            in_sync=self.in_sync,
            resync_required=self.resync_required,
            shadowed=bool(self.shadowing),
            stalled=self.supervision.stalled(),
            repair_storm=self.verifier.repair_storm,
        )

    def _loop(self) -> None:
        watchdog = watchdog_interval_s()
        tick = min(1.0, watchdog / 2) if watchdog else 1.0
        self._next_purge = time.monotonic()
        self.supervision.watch("main")
        while not self.stop_requested.is_set():
            self.wake.wait(tick)
            self.wake.clear()
            if self.stop_requested.is_set():
                return
            pause = self.supervision.guarded("main", self._turn)
            # Fed only while every supervised loop (this one included) has made progress
            # within its deadline: a dead or stuck loop gets the daemon restarted.
            if watchdog and not self.supervision.stalled():
                _notify("WATCHDOG=1")
            if pause:
                self.stop_requested.wait(pause)

    def _turn(self) -> None:
        """One turn of the main loop: reload, status, retention."""
        if self.reload_requested.is_set():
            with self._reload_lock:
                self.reload_requested.clear()
                waiters, self._reload_waiters = self._reload_waiters, []
            verdict = self.reload()
            for waiter in waiters:
                waiter.set_result(verdict)
        status = self._current_status()
        if status != self._status:
            if status.stalled and (self._status is None or not self._status.stalled):
                # A warning, not yet an error: one long turn (a 100,000-entry Sync) shows here
                # for a moment; a loop that stays stuck is restarted by systemd's watchdog.
                log.warning(
                    "no progress within the deadline: %s; the watchdog is not fed meanwhile",
                    ", ".join(status.stalled),
                    extra={"REASON": "loop_stalled", "LOOP": ",".join(status.stalled)},
                )
            elif self._status is not None and self._status.stalled and not status.stalled:
                log.warning("every loop is turning again", extra={"REASON": "loop_recovered"})
            self._status = status
            _notify(f"STATUS={status.line()}")
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + PURGE_EVERY_S
            self._purge()

    def _purge(self) -> None:
        try:
            self.store.purge(
                self.engine.now_ms(),
                audit_retention_ms=self.cfg.state.audit_retention_days * 86_400_000,
                max_events=HISTORY,
            )
        except AgentError:
            log.exception("retention purge failed")

    def request_reload(self) -> AgentError | None:
        """Ask the main loop to reload and wait for its verdict: None, or why it refused."""
        waiter: Future[AgentError | None] = Future()
        with self._reload_lock:
            self._reload_waiters.append(waiter)
            self.reload_requested.set()
        self.wake.set()
        return waiter.result(timeout=RELOAD_WAIT_S)

    def reload(self) -> AgentError | None:
        """Re-read config, certificates, client CA and trusted keys; keep the old on error.

        Everything is read and checked before anything is swapped in: the server key must parse
        and match its certificate, the client CA and the trusted keys must parse, as at start
        (``agent.preflight``). Returns None, or the error the reload was refused for.

        The listener and calls in flight are untouched: new TLS handshakes use the new
        material, each call sees either the old or the new settings whole. Firewall and state
        settings (table, profiles, ports, directory) take effect at the next restart.
        """
        _notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            cfg = load_config(self.config_path)
            settings = settings_for(cfg)  # the trusted keys decode
            material = TlsMaterial.load(cfg)  # parsed, the key matching its certificate
            metrics_tls = TlsFiles.of(cfg.metrics)
            if metrics_tls is not None:
                metrics_tls.context()
            # Only now, with everything checked, is anything swapped in.
            self.server.reload(cfg, material=material)
            self.metrics.reload(cfg)
        except AgentError as exc:
            log.error(
                "reload refused, keeping the running configuration: %s",
                exc.message,
                extra={"REASON": exc.reason},
            )
            refused: AgentError | None = exc
        else:
            refused = None
            if cfg.firewall != self.cfg.firewall or cfg.state != self.cfg.state:
                log.warning("firewall and state settings changed: they apply at the next restart")
            self.cfg = cfg
            self.service.reload(settings)
            self.verifier.interval_s = cfg.verify.interval_s
            self.verifier.elements_interval_s = cfg.verify.elements_interval_s
            log.info("reloaded configuration from %s", self.config_path)
        _notify("READY=1")
        return refused

    def _shutdown(self) -> None:
        _notify("STOPPING=1")
        with self._reload_lock:
            waiters, self._reload_waiters = self._reload_waiters, []
        for waiter in waiters:  # asked to reload while stopping: say so instead of timing out
            waiter.set_result(Unavailable("stopping", "the daemon is stopping; not reloaded"))
        # New calls are refused from here on; calls in flight finish (within the grace).
        self.server.stop(grace=STOP_GRACE_S)
        self.local.stop()
        self.metrics.stop()
        self.verifier.stop()
        self.engine.stop()
        self._record_stop_generation()  # after the last kernel transaction of this process
        self.store.close()
        log.info("stopped; the table and its entries stay in place")

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested.set()
        self.wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested.set()
        self.wake.set()


def _adoption_batch(version: int, entries: list[Entry], events: list[Event]) -> CommitBatch:
    return CommitBatch(
        state_version=version,
        upserts=tuple(map(to_stored, entries)),
        events=tuple(map(to_stored_event, events)),
    )


def _reason(exc: AgentError) -> dict[str, str]:
    return {"REASON": exc.reason}


def run(config_path: Path) -> int:
    limit_heap_arenas(HEAP_ARENAS)
    setup_logging()
    try:
        code = Daemon(config_path).run()
    except AgentError as exc:
        log.error("cannot start: %s", exc.message, extra={"REASON": exc.reason})
        return 1
    # Everything is closed (store, sockets, threads joined). Tearing down the interpreter would
    # free 100,000 entries' objects one by one, a third of a second of a restart: exit at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
